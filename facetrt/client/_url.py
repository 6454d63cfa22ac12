"""Server URLs: ``tcp://HOST[:PORT]`` or, for TLS, ``tls://HOST[:PORT]``; port 7420 by default."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .._errors import ConfigError

PORT_DEFAULT = 7420
SCHEMES = ("tcp", "tls")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerUrl:
    host: str
    port: int
    is_tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.is_tls else 'tcp'}://{host}:{self.port}"


def parse_url(url: str) -> ServerUrl:
    """Parse a server URL.

    Raises:
        ConfigError: not ``tcp://`` or ``tls://``, no host, a path or query, or a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"server URL must start with tcp:// or tls://, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"server URL must be SCHEME://HOST[:PORT] only, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in server URL {url!r}") from exc
    if not parts.hostname:
        raise ConfigError(f"server URL has no host: {url!r}")
    return ServerUrl(
        host=parts.hostname,
        port=PORT_DEFAULT if port is None else port,
        is_tls=parts.scheme == "tls",
    )
