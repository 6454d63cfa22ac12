"""Settings of the embedded runtime, as pydantic models (configuration only, never the hot path).

Every field has a default, a unit suffix and bounds: an unbounded queue or buffer is a bug.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._errors import BadRequestError, ConfigError
from .policy._model import EgressConfig

if TYPE_CHECKING:
    from collections.abc import Mapping

MIB = 1024 * 1024
FRAME_OVERHEAD_BYTES = 64 * 1024
# Upper bounds shared by the node defaults and the per-tenant quotas that override them.
MAILBOX_ENVELOPES_LIMIT = 1_000_000
MAP_SIZE_BYTES_MIN = 64 * 1024
MAP_SIZE_BYTES_LIMIT = 1 << 40
FACETS_LIMIT = 1 << 32
CALLS_PER_SECOND_LIMIT = 10_000_000.0
CALLS_BURST_LIMIT = 10_000_000
CALLS_IN_FLIGHT_LIMIT = 1_000_000


class RuntimeConfig(BaseModel):
    """Limits and timings of the runtime that hosts facets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mailbox_envelopes_max: int = Field(
        1024,
        gt=0,
        le=MAILBOX_ENVELOPES_LIMIT,
        description="Messages queued per facet before `overloaded` (every tenant's default "
        "mailbox quota).",
    )
    mailbox_age_seconds_max: float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="A facet whose oldest queued message waited longer sheds new ones with "
        "`overloaded`.",
    )
    batch_envelopes_max: int = Field(
        1024,
        gt=0,
        le=100_000,
        description="Messages one activation takes from its mailbox per wake.",
    )
    open_facets_max: int = Field(
        1000, gt=0, le=1_000_000, description="Activations (open LMDB environments) per node."
    )
    activation_wait_seconds_max: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Time a new activation waits for an open slot before `overloaded`.",
    )
    idle_timeout_seconds: float = Field(
        60.0, gt=0, le=86_400, description="An activation with no work passivates after this."
    )
    value_bytes_max: int = Field(
        MIB, gt=0, le=64 * MIB, description="Largest encoded value, argument list or result."
    )
    map_size_bytes_initial: int = Field(
        4 * MIB, ge=64 * 1024, le=1 << 40, description="LMDB map size of a new facet store."
    )
    map_size_bytes_max: int = Field(
        1024 * MIB,
        ge=MAP_SIZE_BYTES_MIN,
        le=MAP_SIZE_BYTES_LIMIT,
        description="Map size a store may grow to (every tenant's default bytes-per-facet quota).",
    )
    commit_threads: int = Field(
        32, gt=0, le=256, description="Writer threads that open, commit and close stores."
    )
    commit_inline_when_idle: bool = Field(
        True,
        description="Commit on the loop thread when nothing else is runnable and no other "
        "commit is in flight: saves two thread hops and a loop wake-up per idle call. A "
        "commit of several messages only while one tenant alone has been submitting for a "
        "second (decision 0009).",
    )
    commit_queue_max: int = Field(
        65_536,
        gt=0,
        le=10_000_000,
        description="Store jobs in flight before opens, closes and data operations wait "
        "(commits are bounded by open facets: one in flight each).",
    )
    idempotency_retention_seconds: float = Field(
        86_400.0, gt=0, le=90 * 86_400, description="How long a stored idempotent result lives."
    )
    idempotency_key_bytes_max: int = Field(
        256, gt=0, le=511, description="Longest idempotency key (UTF-8 bytes)."
    )
    call_depth_max: int = Field(
        16, gt=0, le=1024, description="Most facet-to-facet hops in one call chain."
    )
    deactivate_seconds_max: float = Field(
        5.0, gt=0, le=3600, description="Time `on_deactivate` may take before it is cut short."
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, le=3600, description="Time queued work may drain on close before it fails."
    )
    tenant_facets_max: int = Field(
        1_000_000,
        gt=0,
        le=FACETS_LIMIT,
        description="Facets one tenant may have on this node (default quota) before "
        "`quota_exceeded`.",
    )
    tenant_calls_per_second: float | None = Field(
        None,
        gt=0,
        le=CALLS_PER_SECOND_LIMIT,
        description="Calls per second one tenant may send from outside (default quota; a token "
        "bucket); unset: no rate limit.",
    )
    tenant_calls_burst: int | None = Field(
        None,
        gt=0,
        le=CALLS_BURST_LIMIT,
        description="Calls a tenant may send at once above its rate (default quota); unset: "
        "one second's worth.",
    )
    tenant_calls_in_flight_max: int | None = Field(
        None,
        gt=0,
        le=CALLS_IN_FLIGHT_LIMIT,
        description="Calls one tenant may have in flight from outside, across all its "
        "connections (default quota); at the bound its connections stop being read until "
        "replies go out (backpressure, nothing refused). Unset: only the per-connection bound.",
    )
    timers_per_facet_max: int = Field(
        10_000, gt=0, le=1_000_000, description="Timers (scheduled or failed) one facet may hold."
    )
    timer_name_bytes_max: int = Field(
        256, gt=0, le=511, description="Longest timer name (UTF-8 bytes)."
    )
    timer_payload_bytes_max: int = Field(
        64 * 1024, gt=0, le=64 * MIB, description="Largest encoded timer payload."
    )
    timer_retries_max: int = Field(
        6, ge=0, le=100, description="Retries of a failing `on_timer` before the timer is failed."
    )
    timer_retry_seconds_initial: float = Field(
        2.0, gt=0, le=86_400, description="Delay before the first retry; doubles per retry."
    )
    timer_fires_per_wake_max: int = Field(
        1024, gt=0, le=100_000, description="Due timers one facet runs per wake-up."
    )
    timer_wakes_in_flight_max: int = Field(
        1024, gt=0, le=1_000_000, description="Facets the timer scheduler wakes at once."
    )
    timer_index_map_size_bytes: int = Field(
        4096 * MIB, ge=1 * MIB, le=1 << 40, description="LMDB map size of the node's timer index."
    )


