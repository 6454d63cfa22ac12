"""Egress: the mediated path of every outbound HTTP request of facets (and of the proxy).

One request, hop by hop (redirects included, at most ``redirects_max``)::

    parse URL ── host refused (numeric spelling, zone, bad name) → denied
      │ decide_request: scheme, host, port, method, path → the first allow rule, or denied
      │ secrets: placeholders substituted only for bound hosts → else denied
      │ resolve once (getaddrinfo; an IP literal is not resolved)
      │ decide_address for every address → a special one without an address rule: denied
      ▼
    audit record (decision, rule, address) fsynced ── only then:
      │ connect to the checked addresses only (PinnedTransport), TLS to the URL's host
      │ response body streamed, cut at response_bytes_max; whole fetch within
      │ request_seconds_max
      ▼
    audit completion (status, bytes, latency, error class) queued
      │ 3xx with Location → next hop: decided again from the top; credentials
      │ (Authorization, Cookie) dropped when the origin changes
      ▼
    FetchResponse with the tenant's secrets redacted from headers and body

A denial is audited (durably, like an attempt) and raised as ``PolicyViolationError`` naming
the deciding rule. Network failures raise :class:`FetchError`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import httpcore
import httpx
import trio

from .._errors import BadRequestError, PolicyViolationError
from .._fetch import FetchError, FetchRequest, FetchResponse
from ._addresses import HostError, parse_host
from ._audit import AuditLog, AuditRecord, AuditStatistics
from ._credentials import Caller, ProxyCredentials
from ._decide import DEFAULT_PORTS, Decision, canonical_ip, deny
from ._decoding import ACCEPT_ENCODING, read_body
from ._model import EgressConfig
from ._policies import Policies
from ._secrets import NodeKey, SecretDenied, Secrets
from ._transport import ADDRESSES, PinnedTransport, resolve, ssl_context

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from ._addresses import Host
    from ._model import EgressPolicy
    from ._redact import Redactor

logger = logging.getLogger(__name__)

REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# Headers facet code may not set: the transport owns framing and the destination.
FORBIDDEN_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Dropped when a redirect leaves the origin (as browsers and httpx do).
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})
# What h11 accepts as a field value, narrowed to ASCII (httpx encodes header values as ASCII).
HEADER_VALUE: Final = re.compile(r"([\x21-\x7e]+([ \t]+[\x21-\x7e]+)*)?")
HEADERS_MAX: Final = 100
HEADER_BYTES_MAX: Final = 16 * 1024
USER_AGENT: Final = "facetrt-egress"


@dataclass(slots=True)
class EgressCounters:
    """Monotonic counters for metrics: attempts by (source, decision, reason), failures by
    kind. No tenant or agent appears in them."""

    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    response_bytes: int = 0

    def decided(self, source: str, decision: Decision) -> None:
        key = (source, "allowed" if decision.allowed else "denied", decision.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressStatistics:
    """A snapshot for metrics: attempts by (source, decision, reason), network failures by
    kind, response bytes handed back, and the audit log's counters."""

    decisions: dict[tuple[str, str, str], int]
    failures: dict[str, int]
    response_bytes: int
    audit: AuditStatistics


