"""Secrets: stored sealed per tenant, bound to hosts, substituted into headers at egress only.

Sealing (decision 0014). A secret is encrypted with AES-256-GCM (``cryptography``)
under the node key, a random 32-byte key in ``<data dir>/node.key`` (mode 0600, created on
first use like ``admin.key``), with a random 96-bit nonce per write and the tenant and name as
associated data, so a sealed record moved to another tenant or name does not open. The system
store holds only sealed records; the daemon keeps the opened values in memory to substitute
and redact them. Back up ``node.key`` apart from the data: without it the sealed secrets of a
backup cannot be opened.

Use. Facet code (or a tool through the proxy) writes ``{{secret:NAME}}`` in a header value.
The egress layer replaces it with the value only when the request's host matches one of the
secret's bound hosts (exact, or ``*.suffix``) and the scheme is https (or the secret allows
http, meant for loopback tests); otherwise the request is denied ``policy_violation`` and
nothing is sent. Values never flow back: every sink passes through the tenant's redactor.
"""

from __future__ import annotations

import base64
import os
import re
import secrets as random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import BadRequestError, ConfigError
from ..storage import fsync_dir, write_private_file
from ._addresses import HostError, parse_host
from ._decide import Decision, deny
from ._redact import Redactor

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from ..storage import SystemStore
    from ._addresses import Host

NODE_KEY_FILE: Final = "node.key"
PLACEHOLDER: Final = re.compile(r"\{\{secret:([A-Za-z0-9_.-]{1,64})\}\}")
SECRET_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SECRET_VALUE: Final = re.compile(r"[\x21-\x7e]+( +[\x21-\x7e]+)*")
VALUE_BYTES_MIN: Final = 8  # shorter values would redact common text
VALUE_BYTES_MAX: Final = 8192
HOSTS_MAX: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Secret:
    """An opened secret: its value and where it may be sent."""

    name: str
    value: str
    hosts: tuple[str, ...]
    allow_http: bool

    def is_bound_to(self, scheme: str, host: Host) -> bool:
        if scheme != "https" and not self.allow_http:
            return False
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if not host.is_ip and host.text.endswith(pattern[1:]):
                    return True
            elif host.text == pattern:
                return True
        return False


class SecretDenied(Exception):
    """A placeholder names a missing secret, or one not bound to the request's host."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


@final
class TenantSecrets:
    """One tenant's opened secrets and its redactor."""

    __slots__ = ("_secrets", "redactor")

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self._secrets = {secret.name: secret for secret in secrets}
        self.redactor = Redactor({s.name: s.value.encode() for s in self._secrets.values()})

    def names(self) -> list[str]:
        return sorted(self._secrets)

    def substitute(
        self, headers: Iterable[tuple[str, str]], scheme: str, host: Host
    ) -> list[tuple[str, str]]:
        """``headers`` with every placeholder replaced by its secret's value.

        Raises:
            SecretDenied: an unknown secret, or one not bound to ``scheme://host``.
        """
        out: list[tuple[str, str]] = []
        for name, value in headers:
            if "{{secret:" in value:
                value = PLACEHOLDER.sub(lambda m: self._value(m[1], scheme, host), value)
            out.append((name, value))
        return out

    def check_url(self, url: str, scheme: str, host: Host) -> None:
        """Deny a URL that carries a secret's value (any form) to a host it is not bound to.

        Raises:
            SecretDenied: a value of a secret not bound to ``scheme://host`` is in ``url``.
        """
        for name in self.redactor.names_in(url.encode()):
            if not self._secrets[name].is_bound_to(scheme, host):
                raise SecretDenied(
                    deny(
                        f"secret:{name}",
                        "secret",
                        f"the URL carries secret {name!r}, which is not bound to "
                        f"{scheme}://{host.text}",
                    )
                )

    def _value(self, name: str, scheme: str, host: Host) -> str:
        secret = self._secrets.get(name)
        if secret is None:
            raise SecretDenied(
                deny(f"secret:{name}", "secret", f"the tenant has no secret {name!r}")
            )
        if not secret.is_bound_to(scheme, host):
            raise SecretDenied(
                deny(
                    f"secret:{name}",
                    "secret",
                    f"secret {name!r} is not bound to {scheme}://{host.text}",
                )
            )
        if not SECRET_VALUE.fullmatch(secret.value):
            # Sealed before values were checked: sending it would fail with an error quoting it.
            raise SecretDenied(
                deny(
                    f"secret:{name}",
                    "secret",
                    f"secret {name!r} has a value that cannot go in a header; set it again",
                )
            )
        return secret.value