class TenantQuotaSettings(BaseModel):
    """One tenant's quota overrides, as the operator sets them (admin API, CLI).

    A field left unset (None) follows the node default in :class:`RuntimeConfig`
    (``tenant_facets_max``, ``map_size_bytes_max``, ``mailbox_envelopes_max``,
    ``tenant_calls_per_second``, ``tenant_calls_burst``, ``tenant_calls_in_flight_max``).
    Stored with the tenant's record in the system store; validated here, never on the call
    path.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    facets_max: int | None = Field(
        None, gt=0, le=FACETS_LIMIT, description="Facets the tenant may have on this node."
    )
    facet_bytes_max: int | None = Field(
        None,
        ge=MAP_SIZE_BYTES_MIN,
        le=MAP_SIZE_BYTES_LIMIT,
        description="LMDB map size each of its facets may grow to.",
    )
    mailbox_envelopes_max: int | None = Field(
        None, gt=0, le=MAILBOX_ENVELOPES_LIMIT, description="Messages queued per facet."
    )
    calls_per_second: float | None = Field(
        None, gt=0, le=CALLS_PER_SECOND_LIMIT, description="Sustained calls per second."
    )
    calls_burst: int | None = Field(
        None, gt=0, le=CALLS_BURST_LIMIT, description="Calls at once above the rate."
    )
    calls_in_flight_max: int | None = Field(
        None,
        gt=0,
        le=CALLS_IN_FLIGHT_LIMIT,
        description="Calls in flight at once, across its connections (backpressure).",
    )

    def overrides(self) -> dict[str, object]:
        """The fields that are set, for storage and display."""
        return {name: value for name, value in self.model_dump().items() if value is not None}

    @classmethod
    def parse(cls, data: object) -> TenantQuotaSettings:
        """Validate overrides from JSON (the admin API, the system store).

        Raises:
            BadRequestError: unknown field or a value out of bounds.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'quotas'}: {error['msg']}"
                for error in exc.errors()
            )
            raise BadRequestError(f"invalid quotas: {details}") from None


