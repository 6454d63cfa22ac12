"""Host and address classification for egress: what a URL's host is, and which addresses are
special (loopback, private, link-local, CGNAT, multicast, unspecified, cloud metadata, ...).

Rules (decision 0014):

- A host is either a DNS name or a canonical IP literal (dotted-quad IPv4 without leading
  zeros, or a bracketed IPv6 address without a zone). Every other numeric spelling that some
  resolver would read as an address (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``) is
  refused rather than normalised: a name whose last label is numeric is never a real DNS name,
  and refusing leaves no spelling for a second parser to read differently.
- An IPv6 address that embeds an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
  ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is judged by the IPv4 address it
  carries, so no IPv6 spelling reaches an IPv4 range the policy denies.
- Special ranges are denied after resolution unless an address rule names them explicitly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Most specific first: the first network containing an address names its category.
_SPECIAL: Final[tuple[tuple[str, str], ...]] = (
    # Cloud metadata services (AWS, GCP, Azure, OpenStack; ECS task metadata; Alibaba; Oracle).
    ("169.254.169.254/32", "metadata"),
    ("169.254.170.2/32", "metadata"),
    ("100.100.100.200/32", "metadata"),
    ("192.0.0.192/32", "metadata"),
    ("fd00:ec2::254/128", "metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("169.254.0.0/16", "link_local"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "reserved"),
    ("198.18.0.0/15", "reserved"),
    ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255 (broadcast)
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link_local"),
    ("fec0::/10", "private"),  # deprecated site-local
    ("fc00::/7", "private"),  # unique local addresses
    ("ff00::/8", "multicast"),
    ("100::/64", "reserved"),  # discard-only
    # Local-use NAT64 (RFC 8215): a site's translator reaches the IPv4 address inside, at a
    # position the prefix length decides, so no IPv4 range could be checked: all reserved.
    ("64:ff9b:1::/48", "reserved"),
    ("2001::/32", "reserved"),  # Teredo: an obfuscated IPv4 address inside
    ("2001:db8::/32", "reserved"),  # documentation
)
SPECIAL_NETWORKS: Final[tuple[tuple[IPNetwork, str], ...]] = tuple(
    (ipaddress.ip_network(network), category) for network, category in _SPECIAL
)
# The closed set of categories (metric labels, messages).
CATEGORIES: Final = frozenset(category for _, category in _SPECIAL)

_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR: Final = ipaddress.IPv6Network("2002::/16")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_LABEL: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL: Final = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
HOST_BYTES_MAX: Final = 253


class HostError(ValueError):
    """A URL host that egress refuses to interpret (a non-canonical address, a bad name)."""


@dataclass(frozen=True, slots=True)
class Host:
    """A checked host: a lower-case ASCII DNS name, or an IP literal (``ip`` set)."""

    text: str
    ip: IPAddress | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None


def parse_host(raw: str) -> Host:
    """The canonical form of a URL host (IDNA-encoded already, as httpx gives it).

    Raises:
        HostError: empty, too long, a zone id, a non-canonical numeric spelling, bad labels.
    """
    text = raw.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        raise HostError("the URL has no host")
    if ":" in text:
        if "%" in text:
            raise HostError(f"IPv6 zone ids are refused: {raw!r}")
        try:
            ip6 = ipaddress.IPv6Address(text)
        except ValueError:
            raise HostError(f"not an IPv6 address: {raw!r}") from None
        return Host(str(ip6), ip6)
    if text.endswith("."):
        text = text[:-1]  # the root label: same name
    try:
        ip4 = ipaddress.IPv4Address(text)  # strict: four decimal parts, no leading zeros
    except ValueError:
        pass
    else:
        return Host(str(ip4), ip4)
    labels = text.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise HostError(
            f"host {raw!r} is a numeric address spelling other than dotted decimal "
            "(decimal, octal, hex or short forms are refused; write a.b.c.d)"
        )
    if len(text) > HOST_BYTES_MAX or not text.isascii():
        raise HostError(f"host name {raw!r} is too long or not ASCII (IDNA-encode it)")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise HostError(f"host name {raw!r} has an invalid label {label!r}")
    return Host(text)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), if any."""
    mapped = address.ipv4_mapped
    if mapped is not None:
        return mapped
    if address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    six_to_four = address.sixtofour
    if six_to_four is not None:
        return six_to_four
    return None


def effective_address(address: IPAddress) -> IPAddress:
    """The address a connection really reaches: the embedded IPv4 address, if there is one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return inner
    return address


def special_category(address: IPAddress) -> str | None:
    """The special range ``address`` falls in (see ``CATEGORIES``), or None if public."""
    target = effective_address(address)
    for network, category in SPECIAL_NETWORKS:
        if target.version == network.version and target in network:
            return category
    return None


def parse_network(text: str) -> IPNetwork:
    """An address rule's network: an IP or CIDR; an IPv4-mapped IPv6 form becomes IPv4.

    Raises:
        ValueError: not an address or network (host bits set count as an error).
    """
    network = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        inner = network.network_address.ipv4_mapped
        if inner is not None:
            return ipaddress.IPv4Network((int(inner), network.prefixlen - 96))
    return network
