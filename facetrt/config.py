"""Settings of the embedded runtime, as pydantic models (configuration only, never the hot path).

Every field has a default, a unit suffix and bounds: an unbounded queue or buffer is a bug.
"""

from __future__ import annotations

import tomllib
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1024 * 1024


class RuntimeConfig(BaseModel):
    """Limits and timings of the runtime that hosts facets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mailbox_envelopes_max: int = Field(
        1024, gt=0, le=1_000_000, description="Messages queued per facet before `overloaded`."
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
        1024 * MIB, ge=64 * 1024, le=1 << 40, description="Map size a store may grow to."
    )
    commit_threads: int = Field(
        32, gt=0, le=256, description="Writer threads that open, commit and close stores."
    )
    commit_queue_max: int = Field(
        65_536, gt=0, le=10_000_000, description="Store jobs queued for the writer threads."
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