class ServerConfig(BaseModel):
    """The daemon's network surfaces and their limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:7420", description="HOST:PORT of the msgpack TCP protocol.")
    http: str | None = Field(
        "127.0.0.1:7421", description="HOST:PORT of the HTTP gateway; empty disables it."
    )
    connections_max: int = Field(
        1024,
        gt=0,
        le=1_000_000,
        description="Open TCP connections; more are refused with `overloaded` and closed.",
    )
    calls_in_flight_max: int = Field(
        256, gt=0, le=100_000, description="Calls in flight per connection before reads pause."
    )
    frame_bytes_max: int = Field(
        4 * MIB, ge=1024, le=256 * MIB, description="Largest frame body either way."
    )
    handshake_seconds: float = Field(10.0, gt=0, le=600, description="Time to send `hello`.")
    frame_seconds: float = Field(
        30.0, gt=0, le=3600, description="Time to finish a frame once its first byte arrived."
    )
    http_connections_max: int = Field(
        1024,
        gt=0,
        le=1_000_000,
        description="Open HTTP connections; more are answered 429 `overloaded` and closed.",
    )
    http_keep_alive_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="An HTTP connection without a request for this long is closed; a "
        "request's head must arrive within it.",
    )
    http_body_bytes_max: int = Field(
        4 * MIB, ge=1024, le=256 * MIB, description="Largest HTTP request body."
    )
    auth_failures_free: int = Field(
        5, ge=0, le=1000, description="Failed authentications per peer before slowing down."
    )
    auth_delay_seconds_max: float = Field(
        5.0, ge=0, le=60, description="Longest delay imposed after repeated auth failures."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate: enables TLS on TCP.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")


EXAMPLE_CLASSES = {
    "Counter": "facetrt.examples:Counter",
    "AgentMemory": "facetrt.examples:AgentMemory",
}


class DaemonConfig(BaseModel):
    """Everything `facetrt serve` needs; every field has a working default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(Path("facetrt-data"), description="Where all state lives.")
    classes: dict[str, str] = Field(
        default_factory=lambda: dict(EXAMPLE_CLASSES),
        description="Facet class name -> 'module:attribute'.",
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    egress: EgressConfig = Field(default_factory=EgressConfig)

    @model_validator(mode="after")
    def _frames_carry_values(self) -> DaemonConfig:
        # A result or argument of value_bytes_max must fit in one frame with its envelope.
        needed = self.runtime.value_bytes_max + FRAME_OVERHEAD_BYTES
        if self.server.frame_bytes_max < needed:
            raise ValueError(
                f"server.frame_bytes_max ({self.server.frame_bytes_max}) must be at least "
                f"runtime.value_bytes_max + {FRAME_OVERHEAD_BYTES} ({needed})"
            )
        return self


def load_daemon_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> DaemonConfig:
    """Load settings: defaults < TOML file < ``FACETRT_*`` environment < ``overrides`` (flags).

    Environment variables name a field by its path, sections joined with ``__``:
    ``FACETRT_DATA_DIR``, ``FACETRT_SERVER__LISTEN``, ``FACETRT_RUNTIME__IDLE_TIMEOUT_SECONDS``.
    Values are parsed as TOML values when they parse (numbers, booleans), else taken as text.

    Raises:
        ConfigError: unreadable file, bad TOML or invalid settings.
    """
    data: dict[str, object] = {}
    try:
        if path is not None:
            data = tomllib.loads(path.read_text())
        for name, raw in (environ or {}).items():
            if not name.startswith("FACETRT_") or name == "FACETRT_CONFIG":
                continue
            parts = name.removeprefix("FACETRT_").lower().split("__")
            _set_path(data, parts, _parse_scalar(raw))
        for dotted, value in (overrides or {}).items():
            if value is not None:
                _set_path(data, dotted.split("."), value)
        return DaemonConfig.model_validate(data)
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
        where = f" {str(path)!r}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from exc


def _parse_scalar(raw: str) -> object:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_path(data: dict[str, object], parts: list[str], value: object) -> None:
    for part in parts[:-1]:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"setting {'.'.join(parts)!r} conflicts with a value")
        data = child
    data[parts[-1]] = value


def load_runtime_config(path: Path) -> RuntimeConfig:
    """Load a TOML file whose ``[runtime]`` table holds :class:`RuntimeConfig` fields.

    Raises:
        ConfigError: unreadable file, bad TOML or invalid settings.
    """
    try:
        data = tomllib.loads(path.read_text())
        return RuntimeConfig.model_validate(data.get("runtime", {}))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"invalid configuration {str(path)!r}: {exc}") from exc
