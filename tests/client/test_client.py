"""facetrt.client against a real daemon over loopback: trio, asyncio and plain threads."""

from __future__ import annotations

import ast
import asyncio
import queue
import random
import shutil
import ssl
import subprocess
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, final

import anyio
import pytest
import trio
import trio.lowlevel

import facetrt.client
from facetrt import (
    BadRequestError,
    DeadlineExceededError,
    ErrorCode,
    FacetrtError,
    ForbiddenError,
    HandlerError,
    NotFoundError,
    OverloadedError,
    UnauthorizedError,
    UnavailableError,
)
from facetrt._errors import ConfigError
from facetrt.client._link import encode_call
from facetrt.client._retry import RetryPolicy
from facetrt.client._url import ServerUrl, parse_url
from facetrt.config import load_daemon_config
from facetrt.protocol import Call, Connection, Hello, Role, Welcome
from facetrt.server._daemon import Daemon, DaemonInfo
from facetrt.storage import SystemStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

    from facetrt import Value
    from facetrt.client import AsyncClient

CLASSES = {"Counter": "facetrt.examples:Counter", "Register": "tests.facets:Register"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    url: str
    key: str
    info: DaemonInfo


def _create_key(data_dir: Path) -> str:
    """A tenant ``acme`` and a key for it, written straight into the data directory."""
    system = SystemStore(data_dir / "system")
    try:
        system.create_tenant("acme")
        _, key = system.create_key("acme")
    finally:
        system.close()
    return key


def _daemon(data_dir: Path, overrides: Mapping[str, object] | None) -> Daemon:
    settings: dict[str, object] = {
        "data_dir": str(data_dir),
        "server.listen": "127.0.0.1:0",
        "server.http": "",
        "classes": CLASSES,
        "runtime.commit_threads": 4,
        "runtime.shutdown_grace_seconds": 2.0,
    }
    settings.update(overrides or {})
    return Daemon(load_daemon_config(overrides=settings))


@asynccontextmanager
async def serve(
    tmp_path: Path, overrides: Mapping[str, object] | None = None
) -> AsyncIterator[Served]:
    data_dir = tmp_path / "data"
    key = _create_key(data_dir)
    daemon = _daemon(data_dir, overrides)
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(daemon.run)
        host, port = info.tcp_address
        try:
            yield Served(url=f"tcp://{host}:{port}", key=key, info=info)
        finally:
            daemon.stop()


@contextmanager
def serve_in_thread(tmp_path: Path) -> Iterator[Served]:
    """A daemon on its own trio loop in a background thread, for asyncio and sync clients."""
    data_dir = tmp_path / "data"
    key = _create_key(data_dir)
    daemon = _daemon(data_dir, None)
    handoff: queue.Queue[tuple[DaemonInfo, trio.lowlevel.TrioToken] | BaseException] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info: DaemonInfo = await nursery.start(daemon.run)
            handoff.put((info, trio.lowlevel.current_trio_token()))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # a failed start is raised in the test thread too
            handoff.put(exc)
            raise

    thread = threading.Thread(target=run, name="daemon", daemon=True)
    thread.start()
    item = handoff.get(timeout=30)
    if isinstance(item, BaseException):
        raise item
    info, token = item
    host, port = info.tcp_address
    try:
        yield Served(url=f"tcp://{host}:{port}", key=key, info=info)
    finally:
        trio.from_thread.run_sync(daemon.stop, trio_token=token)
        thread.join(30)
        assert not thread.is_alive()


# -- results, concurrency, pipelining ----------------------------------------------------------


async def test_concurrent_clients_on_many_facets_give_exact_totals(tmp_path: Path) -> None:
    clients, facets, increments = 4, 8, 25
    seen: dict[str, list[Value]] = {f"c{index}": [] for index in range(facets)}

    async def work(client: AsyncClient) -> None:
        for _ in range(increments):
            for agent in seen:
                seen[agent].append(await client.call(agent, "increment", cls="Counter"))

    async def connect_and_work(served: Served) -> None:
        async with facetrt.client.connect(served.url, key=served.key) as client:
            await work(client)

    async with (
        serve(tmp_path) as served,
        facetrt.client.connect(served.url, key=served.key) as first,
    ):
        assert first.tenant == "acme"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, first)
            for _ in range(clients - 1):
                nursery.start_soon(connect_and_work, served)
        total = clients * increments
        for agent, values in seen.items():
            assert sorted(_ints(values)) == list(range(1, total + 1)), agent
            assert await first.call(agent, "get") == total


