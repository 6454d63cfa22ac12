"""The egress policy of a tenant and the node's egress settings, as pydantic models.

A policy is an allow-list; everything else is denied::

    {
      "allow": [
        {"host": "api.openai.com", "methods": ["POST"], "path_prefix": "/v1/"},
        {"name": "docs", "host": "*.example.com", "schemes": ["https", "http"],
         "ports": [443, 8443]}
      ],
      "addresses": [{"address": "10.1.2.0/24", "ports": [8080]}]
    }

- ``allow`` rules say which requests may leave: scheme (default https only), host (an exact
  name, ``*.suffix`` for every name below ``suffix`` but not ``suffix`` itself, or an IP
  literal), ports (default: the scheme's port), methods (default: any) and a path prefix.
- ``addresses`` rules are the only way to reach special addresses (loopback, private,
  link-local, CGNAT, multicast, unspecified, reserved, cloud metadata) once a name is
  resolved or an IP literal is used: an IP or CIDR, optionally limited to ports. IPv4-mapped
  IPv6 forms are read as the IPv4 address they carry.
- ``response_bytes_max`` and ``request_seconds_max`` may lower the node's limits for the tenant.

Validated here (configuration, admin API, CLI); compiled once into :class:`CompiledPolicy`
(``_decide``) for the call path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from .._errors import BadRequestError
from ._addresses import HostError, parse_host, parse_network

MIB: Final = 1024 * 1024
RULES_MAX: Final = 1000
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
RESPONSE_BYTES_LIMIT: Final = 1024 * MIB
REQUEST_SECONDS_LIMIT: Final = 3600.0


def _check_name(value: str | None) -> str | None:
    if value is not None and not _NAME.fullmatch(value):
        raise ValueError("a rule name is 1-64 characters of [A-Za-z0-9._:-], starting alphanumeric")
    return value


def _check_ports(value: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if value is not None and (not value or not all(0 < port < 65536 for port in value)):
        raise ValueError("ports must be a non-empty list of numbers from 1 to 65535")
    return value


RuleName = Annotated[str | None, AfterValidator(_check_name)]
Ports = Annotated[tuple[int, ...] | None, AfterValidator(_check_ports)]


class AllowRule(BaseModel):
    """Requests this rule allows: all of its conditions hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RuleName = Field(None, description="Shown as the deciding rule; default allow[i].")
    host: str = Field(description="Exact host, '*.suffix' (names below suffix) or an IP literal.")
    schemes: tuple[Literal["http", "https"], ...] = Field(("https",), min_length=1, max_length=2)
    ports: Ports = Field(None, description="Default: the scheme's port.")
    methods: tuple[str, ...] | None = Field(None, description="HTTP methods; default: any.")
    path_prefix: str = Field("/", max_length=2048, description="Paths must start with this.")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        wildcard = value.startswith("*.")
        try:
            host = parse_host(value[2:] if wildcard else value)
        except HostError as exc:
            raise ValueError(str(exc)) from None
        if wildcard and host.is_ip:
            raise ValueError("'*.' applies to names, not IP addresses")
        if wildcard and "." not in host.text:
            raise ValueError(f"'*.{host.text}' would match a whole top-level domain")
        return f"*.{host.text}" if wildcard else host.text

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value or not all(_TOKEN.fullmatch(method) for method in value):
            raise ValueError("methods must be a non-empty list of HTTP method names")
        return tuple(method.upper() for method in value)

    @field_validator("path_prefix")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value or not value.isascii():
            raise ValueError("path_prefix must be an ASCII path starting with '/' (no query)")
        return value