@dataclass(frozen=True, slots=True, kw_only=True)
class _Target:
    url: httpx.URL
    scheme: str
    host: Host
    port: int
    path: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host.text, self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawResponse:
    """One hop's response before redaction (the proxy relays it, redacted, as it is)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    url: str


@final
class Egress:
    """The node's egress: policies, secrets, audit log and connection pools.

    Start :meth:`run` in a nursery that outlives every runtime using it; it owns the audit
    writer and closes the pools when cancelled.
    """

    def __init__(
        self,
        config: EgressConfig,
        *,
        data_dir: Path,
        policies: Policies | None = None,
        secrets: Secrets | None = None,
        resolver: Callable[[str, int], Awaitable[list[str]]] = resolve,
    ) -> None:
        self.config = config
        self.policies = policies or Policies(config.default_policy)
        self.secrets = secrets or Secrets()
        self.audit = AuditLog(data_dir, config)
        self.counters = EgressCounters()
        self._resolve = resolver
        self._transport = PinnedTransport(config, ssl_context(config))
        self._client = httpx.AsyncClient(
            transport=self._transport,
            follow_redirects=False,
            trust_env=False,  # never an environment proxy: it would bypass the checked address
            timeout=None,  # the whole fetch is bounded by request_seconds_max instead
            headers={"user-agent": USER_AGENT},
        )
        self._limiter = trio.CapacityLimiter(config.fetches_in_flight_max)
        self.node_key: NodeKey | None = None  # set by the daemon: seals secrets it is given
        # Per-run credentials of the egress proxy (issued to the processes the runtime starts).
        self.proxy_credentials = ProxyCredentials(config.proxy_credential_seconds)

    def statistics(self) -> EgressStatistics:
        counters = self.counters
        return EgressStatistics(
            decisions=dict(counters.decisions),
            failures=dict(counters.failures),
            response_bytes=counters.response_bytes,
            audit=self.audit.statistics(),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: the audit writer; then close the connection pools."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.audit.run)
                task_status.started()
        finally:
            with trio.move_on_after(5, shield=True):
                await self._client.aclose()

    # -- the facet API ---------------------------------------------------------------------

    async def fetch(
        self, request: FetchRequest, *, tenant: str, agent: str, run_id: str
    ) -> FetchResponse:
        """Perform ``request`` for facet ``tenant/agent`` under the tenant's policy.

        Cancellation abandons the request (its audit record is completed ``cancelled``).

        Raises:
            PolicyViolationError: denied (the deciding rule is in the message), or cut by a limit.
            FetchError: the request was allowed but failed on the network.
            BadRequestError: a malformed request (headers, body size).
        """
        caller = Caller(tenant=tenant, agent=agent, run=run_id, source="fetch")
        response = await self.request(caller, request)
        redactor = self.secrets.for_tenant(tenant).redactor
        return FetchResponse(
            status=response.status,
            headers=tuple((name, redactor.header(value)) for name, value in response.headers),
            body=redactor.data(response.body),
            # A redirect's Location is the server's text: it may carry a secret it reflects.
            url=redactor.header(response.url),
        )

    async def request(
        self, caller: Caller, request: FetchRequest, *, follow_redirects: bool = True
    ) -> RawResponse:
        """The mediated request; the response is not yet redacted. Without
        ``follow_redirects`` (the proxy: its client follows them) a 3xx is returned as it is."""
        headers = _check_headers(request.headers)
        body = request.body
        if body is not None and len(body) > self.config.request_bytes_max:
            raise BadRequestError(
                f"request body of {len(body)} bytes is over {self.config.request_bytes_max}"
            )
        policy = self.policies.get(caller.tenant).policy
        seconds = min(self.config.request_seconds_max, policy.request_seconds_max or float("inf"))
        async with self._limiter:
            with trio.move_on_after(seconds) as limit:
                return await self._follow(
                    caller, request.url, request.method, headers, body, limit, follow_redirects
                )
        assert limit.cancelled_caught
        self.counters.decided(caller.source, deny("limit", "limit", ""))
        raise PolicyViolationError(
            f"egress request to {self._safe_url(caller, request.url)} took longer than "
            f"{seconds:g} s (rule limit:request_seconds_max)"
        )

    async def _follow(
        self,
        caller: Caller,
        url_text: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        limit: trio.CancelScope,
        follow_redirects: bool,
    ) -> RawResponse:
        method = method.upper()
        previous: _Target | None = None
        for hop in range(self.config.redirects_max + 1):
            target = await self._target(caller, url_text, method)
            if previous is not None and target.origin != previous.origin:
                headers = [(k, v) for k, v in headers if k.lower() not in CREDENTIAL_HEADERS]
            response = await self._hop(caller, target, method, headers, body, limit)
            location = response.header_location
            if not follow_redirects or response.status not in REDIRECTS or location is None:
                return response.raw
            if hop == self.config.redirects_max:
                break
            url_text = str(target.url.join(location))
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = ("HEAD" if method == "HEAD" else "GET"), None
                headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            previous = target
        decision = deny(
            "limit:redirects_max",
            "redirects",
            f"more than {self.config.redirects_max} redirects",
        )
        raise await self._denied(caller, target, method, decision)

    async def _target(self, caller: Caller, url_text: str, method: str) -> _Target:
        """Parse and check the URL's shape; refusals are audited denials."""
        try:
            url = httpx.URL(url_text)
        except (httpx.InvalidURL, TypeError) as exc:
            # Refused like a denied host (and audited): '0177.0.0.1' ends up here.
            decision = deny("url-syntax", "host", f"the URL does not parse: {exc}")
            raise await self._denied_unparsed(caller, url_text, method, decision) from None
        scheme = url.scheme
        port = url.port or DEFAULT_PORTS.get(scheme, 0)
        path = url.raw_path.decode("ascii", errors="replace").split("?", 1)[0] or "/"
        try:
            host = parse_host(url.raw_host.decode("ascii", errors="replace"))
        except HostError as exc:
            decision = deny("host-syntax", "host", str(exc))
            raise await self._denied_raw(
                caller, scheme, url, port, path, method, decision
            ) from None
        if url.userinfo:
            decision = deny("url-userinfo", "host", "URLs with user information are refused")
            raise await self._denied_raw(caller, scheme, url, port, path, method, decision)
        return _Target(url=url, scheme=scheme, host=host, port=port, path=path)

    async def _hop(
        self,
        caller: Caller,
        target: _Target,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        limit: trio.CancelScope,
    ) -> _HopResponse:
        policy = self.policies.get(caller.tenant)
        decision = policy.decide_request(
            target.scheme, target.host, target.port, method, target.path
        )
        if not decision.allowed:
            raise await self._denied(caller, target, method, decision)
        try:
            secrets = self.secrets.for_tenant(caller.tenant)
            # Facet code never holds a value, so one in the URL came from a server (a
            # redirect reflecting it): it may go on only to a host the secret is bound to.
            secrets.check_url(str(target.url), target.scheme, target.host)
            sent = secrets.substitute(headers, target.scheme, target.host)
        except SecretDenied as denied:
            raise await self._denied(caller, target, method, denied.decision) from None
        addresses = await self._addresses(caller, target, method)
        record = self._record(caller, target, method, decision)
        record.address = addresses[0]
        record.bytes_out = len(body or b"")
        self.counters.decided(caller.source, decision)
        try:
            await self.audit.attempt(record)  # durable before anything leaves
        except trio.Cancelled:
            if record.key:  # queued (it is written anyway): complete it; else never queued
                record.error = "cancelled"  # nothing was sent
                self.audit.complete_nowait(record)
            raise
        started = time.perf_counter()
        failure: FetchError | None = None
        try:
            response = await self._send(target, method, sent, body, addresses, policy.policy)
        except FetchError as exc:
            self._failed(record, exc.kind, started)
            failure = FetchError(secrets.redactor.text(exc.message), kind=exc.kind)
        except BaseException as exc:
            record.error = _error_class(exc)
            if record.error == "cancelled" and limit.cancel_called:
                record.error = "timeout"  # cut by request_seconds_max
            record.latency_seconds = round(time.perf_counter() - started, 6)
            if record.error not in ("cancelled", "policy_violation"):
                self.counters.failed(record.error)
            self.audit.complete_nowait(record)
            raise
        if failure is not None:
            # Raised outside the handler: as its __context__, the unredacted error (and the
            # httpx one under it, which may quote request headers) would reach facet code.
            raise failure
        record.address = response.address
        record.status = response.raw.status
        record.bytes_in = response.bytes_in
        record.latency_seconds = round(time.perf_counter() - started, 6)
        record.error = None
        self.counters.response_bytes += len(response.raw.body)
        self.audit.complete_nowait(record)
        return response

    # -- tunnels (the proxy's CONNECT) ------------------------------------------------------

    async def open_tunnel(
        self, caller: Caller, authority: str, port: int
    ) -> tuple[trio.SocketStream, AuditRecord]:
        """Decide, audit (durably) and connect a CONNECT tunnel to ``authority:port``.

        Tunnels are decided by host and port only, so only allow rules that limit neither
        methods nor paths allow them (``CompiledPolicy.decide_connect``).

        Raises:
            PolicyViolationError: denied. FetchError: the connection failed.
        """
        url = (
            f"https://{authority}:{port}/"
            if ":" not in authority
            else f"https://[{authority}]:{port}/"
        )
        target = await self._target(caller, url, "CONNECT")
        target = _Target(url=target.url, scheme="https", host=target.host, port=port, path="")
        decision = self.policies.get(caller.tenant).decide_connect(target.host, port)
        if not decision.allowed:
            raise await self._denied(caller, target, "CONNECT", decision)
        addresses = await self._addresses(caller, target, "CONNECT")
        record = self._record(caller, target, "CONNECT", decision)
        record.address = addresses[0]
        self.counters.decided(caller.source, decision)
        await self.audit.attempt(record)
        started = time.perf_counter()
        for address in addresses:
            try:
                stream = await trio.open_tcp_stream(address, port)
            except OSError:
                continue
            record.address = address
            return stream, record
        self._failed(record, "connect", started)
        raise FetchError(f"cannot connect to {target.host.text}:{port}", kind="connect")

    def close_tunnel(
        self,
        record: AuditRecord,
        *,
        bytes_out: int,
        bytes_in: int,
        seconds: float,
        error: str | None,
    ) -> None:
        """Complete a tunnel's audit record; never checkpoints."""
        record.bytes_out, record.bytes_in = bytes_out, bytes_in
        record.latency_seconds = round(seconds, 6)
        record.status = 200
        record.error = error
        self.audit.complete_nowait(record)

    def _failed(self, record: AuditRecord, kind: str, started: float) -> None:
        record.error = kind
        record.latency_seconds = round(time.perf_counter() - started, 6)
        self.counters.failed(kind)
        self.audit.complete_nowait(record)

    async def _addresses(self, caller: Caller, target: _Target, method: str) -> list[str]:
        """The checked addresses of the target: all of them must be allowed (a DNS answer
        mixing public and special addresses is denied: a rebinding tell)."""
        host = target.host
        if host.ip is not None:
            answers = [str(host.ip)]
        else:
            try:
                answers = await self._resolve(host.text, target.port)
            except FetchError as exc:
                # An allowed attempt that failed before leaving: audited like any other.
                policy = self.policies.get(caller.tenant)
                decided = policy.decide_request(
                    target.scheme, host, target.port, method, target.path
                )
                record = self._record(caller, target, method, decided)
                record.error = exc.kind
                self.counters.decided(caller.source, decided)
                self.counters.failed(exc.kind)
                await self.audit.attempt(record)
                raise
        policy = self.policies.get(caller.tenant)
        for answer in answers:
            decision = policy.decide_address(canonical_ip(answer), target.port)
            if not decision.allowed:
                raise await self._denied(caller, target, method, decision, address=answer)
        return answers

    async def _send(
        self,
        target: _Target,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        addresses: list[str],
        policy: EgressPolicy,
    ) -> _HopResponse:
        limit = self._response_limit(policy)
        # Egress owns Accept-Encoding: it decodes the body itself (bounded, so it can redact
        # it), and a coding it cannot decode would hand back a body it could not redact.
        headers = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]
        headers.append(("accept-encoding", ACCEPT_ENCODING))
        request = self._client.build_request(
            method,
            target.url,
            headers=headers,
            content=body,
            extensions={ADDRESSES: addresses},
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                body_read = await read_body(response, limit)
            finally:
                await response.aclose()
        except (httpx.TransportError, httpcore.ProtocolError, httpcore.NetworkError) as exc:
            raise _fetch_error(target, exc) from None
        if body_read is None:
            raise PolicyViolationError(
                f"egress response from {target.host.text} is over {limit} bytes "
                "(rule limit:response_bytes_max); the rest was not read"
            )
        location = response.headers.get("location")
        raw = RawResponse(
            status=response.status_code,
            headers=[
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in response.headers.raw
            ],
            body=body_read,
            url=str(target.url),
        )
        return _HopResponse(
            raw=raw,
            header_location=location,
            address=str(response.extensions.get(ADDRESSES, addresses[0])),
            bytes_in=response.num_bytes_downloaded,
        )

    def _response_limit(self, policy: EgressPolicy) -> int:
        own = policy.response_bytes_max
        return min(self.config.response_bytes_max, own or self.config.response_bytes_max)

    # -- denials ---------------------------------------------------------------------------

    def _record(
        self, caller: Caller, target: _Target, method: str, decision: Decision
    ) -> AuditRecord:
        return AuditRecord(
            time=time.time(),
            tenant=caller.tenant,
            agent=caller.agent,
            run=caller.run,
            source=caller.source,
            method=method,
            scheme=target.scheme,
            host=target.host.text,
            port=target.port,
            path=self.secrets.for_tenant(caller.tenant).redactor.text(redact_query(target.url)),
            decision="allowed" if decision.allowed else "denied",
            rule=decision.rule,
            reason=decision.reason,
        )

    async def _denied(
        self,
        caller: Caller,
        target: _Target,
        method: str,
        decision: Decision,
        *,
        address: str | None = None,
    ) -> PolicyViolationError:
        record = self._record(caller, target, method, decision)
        record.address = address
        return await self._audit_denial(caller, record, decision)

    async def _denied_raw(
        self,
        caller: Caller,
        scheme: str,
        url: httpx.URL,
        port: int,
        path: str,
        method: str,
        decision: Decision,
    ) -> PolicyViolationError:
        host = url.raw_host.decode("ascii", errors="replace")[:255]
        record = AuditRecord(
            time=time.time(),
            tenant=caller.tenant,
            agent=caller.agent,
            run=caller.run,
            source=caller.source,
            method=method,
            scheme=scheme,
            host=host,
            port=port,
            path=self.secrets.for_tenant(caller.tenant).redactor.text(redact_query(url)),
            decision="denied",
            rule=decision.rule,
            reason=decision.reason,
        )
        return await self._audit_denial(caller, record, decision)

    async def _denied_unparsed(
        self, caller: Caller, url_text: str, method: str, decision: Decision
    ) -> PolicyViolationError:
        parts = urllib.parse.urlsplit(str(url_text)[:2048])
        record = AuditRecord(
            time=time.time(),
            tenant=caller.tenant,
            agent=caller.agent,
            run=caller.run,
            source=caller.source,
            method=method,
            scheme=parts.scheme[:16],
            host=(parts.hostname or "")[:255],
            port=0,
            path="(unparsed)",
            decision="denied",
            rule=decision.rule,
            reason=decision.reason,
        )
        return await self._audit_denial(caller, record, decision)

    async def _audit_denial(
        self, caller: Caller, record: AuditRecord, decision: Decision
    ) -> PolicyViolationError:
        record.error = "policy_violation"
        self.counters.decided(caller.source, decision)
        await self.audit.attempt(record)
        redactor = self.secrets.for_tenant(caller.tenant).redactor
        where = f"{record.method} {record.scheme}://{record.host}:{record.port}{record.path}"
        return PolicyViolationError(
            redactor.text(f"egress denied by rule {decision.rule}: {decision.message} ({where})")
        )

    def _safe_url(self, caller: Caller, url: str) -> str:
        redactor: Redactor = self.secrets.for_tenant(caller.tenant).redactor
        try:
            return redactor.text(redact_query(httpx.URL(url)))
        except (httpx.InvalidURL, TypeError):
            return "(malformed URL)"


@dataclass(frozen=True, slots=True, kw_only=True)
class _HopResponse:
    raw: RawResponse
    header_location: str | None
    address: str
    bytes_in: int

    @property
    def status(self) -> int:
        return self.raw.status


def redact_query(url: httpx.URL) -> str:
    """``scheme://host:port`` left out: the path with every query value replaced."""
    raw = url.raw_path.decode("ascii", errors="replace")
    path, _, query = raw.partition("?")
    if not query:
        return path or "/"
    pairs = [part.partition("=") for part in query.split("&")]
    return (
        (path or "/")
        + "?"
        + "&".join(f"{name}=[redacted]" if sep else name for name, sep, _ in pairs)
    )


def _check_headers(headers: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Raises: BadRequestError (bad names or values, forbidden names, too many or too big)."""
    if len(headers) > HEADERS_MAX:
        raise BadRequestError(f"more than {HEADERS_MAX} request headers")
    checked: list[tuple[str, str]] = []
    total = 0
    for name, value in headers:
        if not isinstance(name, str) or not isinstance(value, str):
            raise BadRequestError("header names and values must be str")
        lowered = name.lower()
        if not name or not all(
            c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name
        ):
            raise BadRequestError(f"bad header name {name!r}")
        if lowered in FORBIDDEN_HEADERS:
            raise BadRequestError(f"header {name!r} is set by the egress layer, not facet code")
        if not HEADER_VALUE.fullmatch(value):
            # Checked here, before secrets are substituted: a value h11 or httpx refuses later
            # fails with an error that quotes it, with the secret in it (escaped beyond what
            # redaction recognises).
            raise BadRequestError(
                f"header {name!r} must be visible ASCII with spaces or tabs only between words "
                "(no line break, control character or non-ASCII character)"
            )
        total += len(name) + len(value)
        checked.append((name, value))
    if total > HEADER_BYTES_MAX:
        raise BadRequestError(f"request headers over {HEADER_BYTES_MAX} bytes")
    return checked


def _error_class(exc: BaseException) -> str:
    if isinstance(exc, FetchError):
        return exc.kind
    if isinstance(exc, PolicyViolationError):
        return "policy_violation"
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    return "protocol"


def _fetch_error(target: _Target, exc: Exception) -> FetchError:
    text = str(exc) or type(exc).__name__
    kind = "tls" if "SSL" in text or "CERTIFICATE" in text.upper() else "protocol"
    if isinstance(exc, httpx.ConnectError | httpcore.ConnectError) and kind != "tls":
        kind = "connect"
    return FetchError(f"{target.host.text}:{target.port}: {text}", kind=kind)


@contextlib.asynccontextmanager
async def open_egress(
    data_dir: str | Path,
    *,
    config: EgressConfig | None = None,
    policies: Mapping[str, EgressPolicy] | None = None,
    secrets: Secrets | None = None,
    resolver: Callable[[str, int], Awaitable[list[str]]] = resolve,
) -> AsyncIterator[Egress]:
    """An :class:`Egress` for an embedded runtime, running until the block exits.

    ``async with open_egress(data_dir, policies={"acme": policy}) as egress:`` then
    ``open_runtime(data_dir, classes=..., egress=egress)`` inside it. The audit log lives under
    ``data_dir`` like the daemon's; on exit queued audit writes are flushed.

    Args:
        data_dir: the runtime's data directory (audit logs go under each tenant's directory).
        config: limits and the default policy (deny everything by default).
        policies: tenant -> its own policy.
        secrets: opened secrets (tests; the daemon loads sealed ones from its system store).
        resolver: the name resolver (``getaddrinfo`` by default).
    """
    config = config or EgressConfig()
    egress = Egress(
        config,
        data_dir=Path(data_dir),
        policies=Policies(config.default_policy, policies),
        secrets=secrets,
        resolver=resolver,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(egress.run)
        try:
            yield egress
        finally:
            nursery.cancel_scope.cancel()
