"""Policies: every tenant's compiled egress policy, replaced at once when the operator sets one.

The daemon loads stored policies from the system store at start and the admin API replaces
them (durably first); the embedded runtime gets them from its caller. A lookup is a dict
access, so a change applies to the very next request, redirects of requests in flight included.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, final

from .._errors import FacetrtError
from .._ids import validate_tenant_id
from ._decide import CompiledPolicy
from ._model import EgressPolicy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..storage import SystemStore

logger = logging.getLogger(__name__)


@final
class Policies:
    """Tenant -> compiled policy, with the node default for tenants without one."""

    def __init__(
        self, default: EgressPolicy | None = None, tenants: Mapping[str, EgressPolicy] | None = None
    ) -> None:
        self._default = CompiledPolicy(default or EgressPolicy())
        self._tenants: dict[str, CompiledPolicy] = {}
        for tenant, policy in (tenants or {}).items():
            self.set(tenant, policy)

    @property
    def default(self) -> EgressPolicy:
        return self._default.policy

    def get(self, tenant: str) -> CompiledPolicy:
        """The policy in force for ``tenant`` (the node default if it has none)."""
        return self._tenants.get(tenant, self._default)

    def own(self, tenant: str) -> EgressPolicy | None:
        """The tenant's own policy, or None when the node default applies."""
        compiled = self._tenants.get(tenant)
        return None if compiled is None else compiled.policy

    def set(self, tenant: str, policy: EgressPolicy | None) -> None:
        """Replace ``tenant``'s policy (None: the node default), in force from the next request.

        Raises:
            AddressError: a malformed tenant id.
        """
        validate_tenant_id(tenant)
        if policy is None:
            self._tenants.pop(tenant, None)
        else:
            self._tenants[tenant] = CompiledPolicy(policy)

    def load(self, system: SystemStore) -> None:
        """Take every tenant's stored policy from the system store (at daemon start).

        A stored policy that no longer validates (a bound tightened by an upgrade) is logged
        and left out: that tenant gets the node default, which denies by default.
        """
        for tenant, stored in system.all_tenant_egress().items():
            try:
                self.set(tenant, EgressPolicy.parse(stored))
            except FacetrtError as exc:
                logger.warning("ignoring the stored egress policy of tenant %s: %s", tenant, exc)
