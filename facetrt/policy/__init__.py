"""The policy and egress control plane: egress policies, ``self.fetch``, the audit log,
secrets and the egress proxy (SPEC §6)."""

from __future__ import annotations

from ._credentials import Caller as Caller
from ._credentials import ProxyCredential as ProxyCredential
from ._credentials import ProxyCredentials as ProxyCredentials
from ._decide import CompiledPolicy as CompiledPolicy
from ._decide import Decision as Decision
from ._egress import Egress as Egress
from ._egress import EgressStatistics as EgressStatistics
from ._egress import open_egress as open_egress
from ._model import AddressRule as AddressRule
from ._model import AllowRule as AllowRule
from ._model import EgressConfig as EgressConfig
from ._model import EgressPolicy as EgressPolicy
from ._policies import Policies as Policies
from ._proxy import EgressProxy as EgressProxy
from ._redact import RedactingFilter as RedactingFilter
from ._redact import Redactor as Redactor
from ._secrets import NodeKey as NodeKey
from ._secrets import Secret as Secret
from ._secrets import Secrets as Secrets
from ._secrets import secret_listing as secret_listing

__all__ = [
    "AddressRule",
    "AllowRule",
    "Caller",
    "CompiledPolicy",
    "Decision",
    "Egress",
    "EgressConfig",
    "EgressPolicy",
    "EgressProxy",
    "EgressStatistics",
    "NodeKey",
    "Policies",
    "ProxyCredential",
    "ProxyCredentials",
    "RedactingFilter",
    "Redactor",
    "Secret",
    "Secrets",
    "open_egress",
    "secret_listing",
]