class AddressRule(BaseModel):
    """Special addresses (loopback, private, metadata, ...) a connection may reach."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RuleName = Field(None, description="Shown as the deciding rule; default addresses[i].")
    address: str = Field(description="An IP address or CIDR network.")
    ports: Ports = Field(None, description="Default: any port.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(parse_network(value))


class EgressPolicy(BaseModel):
    """One tenant's egress policy: deny by default, these rules allow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: tuple[AllowRule, ...] = Field((), max_length=RULES_MAX)
    addresses: tuple[AddressRule, ...] = Field((), max_length=RULES_MAX)
    response_bytes_max: int | None = Field(
        None, gt=0, le=RESPONSE_BYTES_LIMIT, description="Lowers the node's response limit."
    )
    request_seconds_max: float | None = Field(
        None, gt=0, le=REQUEST_SECONDS_LIMIT, description="Lowers the node's time limit."
    )

    @classmethod
    def parse(cls, data: object) -> EgressPolicy:
        """Validate a policy from JSON (admin API, CLI, system store).

        Raises:
            BadRequestError: unknown field, bad host, port, method, address or limit.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BadRequestError(f"invalid egress policy: {describe(exc)}") from None

    def to_json(self) -> dict[str, object]:
        """The policy as stored and shown: unset fields left out."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)


class EgressConfig(BaseModel):
    """The node's egress settings (``[egress]``): limits, audit log, proxy, default policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_policy: EgressPolicy = Field(
        default_factory=EgressPolicy,
        description="The policy of tenants without their own (default: deny everything).",
    )
    response_bytes_max: int = Field(
        10 * MIB, gt=0, le=RESPONSE_BYTES_LIMIT, description="Largest response body (decoded)."
    )
    request_bytes_max: int = Field(
        10 * MIB, gt=0, le=RESPONSE_BYTES_LIMIT, description="Largest request body."
    )
    request_seconds_max: float = Field(
        30.0,
        gt=0,
        le=REQUEST_SECONDS_LIMIT,
        description="Time one fetch may take (redirects included).",
    )
    redirects_max: int = Field(5, ge=0, le=20, description="Redirect hops one fetch follows.")
    pools_max: int = Field(
        64, gt=0, le=10_000, description="Connection pools kept (one per destination address)."
    )
    connections_per_pool_max: int = Field(
        16, gt=0, le=1000, description="Connections kept open per destination address."
    )
    fetches_in_flight_max: int = Field(
        1024, gt=0, le=100_000, description="Outbound requests at once on the node."
    )
    audit_records_max: int = Field(
        1_000_000, gt=0, le=100_000_000, description="Audit records kept per tenant (oldest go)."
    )
    audit_retention_seconds: float = Field(
        30 * 86_400.0, gt=0, le=3650 * 86_400.0, description="Audit records older than this go."
    )
    audit_pending_max: int = Field(
        4096, gt=0, le=1_000_000, description="Audit writes queued before new attempts wait."
    )
    audit_map_size_bytes: int = Field(
        4096 * MIB, ge=MIB, le=1 << 40, description="LMDB map size of each tenant's audit log."
    )
    audit_open_max: int = Field(
        64, gt=0, le=10_000, description="Tenants' audit logs kept open at once."
    )
    proxy_listen: Annotated[str | None, AfterValidator(check_proxy_listen)] = Field(
        None, description="HOST:PORT of the egress proxy (loopback); unset: no proxy."
    )
    proxy_connections_max: int = Field(
        256, gt=0, le=100_000, description="Open connections to the egress proxy."
    )
    proxy_tunnel_seconds_max: float = Field(
        3600.0, gt=0, le=86_400, description="Longest CONNECT tunnel."
    )
    proxy_credential_seconds: float = Field(
        3600.0, gt=0, le=7 * 86_400, description="Lifetime of a run's proxy credential."
    )
    ca_file: Path | None = Field(
        None, description="PEM bundle of extra CAs trusted for https egress (beside the system's)."
    )


LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def check_proxy_listen(value: str | None) -> str | None:
    """The proxy serves processes on this node only: a loopback HOST:PORT."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or host.strip("[]") not in LOOPBACK_HOSTS:
        raise ValueError(
            f"proxy_listen must be a loopback HOST:PORT (127.0.0.1:7422), got {value!r}"
        )
    return value


def describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'policy'}: {error['msg']}"
        for error in exc.errors()
    )
