"""Who makes an outbound request (for policy, secrets and the audit log), and the per-run
credentials of the egress proxy that say it for the processes the runtime starts.

A credential is ``run-<16 hex>`` with a random 256-bit password, kept in memory as a SHA-256
hash (a daemon restart ends every run), bound to a tenant, agent and run, expiring after
``proxy_credential_seconds``; at most ``CREDENTIALS_MAX`` live at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final, final

from .._errors import BadRequestError

CREDENTIALS_MAX: Final = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who makes a request: for the audit log (and the proxy's per-run credentials)."""

    tenant: str
    agent: str | None
    run: str | None
    source: str  # "fetch" or "proxy"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyCredential:
    """One run's credential: put ``url`` in the process's ``HTTP_PROXY``/``HTTPS_PROXY``."""

    username: str
    password: str
    expires: float

    def url(self, host: str, port: int) -> str:
        return f"http://{self.username}:{self.password}@{host}:{port}"


@final
class ProxyCredentials:
    """Per-run proxy credentials, in memory: username -> (hash of the password, caller)."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._issued: dict[str, tuple[bytes, Caller, float]] = {}

    def issue(self, tenant: str, agent: str | None, run: str | None) -> ProxyCredential:
        """A new credential binding requests to ``tenant``/``agent``/``run``.

        Raises:
            BadRequestError: too many live credentials.
        """
        now = time.time()
        for username, (_, _, expires) in list(self._issued.items()):
            if expires <= now:
                del self._issued[username]
        if len(self._issued) >= CREDENTIALS_MAX:
            raise BadRequestError(f"more than {CREDENTIALS_MAX} live proxy credentials")
        username = "run-" + secrets.token_hex(8)
        password = secrets.token_urlsafe(32)
        caller = Caller(tenant=tenant, agent=agent, run=run, source="proxy")
        expires = now + self._seconds
        self._issued[username] = (hashlib.sha256(password.encode()).digest(), caller, expires)
        return ProxyCredential(username=username, password=password, expires=expires)

    def revoke(self, username: str) -> None:
        """End a run's credential (when its process exits)."""
        self._issued.pop(username, None)

    def check(self, header: bytes | None) -> Caller | None:
        """The caller a ``Proxy-Authorization`` value names, or None (missing, wrong, expired)."""
        if header is None:
            return None
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            username, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        entry = self._issued.get(username)
        if entry is None or entry[2] <= time.time():
            return None
        digest = hashlib.sha256(password.encode()).digest()
        return entry[1] if hmac.compare_digest(digest, entry[0]) else None
