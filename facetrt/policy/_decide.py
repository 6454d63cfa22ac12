"""The egress decision: which rule allows or denies one request, and one destination address.

A request is decided twice, both on the call path and both without I/O:

1. :meth:`CompiledPolicy.decide_request` before anything leaves: scheme, host, port, method
   and path against the allow rules (the first that matches decides; none: ``default-deny``).
2. :meth:`CompiledPolicy.decide_address` for every address the host resolved to (or the IP
   literal): special addresses need an address rule; public ones pass.

Every redirect hop is decided again from step 1. Decisions carry the deciding rule (shown in
``policy_violation`` messages and the audit log) and a reason from a closed set (metrics).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from ._addresses import effective_address, parse_network, special_category

if TYPE_CHECKING:
    from ._addresses import Host, IPAddress, IPNetwork
    from ._model import EgressPolicy

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# The closed set of reasons (metric label values).
REASONS: Final = (
    "allowed",
    "no_rule",
    "scheme",
    "host",
    "path",
    "address",
    "secret",
    "redirects",
    "limit",
    "credentials",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Allowed or not, the rule that decided it, why (a ``REASONS`` value), and a message."""

    allowed: bool
    rule: str
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Allow:
    rule: str
    schemes: frozenset[str]
    exact: str | None  # exact host text, or None for a suffix rule
    suffix: str | None  # ".example.com" for "*.example.com"
    ports: frozenset[int] | None
    methods: frozenset[str] | None
    path_prefix: str

    def matches(self, scheme: str, host: Host, port: int, method: str, path: str) -> bool:
        if scheme not in self.schemes:
            return False
        if self.exact is not None:
            if host.text != self.exact:
                return False
        elif host.is_ip or not host.text.endswith(self.suffix or "\0"):
            return False
        if port not in (self.ports or (DEFAULT_PORTS[scheme],)):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return path.startswith(self.path_prefix)

    def tunnels(self, host: Host, port: int) -> bool:
        """Whether this rule allows a CONNECT tunnel: it must limit neither methods nor
        paths (the proxy cannot see either inside the tunnel)."""
        if self.methods is not None or self.path_prefix != "/":
            return False
        if self.exact is not None:
            if host.text != self.exact:
                return False
        elif host.is_ip or not host.text.endswith(self.suffix or "\0"):
            return False
        ports = self.ports or frozenset(DEFAULT_PORTS[scheme] for scheme in self.schemes)
        return port in ports


@dataclass(frozen=True, slots=True, kw_only=True)
class _Address:
    rule: str
    network: IPNetwork
    ports: frozenset[int] | None


@final
class CompiledPolicy:
    """A validated :class:`EgressPolicy` in the form the call path reads."""

    __slots__ = ("_addresses", "_allow", "policy")

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self._allow = tuple(
            _Allow(
                rule=rule.name or f"allow[{index}]",
                schemes=frozenset(rule.schemes),
                exact=None if rule.host.startswith("*.") else rule.host,
                suffix=rule.host[1:] if rule.host.startswith("*.") else None,
                ports=None if rule.ports is None else frozenset(rule.ports),
                methods=None if rule.methods is None else frozenset(rule.methods),
                path_prefix=rule.path_prefix,
            )
            for index, rule in enumerate(policy.allow)
        )
        self._addresses = tuple(
            _Address(
                rule=rule.name or f"addresses[{index}]",
                network=parse_network(rule.address),
                ports=None if rule.ports is None else frozenset(rule.ports),
            )
            for index, rule in enumerate(policy.addresses)
        )

    def decide_request(
        self, scheme: str, host: Host, port: int, method: str, path: str
    ) -> Decision:
        """Whether a request to ``scheme://host:port`` ``method path`` may leave.

        ``path`` is the URL's path without its query, as sent.
        """
        if scheme not in DEFAULT_PORTS:
            return _deny("scheme", "scheme", f"scheme {scheme!r} is not http or https")
        if not path_is_plain(path):
            return _deny(
                "path-syntax", "path", f"path {path!r} has dot segments (plain or percent-encoded)"
            )
        for rule in self._allow:
            if rule.matches(scheme, host, port, method, path):
                return Decision(allowed=True, rule=rule.rule, reason="allowed")
        return _deny(
            "default-deny",
            "no_rule",
            f"no allow rule matches {method} {scheme}://{host.text}:{port}{path}",
        )

    def decide_connect(self, host: Host, port: int) -> Decision:
        """Whether a CONNECT tunnel to ``host:port`` may be opened (by host and port only)."""
        for rule in self._allow:
            if rule.tunnels(host, port):
                return Decision(allowed=True, rule=rule.rule, reason="allowed")
        return _deny(
            "default-deny",
            "no_rule",
            f"no allow rule allows a tunnel to {host.text}:{port} (a tunnel needs a rule that "
            "limits neither methods nor paths)",
        )

    def decide_address(self, address: IPAddress, port: int) -> Decision:
        """Whether a connection to ``address:port`` may be made (after the request was allowed)."""
        category = special_category(address)
        if category is None:
            return Decision(allowed=True, rule="public-address", reason="allowed")
        target = effective_address(address)
        for rule in self._addresses:
            network = rule.network
            reached = target if target.version == network.version else address
            in_network = reached.version == network.version and reached in network
            if in_network and (rule.ports is None or port in rule.ports):
                return Decision(allowed=True, rule=rule.rule, reason="allowed")
        return _deny(
            f"address:{category}",
            "address",
            f"address {address} is {category.replace('_', '-')} and no address rule allows "
            f"it on port {port}",
        )


def _deny(rule: str, reason: str, message: str) -> Decision:
    return Decision(allowed=False, rule=rule, reason=reason, message=message)


def deny(rule: str, reason: str, message: str) -> Decision:
    """A denial decided outside the policy's rules (secrets, redirects, limits, credentials)."""
    assert reason in REASONS, reason
    return _deny(rule, reason, message)


def path_is_plain(path: str) -> bool:
    """Whether ``path`` has no ``.`` or ``..`` segment, even percent-encoded: a prefix rule
    would otherwise allow ``/v1/%2e%2e/admin``, which servers may read as ``/admin``."""
    decoded = urllib.parse.unquote(path)
    if "\\" in decoded:
        return False  # some servers treat a backslash as a separator
    return not any(segment in (".", "..") for segment in decoded.split("/"))


def canonical_ip(text: str) -> IPAddress:
    """Parse a resolver's answer (``getaddrinfo`` gives canonical text; zones are dropped)."""
    return ipaddress.ip_address(text.split("%", 1)[0])