EMPTY: Final = TenantSecrets()


@final
class Secrets:
    """Every tenant's opened secrets on this node, and the node-wide redactor for logs."""

    def __init__(self, tenants: Mapping[str, Iterable[Secret]] | None = None) -> None:
        self._tenants: dict[str, TenantSecrets] = {}
        self._all = Redactor()
        for tenant, secrets in (tenants or {}).items():
            self._tenants[tenant] = TenantSecrets(secrets)
        self._rebuild()

    def for_tenant(self, tenant: str) -> TenantSecrets:
        return self._tenants.get(tenant, EMPTY)

    def redactor(self) -> Redactor:
        """Every tenant's secret values: for sinks that are not one tenant's (logs)."""
        return self._all

    def set_tenant(self, tenant: str, secrets: Iterable[Secret]) -> None:
        opened = TenantSecrets(secrets)
        if opened.names():
            self._tenants[tenant] = opened
        else:
            self._tenants.pop(tenant, None)
        self._rebuild()

    def _rebuild(self) -> None:
        values: dict[str, bytes] = {}
        for tenant, opened in self._tenants.items():
            for name in opened.names():
                values[f"{tenant}/{name}"] = opened._secrets[name].value.encode()
        self._all = Redactor(values)

    def load(self, system: SystemStore, key: NodeKey) -> None:
        """Open every tenant's sealed secrets from the system store (at daemon start).

        Raises:
            ConfigError: a record does not open with this node key (wrong ``node.key``).
        """
        by_tenant: dict[str, list[Secret]] = {}
        for (tenant, name), record in system.secrets().items():
            by_tenant.setdefault(tenant, []).append(key.open(tenant, name, record))
        for tenant, found in by_tenant.items():
            self._tenants[tenant] = TenantSecrets(found)
        self._rebuild()

    def reload_tenant(self, system: SystemStore, key: NodeKey, tenant: str) -> None:
        """Re-open ``tenant``'s secrets after a change (admin API)."""
        found = [key.open(t, name, record) for (t, name), record in system.secrets(tenant).items()]
        self.set_tenant(tenant, found)


