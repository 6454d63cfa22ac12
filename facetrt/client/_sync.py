"""The blocking client: an asyncio event loop in a private thread runs an AsyncClient.

Every ``call`` is submitted to that loop through an anyio blocking portal, so calls from several
threads are pipelined on the one connection. The loop thread is a daemon thread: a client that
is never closed does not keep the interpreter alive (close it anyway: that closes the socket).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Final, final

import anyio
from anyio.from_thread import BlockingPortal

from ._async import CONNECT_SECONDS_DEFAULT, connect

if TYPE_CHECKING:
    import ssl
    from contextlib import AbstractContextManager
    from types import TracebackType
    from typing import Self

    from .._values import Value
    from ._async import AsyncClient

CLOSE_SECONDS: Final = 10.0


@final
class SyncClient:
    """A blocking client: ``SyncClient("tcp://127.0.0.1:7420", key=KEY).call(agent, method)``.

    Connects at once (raising like :func:`facetrt.client.connect`); thread-safe; use as a
    context manager or call :meth:`close`. Arguments are those of :func:`~facetrt.client.connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        key: str,
        ssl_context: ssl.SSLContext | None = None,
        retries: int = 3,
        backoff_seconds: float = 0.05,
        backoff_seconds_max: float = 2.0,
        connect_seconds: float = CONNECT_SECONDS_DEFAULT,
    ) -> None:
        connecting = connect(
            url,
            key=key,
            ssl_context=ssl_context,
            retries=retries,
            backoff_seconds=backoff_seconds,
            backoff_seconds_max=backoff_seconds_max,
            connect_seconds=connect_seconds,
        )
        self._close_lock = threading.Lock()
        self._is_closed = False
        ready: Future[BlockingPortal] = Future()
        self._thread = threading.Thread(
            target=self._run_loop, args=(ready,), name="facetrt-client", daemon=True
        )
        self._thread.start()
        self._portal = ready.result()
        self._client_context: AbstractContextManager[AsyncClient] = (
            self._portal.wrap_async_context_manager(connecting)
        )
        try:
            self._client = self._client_context.__enter__()
        except BaseException:
            self._stop_loop()
            raise
        self.tenant = self._client.tenant

    @staticmethod
    def _run_loop(ready: Future[BlockingPortal]) -> None:
        async def host() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        try:
            anyio.run(host, backend="asyncio")
        except BaseException as exc:  # the loop failed to start: tell the constructor
            if ready.done():
                raise
            ready.set_exception(exc)

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def call(
        self,
        agent_id: str,
        method: str,
        /,
        *args: Value,
        cls: str | None = None,
        idempotency_key: str | None = None,
        deadline_seconds: float | None = None,
        **kwargs: Value,
    ) -> Value:
        """Call a facet and block until its result (see :meth:`AsyncClient.call`).

        Raises:
            FacetrtError: as AsyncClient.call.
            anyio.ClosedResourceError: the client was closed.
        """
        if self._is_closed:
            raise anyio.ClosedResourceError
        job = partial(
            self._client.call,
            agent_id,
            method,
            *args,
            cls=cls,
            idempotency_key=idempotency_key,
            deadline_seconds=deadline_seconds,
            **kwargs,
        )
        try:
            return self._portal.call(job)
        except RuntimeError:
            if self._is_closed:  # the portal stopped under us
                raise anyio.ClosedResourceError from None
            raise

    def close(self) -> None:
        """Close the connection and stop the loop thread; calls in flight fail. Idempotent."""
        with self._close_lock:
            if self._is_closed:
                return
            self._is_closed = True
        try:
            self._client_context.__exit__(None, None, None)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._portal.call(self._portal.stop)
        self._thread.join(CLOSE_SECONDS)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
