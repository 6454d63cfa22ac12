"""What ``await self.fetch(...)`` takes and gives: the request, the response, the failure.

Shared by the runtime (the Facet API) and the policy package (which performs requests), so
neither imports the other.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Final

# Closed set of FetchError kinds (and of the audit log's error classes besides "denied").
FETCH_ERROR_KINDS: Final = ("dns", "connect", "tls", "protocol")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchRequest:
    """One outbound request as facet code asked for it (secrets still as placeholders)."""

    url: str
    method: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchResponse:
    """The answer to ``self.fetch``: final status, headers and body after redirects.

    Secret values of the tenant are already redacted from ``headers`` and ``body``.

    Attributes:
        status: the HTTP status code of the last hop.
        headers: (name, value) pairs in the order received; names lower-case.
        body: the whole body, decoded from any content encoding (gzip, deflate).
        url: the URL of the last hop (after redirects).
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    url: str

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), or ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return default

    @property
    def text(self) -> str:
        """The body as text, in the charset the response names (UTF-8 by default)."""
        charset = "utf-8"
        for part in (self.header("content-type") or "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> object:
        """The body parsed as JSON.

        Raises:
            ValueError: the body is not JSON.
        """
        return json_module.loads(self.body)

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300


class FetchError(Exception):
    """Raised by ``self.fetch`` when an allowed request failed on the network: the name did
    not resolve, the connection or TLS handshake failed, or the peer broke HTTP.

    Not a policy denial (that is :class:`PolicyViolationError`). Uncaught, it reaches the
    caller as ``handler_error`` like any exception of facet code.

    Attributes:
        kind: one of ``dns``, ``connect``, ``tls``, ``protocol``.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        assert kind in FETCH_ERROR_KINDS, kind
        super().__init__(message)
        self.message = message
        self.kind = kind
