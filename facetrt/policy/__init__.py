"""The policy and egress control plane: egress policies, ``self.fetch``, the audit log,
secrets and the egress proxy (SPEC §6)."""

from __future__ import annotations

from ._decide import CompiledPolicy as CompiledPolicy
from ._decide import Decision as Decision
from ._model import AddressRule as AddressRule
from ._model import AllowRule as AllowRule
from ._model import EgressConfig as EgressConfig
from ._model import EgressPolicy as EgressPolicy
from ._policies import Policies as Policies

__all__ = [
    "AddressRule",
    "AllowRule",
    "CompiledPolicy",
    "Decision",
    "EgressConfig",
    "EgressPolicy",
    "Policies",
]
