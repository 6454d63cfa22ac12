"""The asynchronous client, usable from trio and asyncio (via anyio).

An :class:`AsyncClient` keeps one connection (see ``_link``), shared by all its concurrent
calls; the next call after a lost connection connects again. Retryable failures are retried with
backoff, always with the idempotency key of the first attempt (one is generated when retries
are on and the caller gave none), so a retry never applies a call twice.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Final, final

import anyio
import anyio.lowlevel

from .._errors import DeadlineExceededError, FacetrtError, UnavailableError
from ._link import Link, open_link
from ._retry import RetryPolicy
from ._url import parse_url

if TYPE_CHECKING:
    import ssl
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    from anyio.abc import TaskGroup

    from .._values import Value
    from ._url import ServerUrl

logger = logging.getLogger(__name__)

CONNECT_SECONDS_DEFAULT: Final = 10.0


@final
class AsyncClient:
    """A connection to a facetrt daemon, for one tenant (the key's). Get one from :func:`connect`.

    Safe to share between tasks of its event loop: concurrent calls are pipelined on one
    connection.
    """

    def __init__(
        self,
        url: ServerUrl,
        link: Link,
        *,
        key: str,
        ssl_context: ssl.SSLContext | None,
        policy: RetryPolicy,
        connect_seconds: float,
        task_group: TaskGroup,
    ) -> None:
        self._url = url
        self._key = key
        self._ssl_context = ssl_context
        self._policy = policy
        self._connect_seconds = connect_seconds
        self._task_group = task_group
        self._connect_lock = anyio.Lock()
        self._is_closed = False
        self._link = link
        self._links: set[Link] = set()  # the current one, and older ones finishing after a bye
        self.tenant = link.tenant
        self._start(link)

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    async def call(
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
        """Call ``method`` of the facet ``agent_id`` of this client's tenant; return its result.

        ``cls`` names the class to bind the facet to on its first call. ``deadline_seconds``
        bounds the whole call, retries included; the server is told the time left with every
        attempt. Retryable failures are retried (``retries`` times, with backoff) under one
        idempotency key, generated when none is given and retries are on.

        Raises:
            FacetrtError: the subclass of the failure's code; DeadlineExceededError when the
                deadline passed (the call may or may not have run).
            anyio.ClosedResourceError: the client was closed.

        Cancellation leaves a call that was already sent running on the server.
        """
        if self._is_closed:
            raise anyio.ClosedResourceError
        if idempotency_key is None and self._policy.retries:
            idempotency_key = os.urandom(16).hex()  # as unguessable as uuid4().hex, faster
        arg_list = list(args)
        deadline = math.inf
        if deadline_seconds is not None:
            deadline = anyio.current_time() + deadline_seconds
        retry = 0
        while True:
            try:
                if deadline_seconds is None:  # the common case, without a deadline scope
                    link = self._link
                    if link.is_closing():
                        link = await self._reconnect()
                    return await link.call(
                        agent_id, method, arg_list, kwargs, cls, idempotency_key, None
                    )
                return await self._attempt(
                    agent_id, method, arg_list, kwargs, cls, idempotency_key, deadline
                )
            except FacetrtError as exc:
                if self._is_closed or not self._policy.should_retry(exc, retry):
                    raise
                delay = self._policy.delay_seconds(retry)
                if anyio.current_time() + delay >= deadline:
                    raise
                logger.debug("retrying a call after %s (retry %d)", exc.code.value, retry + 1)
            await anyio.sleep(delay)
            retry += 1

    async def _attempt(
        self,
        agent_id: str,
        method: str,
        args: list[Value],
        kwargs: dict[str, Value],
        cls: str | None,
        idempotency_key: str | None,
        deadline: float,
    ) -> Value:
        link = self._link
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise DeadlineExceededError("the call's deadline passed before it could be sent")
        try:
            with anyio.fail_after(remaining):
                if not link.is_usable:
                    link = await self._reconnect()
                deadline_ms = max(1, math.ceil(remaining * 1000))
                return await link.call(
                    agent_id, method, args, kwargs, cls, idempotency_key, deadline_ms
                )
        except TimeoutError:
            raise DeadlineExceededError(
                "no reply within the call's deadline; it may or may not have run"
            ) from None

    async def _reconnect(self) -> Link:
        async with self._connect_lock:
            if self._is_closed:
                raise anyio.ClosedResourceError
            if not self._link.is_usable:
                link = await open_link(
                    self._url, self._key, self._ssl_context, self._connect_seconds
                )
                if self.is_closed:  # closed while we connected
                    await anyio.aclose_forcefully(link.stream)
                    raise anyio.ClosedResourceError
                self._link = link
                self._start(link)
            return self._link

    def _start(self, link: Link) -> None:
        self._links.add(link)
        self._task_group.start_soon(self._run_link, link)

    async def _run_link(self, link: Link) -> None:
        try:
            await link.run()
        finally:
            self._links.discard(link)

    def close_nowait(self) -> None:
        """Close the connection; calls in flight fail with UnavailableError."""
        if self._is_closed:
            return
        self._is_closed = True
        # Each link stops its own tasks. Cancelling the task group instead would also cancel
        # the body of the ``async with connect()`` block, which runs inside its scope.
        for link in list(self._links):
            link.fail(UnavailableError("the client was closed"))

    async def aclose(self) -> None:
        """Close the connection (see :meth:`close_nowait`)."""
        self.close_nowait()
        await anyio.lowlevel.checkpoint()


@final
class _Connecting:
    """``async with connect(...) as client``: connects on enter, closes on exit.

    The reader and writer tasks live in a task group that spans the ``async with`` body; the
    body's own exception is not passed to it, so it propagates unchanged (never wrapped in an
    ExceptionGroup).
    """

    def __init__(
        self,
        url: str,
        *,
        key: str,
        ssl_context: ssl.SSLContext | None,
        policy: RetryPolicy,
        connect_seconds: float,
    ) -> None:
        self._url = parse_url(url)
        self._key = key
        self._ssl_context = ssl_context
        self._policy = policy
        self._connect_seconds = connect_seconds
        self._task_group: TaskGroup | None = None
        self._client: AsyncClient | None = None

    async def __aenter__(self) -> AsyncClient:
        assert self._task_group is None, "connect() can be entered only once"
        link = await open_link(self._url, self._key, self._ssl_context, self._connect_seconds)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._client = AsyncClient(
            self._url,
            link,
            key=self._key,
            ssl_context=self._ssl_context,
            policy=self._policy,
            connect_seconds=self._connect_seconds,
            task_group=self._task_group,
        )
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        assert self._client is not None
        self._client.close_nowait()
        await self._task_group.__aexit__(None, None, None)


def connect(
    url: str,
    *,
    key: str,
    ssl_context: ssl.SSLContext | None = None,
    retries: int = 3,
    backoff_seconds: float = 0.05,
    backoff_seconds_max: float = 2.0,
    connect_seconds: float = CONNECT_SECONDS_DEFAULT,
) -> AbstractAsyncContextManager[AsyncClient]:
    """Connect to a daemon: ``async with connect("tcp://127.0.0.1:7420", key=KEY) as client:``.

    ``url`` is ``tcp://HOST[:PORT]`` or ``tls://HOST[:PORT]`` (TLS, verified with
    ``ssl_context`` or the system's default). ``connect_seconds`` bounds connecting and the
    handshake. Works under trio and asyncio.

    Raises (on enter):
        UnauthorizedError: the key is wrong or revoked.
        ForbiddenError: the key is an admin key.
        UnavailableError: the daemon cannot be reached.
        ConfigError: a malformed URL or retry setting (at once, not on enter).
    """
    return _Connecting(
        url,
        key=key,
        ssl_context=ssl_context,
        policy=RetryPolicy(
            retries=retries,
            backoff_seconds=backoff_seconds,
            backoff_seconds_max=backoff_seconds_max,
        ),
        connect_seconds=connect_seconds,
    )