@final
class NodeKey:
    """The node's AES-256-GCM key that seals secrets at rest."""

    def __init__(self, key: bytes) -> None:
        assert len(key) == 32
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, data_dir: Path, *, sealed: int = 0) -> NodeKey:
        """Read ``<data dir>/node.key``, creating it on first use: a fresh temporary file
        (mode 0600) fsynced, renamed, and the directory fsynced before the key seals anything
        (a rename lost to a power failure would leave every secret sealed since unreadable).

        Args:
            sealed: how many sealed secrets the system store holds. A missing key file is
                then an error, not a reason to create another key that opens none of them.

        Raises:
            ConfigError: the file exists but is not a node key, or is missing while secrets
                sealed with it exist.
        """
        path = data_dir / NODE_KEY_FILE
        if not path.exists():
            if sealed:
                raise ConfigError(
                    f"the node key {str(path)!r} is missing, and {sealed} secret(s) are sealed "
                    "with it: put the file back (from your copy of it), or delete the secrets"
                )
            data_dir.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            write_private_file(temporary, base64.b64encode(random.token_bytes(32)) + b"\n")
            os.replace(temporary, path)
            fsync_dir(data_dir)
        try:
            key = base64.b64decode(path.read_bytes().strip(), validate=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the node key {str(path)!r}: {exc}") from None
        if len(key) != 32:
            raise ConfigError(f"{str(path)!r} is not a node key (32 bytes, base64)")
        return cls(key)

    def seal(
        self, tenant: str, name: str, value: str, hosts: Iterable[str], *, allow_http: bool
    ) -> dict[str, object]:
        """A sealed record for the system store; validates everything first.

        Raises:
            BadRequestError: bad name, value (length, control characters) or host patterns.
        """
        check_name(name)
        encoded = value.encode()
        if not VALUE_BYTES_MIN <= len(encoded) <= VALUE_BYTES_MAX:
            raise BadRequestError(
                f"a secret value is {VALUE_BYTES_MIN} to {VALUE_BYTES_MAX} bytes long"
            )
        if not SECRET_VALUE.fullmatch(value):
            # It goes into a header value: anything h11 or httpx refuses there would fail the
            # request with an error quoting the value.
            raise BadRequestError(
                "a secret value must be visible ASCII (spaces only between words; no control "
                "characters such as CR or LF)"
            )
        nonce = random.token_bytes(12)
        ciphertext = self._aead.encrypt(nonce, encoded, _associated(tenant, name))
        return {
            "hosts": check_hosts(hosts),
            "allow_http": bool(allow_http),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ciphertext).decode(),
            "created": time.time(),
        }

    def open(self, tenant: str, name: str, record: Mapping[str, Any]) -> Secret:
        """Raises: ConfigError (the record does not open with this key, or is malformed)."""
        try:
            nonce = base64.b64decode(record["nonce"])
            ciphertext = base64.b64decode(record["ciphertext"])
            value = self._aead.decrypt(nonce, ciphertext, _associated(tenant, name)).decode()
            hosts = tuple(str(host) for host in record["hosts"])
        except (InvalidTag, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"secret {name!r} of tenant {tenant!r} does not open with this node key "
                f"({type(exc).__name__}); is node.key the one it was sealed with?"
            ) from None
        return Secret(
            name=name, value=value, hosts=hosts, allow_http=bool(record.get("allow_http"))
        )


def _associated(tenant: str, name: str) -> bytes:
    return f"facetrt-secret\0{tenant}\0{name}".encode()


def check_name(name: str) -> str:
    """Raises: BadRequestError."""
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise BadRequestError("a secret name is 1-64 characters of [A-Za-z0-9_.-]")
    return name


def check_hosts(hosts: Iterable[str]) -> list[str]:
    """Bound host patterns: exact names or IP literals, or ``*.suffix``.

    Raises:
        BadRequestError: none, too many, or a bad pattern.
    """
    checked: list[str] = []
    for pattern in hosts:
        wildcard = isinstance(pattern, str) and pattern.startswith("*.")
        try:
            host = parse_host(pattern[2:] if wildcard else pattern)
        except (HostError, TypeError, AttributeError):
            raise BadRequestError(f"bad bound host {pattern!r}") from None
        if wildcard and (host.is_ip or "." not in host.text):
            raise BadRequestError(f"bad bound host {pattern!r}")
        checked.append(f"*.{host.text}" if wildcard else host.text)
    if not 0 < len(checked) <= HOSTS_MAX:
        raise BadRequestError(f"a secret is bound to 1 to {HOSTS_MAX} hosts")
    return checked


def secret_listing(system: SystemStore, tenant: str) -> list[dict[str, object]]:
    """What operators see of a tenant's secrets: names and bound hosts, never values."""
    return [
        {
            "name": name,
            "hosts": list(record.get("hosts", [])),
            "allow_http": bool(record.get("allow_http")),
            "created": record.get("created"),
        }
        for (_, name), record in sorted(system.secrets(tenant).items())
    ]