def _ints(values: list[Value]) -> list[int]:
    ints = [value for value in values if isinstance(value, int)]
    assert len(ints) == len(values)
    return ints


async def test_pipelined_calls_get_their_own_replies_out_of_order(tmp_path: Path) -> None:
    agents = [f"r{index}" for index in range(6)]
    finished: list[str] = []
    async with (
        serve(tmp_path) as served,
        facetrt.client.connect(served.url, key=served.key) as client,
    ):
        for agent in agents:
            await client.call(
                agent, "put_many", {f"k{i}": f"{agent}/{i}" for i in range(40)}, cls="Register"
            )

        async def slow() -> None:
            await client.call("slow", "sleep_then_put", 0.5, "k", "v", cls="Register")
            finished.append("slow")

        async def get(agent: str, index: int) -> None:
            assert await client.call(agent, "get", f"k{index}") == f"{agent}/{index}"
            finished.append(f"{agent}/{index}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.05)  # the slow call is sent first
            order = [(agent, index) for agent in agents for index in range(40)]
            random.Random(7).shuffle(order)
            for agent, index in order:
                nursery.start_soon(get, agent, index)
        assert len(finished) == 1 + 6 * 40
        assert finished[-1] == "slow"  # answered after 240 calls sent later


async def test_the_servers_calls_in_flight_bound_is_respected(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, {"server.calls_in_flight_max": 4}) as served,
        facetrt.client.connect(served.url, key=served.key) as client,
    ):
        link = client._link
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(link.waiters))
                await trio.lowlevel.checkpoint()

        async def call(index: int) -> None:
            await client.call(f"s{index % 8}", "sleep_then_put", 0.01, "k", index, cls="Register")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as callers:
                for index in range(40):
                    callers.start_soon(call, index)
            nursery.cancel_scope.cancel()
        assert most == 4


# -- errors ------------------------------------------------------------------------------------


