"""A real HTTP server on loopback standing in for external APIs (hypercorn + a tiny ASGI app).

Routes::

    /echo            200 JSON {"method", "path", "query", "headers": {name: value}, "body"};
                     headers x-echo-authorization (as received) and x-echo-base64 (of it)
    /redirect        302 (or ?status=) to ?to=
    /redirect-auth   302 to [?base]/echo?auth=<the Authorization received> (a reflecting API)
    /big?bytes=N     200 with N bytes, streamed in 64 KiB chunks
    /gzip            200, gzip-encoded "hello " * 1000
    /bomb?bytes=N&layers=L  200, N zero bytes gzip-encoded L times (a few KiB on the wire)
    /bad-gzip        200, "content-encoding: gzip" over bytes that are not gzip
    /hang            never answers (until the server stops)
    /big-then-hang?bytes=N  200 with N bytes, then the body never ends
    /status/N        status N, empty body
    anything else    200 "ok"

Every request that reaches the server is recorded in ``Upstream.requests`` (method, path), so
a test can assert that a denied request was never sent.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import ipaddress
import json
import urllib.parse
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import hypercorn.trio
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from facetrt.server._http import hypercorn_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from hypercorn.typing import ASGIFramework


@dataclass
class Upstream:
    port: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Any],
        send: Callable[[dict[str, Any]], Any],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
        self.requests.append((scope["method"], path))
        received = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
        self.headers.append(received)
        self.arrived.set()

        async def answer(status: int, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        if path == "/echo":
            headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
            echoed = {
                "method": scope["method"],
                "path": path,
                "query": query,
                "headers": headers,
                "body": body.decode(errors="replace"),
            }
            auth = received.get("authorization", "").encode("latin-1")
            reply_headers = [
                (b"content-type", b"application/json"),
                (b"x-echo-authorization", auth),
                (b"x-echo-base64", base64.b64encode(auth)),
            ]
            await answer(200, json.dumps(echoed).encode(), reply_headers)
        elif path == "/redirect":
            status = int(query.get("status", "302"))
            await answer(status, b"", [(b"location", query["to"].encode())])
        elif path == "/big":
            size = int(query["bytes"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while size > 0:
                chunk = min(size, 65536)
                size -= chunk
                await send({"type": "http.response.body", "body": b"x" * chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/redirect-auth":
            auth = urllib.parse.urlencode({"auth": received.get("authorization", "")})
            target = query.get("base", "") + "/echo?" + auth
            await answer(302, b"", [(b"location", target.encode())])
        elif path == "/bomb":
            layers = int(query.get("layers", "1"))
            encoding = ", ".join(["gzip"] * layers).encode()
            await answer(
                200, gzip_bomb(int(query["bytes"]), layers), [(b"content-encoding", encoding)]
            )
        elif path == "/bad-gzip":
            await answer(200, b"not gzip at all", [(b"content-encoding", b"gzip")])
        elif path == "/gzip":
            await answer(200, gzip.compress(b"hello " * 1000), [(b"content-encoding", b"gzip")])
        elif path == "/big-then-hang":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            payload = b"x" * int(query["bytes"])
            await send({"type": "http.response.body", "body": payload, "more_body": True})
            await trio.sleep_forever()
        elif path == "/hang":
            await trio.sleep_forever()
        elif path.startswith("/status/"):
            await answer(int(path.rsplit("/", 1)[1]), b"", [])
        else:
            await answer(200, b"ok", [(b"content-type", b"text/plain")])


def gzip_bomb(size: int, layers: int) -> bytes:
    """``size`` zero bytes gzip-compressed ``layers`` times, built without holding them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [
        compressor.compress(block[: min(len(block), size - done)])
        for done in range(0, size, len(block))
    ]
    data = b"".join(parts) + compressor.flush()
    for _ in range(layers - 1):
        data = gzip.compress(data, compresslevel=9)
    return data


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).

    The test trusts it through ``EgressConfig(ca_file=cert)``, as an operator would a private CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "facetrt test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.asynccontextmanager
async def serve_upstream(tls: tuple[Path, Path] | None = None) -> AsyncIterator[Upstream]:
    """Serve an :class:`Upstream` on 127.0.0.1 (https with ``tls``: (cert, key) files)."""
    upstream = Upstream()
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        config = hypercorn_config("127.0.0.1:0")
        if tls is not None:
            config.certfile, config.keyfile = str(tls[0]), str(tls[1])
        app = cast("ASGIFramework", upstream)
        serve = partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown.wait)
        binds = await nursery.start(serve)
        upstream.port = int(binds[0].rpartition(":")[2])
        try:
            yield upstream
        finally:
            shutdown.set()
            nursery.cancel_scope.cancel()
