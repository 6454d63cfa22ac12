"""Tenant ids, agent ids and facet addresses: validation and the on-disk path mapping.

Ids never reach the filesystem as text (SPEC §2): a facet's directory is derived from a keyed-free
BLAKE2b hash of the id, fanned out by its first two hex digits so that no directory holds more
than a few thousand entries even with millions of facets::

    <data dir>/tenants/<h(tenant)>/facets/<h(agent)[:2]>/<h(agent)>/{data.mdb,lock.mdb}

``h`` is the 32-hex-digit BLAKE2b-128 digest of the UTF-8 id, prefixed by a domain string so that
tenant and agent hashes never collide with each other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import AddressError

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/-]{1,256}")


def validate_tenant_id(tenant_id: object) -> str:
    """Return ``tenant_id`` if it matches ``^[a-z0-9][a-z0-9_-]{0,62}$``.

    Raises:
        AddressError: the id is not a str or breaks the rule.
    """
    if not isinstance(tenant_id, str) or TENANT_ID_PATTERN.fullmatch(tenant_id) is None:
        raise AddressError(
            f"invalid tenant id {tenant_id!r}: must match [a-z0-9][a-z0-9_-]{{0,62}}"
        )
    return tenant_id


def validate_agent_id(agent_id: object) -> str:
    """Return ``agent_id`` if it is 1-256 chars of ``[A-Za-z0-9._:@/-]`` not starting with / or .

    Raises:
        AddressError: the id is not a str or breaks the rule.
    """
    if (
        not isinstance(agent_id, str)
        or AGENT_ID_PATTERN.fullmatch(agent_id) is None
        or agent_id[0] in "/."
    ):
        raise AddressError(
            f"invalid agent id {agent_id!r}: must be 1-256 chars of [A-Za-z0-9._:@/-], "
            "not starting with '/' or '.'"
        )
    return agent_id


def _digest(domain: bytes, text: str) -> str:
    return hashlib.blake2b(domain + text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class FacetAddress:
    """The durable identity of a facet: ``tenant/agent``.

    Construct through :meth:`parse` or directly with validated ids; the constructor validates.
    """

    tenant_id: str
    agent_id: str
    # Addresses key the router's and supervisor's dicts on every call: hash once, not per
    # lookup (the generated __hash__ builds a tuple each time).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_tenant_id(self.tenant_id)
        validate_agent_id(self.agent_id)
        object.__setattr__(self, "_hash", hash((self.tenant_id, self.agent_id)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[FacetAddress], tuple[str, str]]:
        # Rebuild (and re-hash) on unpickling: str hashes differ between processes.
        return (FacetAddress, (self.tenant_id, self.agent_id))

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.agent_id}"

    def relative_path(self) -> Path:
        """The facet's store directory relative to the data directory (hashes only)."""
        tenant_hash = _digest(b"facetrt-tenant\x00", self.tenant_id)
        agent_hash = _digest(b"facetrt-agent\x00", self.agent_id)
        return Path("tenants", tenant_hash, "facets", agent_hash[:2], agent_hash)