async def test_wrong_key_and_admin_key_are_refused_by_connect(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        wrong = served.key[:-4] + ("AAAA" if not served.key.endswith("AAAA") else "BBBB")
        with pytest.raises(UnauthorizedError) as caught:
            async with facetrt.client.connect(served.url, key=wrong):
                pytest.fail("connected with a wrong key")
        assert caught.value.code is ErrorCode.UNAUTHORIZED
        assert not caught.value.retryable
        admin_key = served.info.admin_key_path.read_text().strip()
        with pytest.raises(ForbiddenError):
            async with facetrt.client.connect(served.url, key=admin_key):
                pytest.fail("connected with the admin key")


async def test_error_replies_arrive_as_their_classes(tmp_path: Path) -> None:
    async with (
        serve(tmp_path) as served,
        facetrt.client.connect(served.url, key=served.key) as client,
    ):
        with pytest.raises(NotFoundError) as not_found:
            await client.call("nobody", "get")  # no such facet, and no class given
        assert (not_found.value.code, not_found.value.retryable) == (ErrorCode.NOT_FOUND, False)

        with pytest.raises(BadRequestError) as bad_request:
            await client.call("not a valid id!", "get", cls="Counter")
        assert type(bad_request.value) is BadRequestError  # from the server, not local
        assert (bad_request.value.code, bad_request.value.retryable) == (
            ErrorCode.BAD_REQUEST,
            False,
        )

        with pytest.raises(HandlerError) as handler:
            await client.call("r", "put_then_fail", "k", 1, cls="Register")
        assert handler.value.type_name == "ValueError"
        assert "failing on purpose" in handler.value.message

        with pytest.raises(BadRequestError):
            await client.call("r", "put", "k", {1, 2})  # type: ignore[arg-type]  # on purpose

        assert await client.call("r", "get", "k") is None  # nothing was applied


async def test_an_error_leaves_async_with_unwrapped(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        with pytest.raises(NotFoundError):
            async with facetrt.client.connect(served.url, key=served.key) as client:
                await client.call("nobody", "get")
        with pytest.raises(anyio.ClosedResourceError):
            await client.call("nobody", "get")


async def test_aclose_inside_the_block_closes_only_the_client(tmp_path: Path) -> None:
    reached_the_end = False
    async with (
        serve(tmp_path) as served,
        facetrt.client.connect(served.url, key=served.key) as client,
    ):
        assert await client.call("c", "increment", cls="Counter") == 1
        await client.aclose()
        assert client.is_closed
        await trio.sleep(0.01)  # the block itself was not cancelled
        with pytest.raises(anyio.ClosedResourceError):
            await client.call("c", "increment")
        reached_the_end = True
    assert reached_the_end


async def test_deadline_fails_the_call_and_the_client_goes_on(tmp_path: Path) -> None:
    async with (
        serve(tmp_path) as served,
        facetrt.client.connect(served.url, key=served.key) as client,
    ):
        started = trio.current_time()
        with pytest.raises(DeadlineExceededError) as caught:
            await client.call(
                "sleepy", "sleep_then_put", 0.6, "k", 1, cls="Register", deadline_seconds=0.1
            )
        elapsed = trio.current_time() - started
        assert 0.09 <= elapsed < 0.5
        assert (caught.value.code, caught.value.retryable) == (ErrorCode.TIMEOUT, True)
        assert await client.call("other", "increment", cls="Counter", deadline_seconds=5) == 1
        # The late reply to the first call (if any) is dropped; the facet completed it.
        assert await client.call("sleepy", "get", "k", deadline_seconds=5) == 1


# -- retries -----------------------------------------------------------------------------------


async def test_overloaded_is_retried_with_backoff_until_it_succeeds(tmp_path: Path) -> None:
    async with serve(tmp_path, {"runtime.mailbox_envelopes_max": 1}) as served:
        patient = facetrt.client.connect(
            served.url, key=served.key, retries=20, backoff_seconds=0.02, backoff_seconds_max=0.1
        )
        async with (
            patient as client,
            facetrt.client.connect(served.url, key=served.key, retries=0) as impatient,
        ):
            await client.call("busy", "put", "warm", 0, cls="Register")
            shed: list[FacetrtError] = []

            async def put_or_shed(index: int) -> None:
                try:
                    await impatient.call("busy", "put", f"i{index}", index)
                except OverloadedError as exc:
                    shed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.call, "busy", "sleep_then_put", 0.3, "slow", 1)
                await trio.sleep(0.05)  # the facet is busy sleeping; its mailbox holds one
                for index in range(4):
                    nursery.start_soon(put_or_shed, index)
                for index in range(8):
                    nursery.start_soon(client.call, "busy", "put", f"p{index}", index)
            assert shed
            assert all(exc.code is ErrorCode.OVERLOADED and exc.retryable for exc in shed)
            stored = await client.call("busy", "dump")
            assert isinstance(stored, dict)
            assert {f"p{index}" for index in range(8)} <= stored.keys()


@final
class CuttingProxy:
    """A TCP proxy to the daemon that can swallow the next reply and cut that connection.

    The server has committed the call by then (replies leave after the commit), so the client
    sees a lost connection for a call that did apply: the case idempotency keys exist for.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut_next_reply = False
        self.connections = 0

    async def handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        upstream = await trio.open_tcp_stream(*self.target)
        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope, False)
            nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope, True)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        is_reply: bool,
    ) -> None:
        chunks = 0
        try:
            while data := await source.receive_some(65536):
                chunks += 1
                if is_reply and chunks > 1 and self.cut_next_reply:  # chunk 1 is the welcome
                    self.cut_next_reply = False
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def serve_through_proxy(tmp_path: Path) -> AsyncIterator[tuple[Served, CuttingProxy]]:
    async with serve(tmp_path) as served, trio.open_nursery() as nursery:
        proxy = CuttingProxy(served.info.tcp_address)
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield Served(url=f"tcp://127.0.0.1:{port}", key=served.key, info=served.info), proxy
        nursery.cancel_scope.cancel()


async def test_a_retry_after_a_lost_connection_never_applies_a_call_twice(
    tmp_path: Path,
) -> None:
    async with serve_through_proxy(tmp_path) as (served, proxy):
        async with facetrt.client.connect(
            served.url, key=served.key, backoff_seconds=0.01
        ) as client:
            proxy.cut_next_reply = True
            assert await client.call("once", "increment", cls="Counter") == 1
            assert proxy.connections == 2  # it reconnected and retried
            assert await client.call("once", "get") == 1  # applied exactly once

            proxy.cut_next_reply = True  # the caller's own key is kept across the retry too
            assert await client.call("once", "increment", idempotency_key="order-7") == 2
            assert await client.call("once", "increment", idempotency_key="order-7") == 2
            assert await client.call("once", "get") == 2

        async with facetrt.client.connect(served.url, key=served.key, retries=0) as client:
            proxy.cut_next_reply = True
            with pytest.raises(UnavailableError) as caught:
                await client.call("twice", "increment", cls="Counter")
            assert caught.value.retryable
            # It did apply: what a blind retry without a key would have doubled.
            assert await client.call("twice", "get") == 1


async def test_a_stopped_daemon_makes_calls_unavailable(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = _create_key(data_dir)
    daemon = _daemon(data_dir, None)
    stopped = trio.Event()

    async def run_daemon(*, task_status: trio.TaskStatus[DaemonInfo]) -> None:
        await daemon.run(task_status=task_status)
        stopped.set()

    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(run_daemon)
        url = f"tcp://127.0.0.1:{info.tcp_address[1]}"
        async with facetrt.client.connect(url, key=key, backoff_seconds=0.01) as client:
            assert await client.call("c", "increment", cls="Counter") == 1
            daemon.stop()
            await stopped.wait()
            with pytest.raises(UnavailableError):
                await client.call("c", "increment")


# -- asyncio, threads, TLS ---------------------------------------------------------------------


def test_the_client_works_under_asyncio(tmp_path: Path) -> None:
    async def main(served: Served) -> list[Value]:
        assert asyncio.get_running_loop() is not None
        async with facetrt.client.connect(served.url, key=served.key) as client:
            values = await asyncio.gather(
                *(client.call(f"a{index % 4}", "increment", cls="Counter") for index in range(200))
            )
            with pytest.raises(NotFoundError):
                await client.call("nobody", "get")
            with pytest.raises(DeadlineExceededError):
                await client.call(
                    "z", "sleep_then_put", 0.3, "k", 1, cls="Register", deadline_seconds=0.05
                )
            return [*values, *[await client.call(f"a{index}", "get") for index in range(4)]]

    with serve_in_thread(tmp_path) as served:
        values = asyncio.run(main(served))
    assert sorted(_ints(values[:200])) == sorted(list(range(1, 51)) * 4)
    assert values[200:] == [50] * 4


async def test_sync_client_from_plain_threads(tmp_path: Path) -> None:
    async with serve(tmp_path) as served:
        with pytest.raises(UnauthorizedError):
            await trio.to_thread.run_sync(
                lambda: facetrt.client.SyncClient(served.url, key=served.key + "x")
            )
        client = await trio.to_thread.run_sync(
            lambda: facetrt.client.SyncClient(served.url, key=served.key)
        )
        assert client.tenant == "acme"

        def work() -> None:
            for _ in range(25):
                client.call("t", "increment", cls="Counter")

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(trio.to_thread.run_sync, work)
        assert await trio.to_thread.run_sync(lambda: client.call("t", "get")) == 100
        with pytest.raises(NotFoundError):
            await trio.to_thread.run_sync(lambda: client.call("nobody", "get"))
        with client:
            pass  # leaving the block closes it
        client.close()  # closing twice is fine
        assert client.is_closed
        with pytest.raises(anyio.ClosedResourceError):
            client.call("t", "get")


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
            str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed_certificate(tmp_path)
    overrides = {"server.tls_cert_file": str(cert), "server.tls_key_file": str(key)}
    async with serve(tmp_path, overrides) as served:
        tls_url = served.url.replace("tcp://", "tls://")
        context = ssl.create_default_context(cafile=str(cert))
        async with facetrt.client.connect(tls_url, key=served.key, ssl_context=context) as client:
            assert await client.call("secure", "increment", cls="Counter") == 1
        with pytest.raises(UnavailableError):  # the system's roots do not trust this certificate
            async with facetrt.client.connect(tls_url, key=served.key):
                pytest.fail("an untrusted certificate was accepted")


# -- pieces ------------------------------------------------------------------------------------


def test_urls() -> None:
    assert parse_url("tcp://127.0.0.1:7420") == ServerUrl(host="127.0.0.1", port=7420, is_tls=False)
    assert parse_url("tls://example.org") == ServerUrl(host="example.org", port=7420, is_tls=True)
    assert parse_url("tcp://[::1]:9") == ServerUrl(host="::1", port=9, is_tls=False)
    assert str(parse_url("tcp://[::1]:9")) == "tcp://[::1]:9"
    for bad in ("http://h:1", "h:1", "tcp://:1", "tcp://h:99999", "tcp://h:1/path", "tcp://h:x"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(retries=3, backoff_seconds=0.05, backoff_seconds_max=0.3)
    rng = random.Random(1)
    for retry, ceiling in enumerate([0.05, 0.1, 0.2, 0.3, 0.3]):
        delays = {policy.delay_seconds(retry, rng=rng) for _ in range(50)}
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(delays) > 1
    assert policy.should_retry(OverloadedError("x"), 2)
    assert not policy.should_retry(OverloadedError("x"), 3)
    assert not policy.should_retry(NotFoundError("x"), 0)
    with pytest.raises(ConfigError):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigError):
        RetryPolicy(backoff_seconds=1.0, backoff_seconds_max=0.5)


@pytest.mark.parametrize(
    "optional",
    [
        {},
        {"cls": "Counter"},
        {"idempotency_key": "k"},
        {"deadline_ms": 250},
        {"cls": "C", "idempotency_key": "k", "deadline_ms": 1},
    ],
)
def test_encode_call_matches_the_protocol_connection(optional: dict[str, object]) -> None:
    connection = Connection(Role.CLIENT)
    connection.send(Hello(key="k"))
    connection.receive_data(_welcome_frame())
    assert isinstance(connection.next_event(), Welcome)
    args: list[Value] = [1, "two", [3.0, None], {"b": b"x"}]
    kwargs: dict[str, Value] = {"by": 2}
    expected = connection.send(
        Call(id=42, agent="a-1", method="m", args=args, kwargs=kwargs, **optional)  # type: ignore[arg-type]
    )
    assert (
        encode_call(
            42,
            "a-1",
            "m",
            args,
            kwargs,
            optional.get("cls"),  # type: ignore[arg-type]
            optional.get("idempotency_key"),  # type: ignore[arg-type]
            optional.get("deadline_ms"),  # type: ignore[arg-type]
        )
        == expected
    )


def _welcome_frame() -> bytes:
    server = Connection(Role.SERVER)
    return server.send(Welcome(tenant="t", calls_in_flight_max=1, frame_bytes_max=1024))


def test_the_client_runs_on_anyio_and_imports_no_server_side_layer() -> None:
    package = Path(facetrt.client.__file__).parent
    allowed_internal = {"_errors", "_values", "protocol", "client"}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [(alias.name, 0) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [(node.module or "", node.level)]
            else:
                continue
            for module, level in modules:
                top = module.split(".")[0]
                assert top != "trio", f"{path.name} imports trio"
                if level == 2 or (level == 0 and top == "facetrt"):
                    internal = module.split(".")[1 if level == 0 else 0]
                    assert internal in allowed_internal, f"{path.name} imports {module}"
    names = facetrt.client.__all__
    assert names == sorted(names, key=lambda name: (name[0].islower(), name))
    assert set(names) == {name for name in vars(facetrt.client) if not name.startswith("_")} - {
        "annotations"
    }
