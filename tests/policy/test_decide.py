"""The egress policy model and its decisions, without I/O: hosts, rules, special addresses."""

from __future__ import annotations

import ipaddress

import pytest

from facetrt import BadRequestError
from facetrt.policy import CompiledPolicy, EgressPolicy
from facetrt.policy._addresses import HostError, parse_host, special_category

POLICY = EgressPolicy.parse(
    {
        "allow": [
            {"host": "api.example.com", "methods": ["post"], "path_prefix": "/v1/"},
            {"name": "docs", "host": "*.docs.example.org", "schemes": ["http", "https"]},
            {"host": "127.0.0.1", "schemes": ["http"], "ports": [8080]},
            {"host": "localhost", "schemes": ["http"], "ports": [8080, 8081]},
        ],
        "addresses": [
            {"name": "local-api", "address": "127.0.0.1", "ports": [8080]},
            {"address": "::ffff:10.0.0.0/104"},
        ],
    }
)
COMPILED = CompiledPolicy(POLICY)


def decide(url_scheme: str, host: str, port: int, method: str = "GET", path: str = "/") -> str:
    decision = COMPILED.decide_request(url_scheme, parse_host(host), port, method, path)
    return decision.rule if decision.allowed else f"denied:{decision.rule}"


def test_the_first_matching_allow_rule_decides_and_everything_else_is_denied() -> None:
    assert decide("https", "api.example.com", 443, "POST", "/v1/chat") == "allow[0]"
    assert decide("https", "API.example.com.", 443, "POST", "/v1/x") == "allow[0]"
    assert decide("https", "api.example.com", 443, "GET", "/v1/chat") == "denied:default-deny"
    assert decide("https", "api.example.com", 443, "POST", "/v2/chat") == "denied:default-deny"
    assert decide("http", "api.example.com", 80, "POST", "/v1/chat") == "denied:default-deny"
    assert decide("https", "api.example.com", 8443, "POST", "/v1/chat") == "denied:default-deny"
    assert decide("https", "evil.example.com", 443, "POST", "/v1/chat") == "denied:default-deny"
    assert decide("ftp", "api.example.com", 21) == "denied:scheme"


def test_a_suffix_rule_matches_names_below_it_but_not_itself_or_lookalikes() -> None:
    assert decide("https", "a.docs.example.org", 443) == "docs"
    assert decide("http", "a.b.docs.example.org", 80) == "docs"
    assert decide("https", "docs.example.org", 443) == "denied:default-deny"
    assert decide("https", "evildocs.example.org", 443) == "denied:default-deny"
    assert decide("https", "docs.example.org.evil.com", 443) == "denied:default-deny"


def test_encoded_dot_segments_cannot_escape_a_path_prefix() -> None:
    for path in ("/v1/../admin", "/v1/%2e%2e/admin", "/v1/%2E./admin", "/v1/.%2e", "/v1\\..\\a"):
        assert decide("https", "api.example.com", 443, "POST", path) == "denied:path-syntax"


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "127.0.1", "017700000001"],
)
def test_numeric_spellings_other_than_dotted_decimal_are_refused(host: str) -> None:
    with pytest.raises(HostError, match="numeric address spelling"):
        parse_host(host)


def test_hosts_are_canonical() -> None:
    assert parse_host("[::FFFF:127.0.0.1]").ip == ipaddress.ip_address("::ffff:7f00:1")
    assert parse_host("Example.COM.").text == "example.com"
    assert parse_host("127.0.0.1.").text == "127.0.0.1"
    for bad in ("", "[fe80::1%25eth0]", "a..b", "-a.com", "a" * 64 + ".com", "ex ample.com"):
        with pytest.raises(HostError):
            parse_host(bad)


SPECIAL = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",
    "::127.0.0.1": "loopback",  # IPv4-compatible
    "64:ff9b::7f00:1": "loopback",  # NAT64
    "2002:7f00:1::": "loopback",  # 6to4
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "fd12::1": "private",
    "::ffff:192.168.0.1": "private",
    "169.254.1.1": "link_local",
    "fe80::1": "link_local",
    "100.64.0.1": "cgnat",
    "100.127.255.254": "cgnat",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "169.254.169.254": "metadata",
    "::ffff:169.254.169.254": "metadata",
    "fd00:ec2::254": "metadata",
    "100.100.100.200": "metadata",
    "255.255.255.255": "reserved",
    "2001:db8::1": "reserved",
    "64:ff9b:1::a9fe:a9fe": "reserved",  # local-use NAT64: 169.254.169.254 inside
}


@pytest.mark.parametrize(("address", "category"), sorted(SPECIAL.items()))
def test_special_addresses_are_classified_in_every_form(address: str, category: str) -> None:
    assert special_category(ipaddress.ip_address(address)) == category
    decision = CompiledPolicy(EgressPolicy()).decide_address(ipaddress.ip_address(address), 443)
    assert not decision.allowed
    assert decision.rule == f"address:{category}"
    assert decision.reason == "address"


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "172.32.0.1"])
def test_public_addresses_pass(address: str) -> None:
    assert special_category(ipaddress.ip_address(address)) is None
    assert COMPILED.decide_address(ipaddress.ip_address(address), 443).allowed


def test_address_rules_are_the_only_way_to_special_addresses_and_bind_ports() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    assert COMPILED.decide_address(loopback, 8080).rule == "local-api"
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert COMPILED.decide_address(mapped, 8080).rule == "local-api"
    assert not COMPILED.decide_address(loopback, 8081).allowed
    assert not COMPILED.decide_address(ipaddress.ip_address("127.0.0.2"), 8080).allowed
    # "::ffff:10.0.0.0/104" was read as 10.0.0.0/8.
    assert COMPILED.decide_address(ipaddress.ip_address("10.9.9.9"), 1).rule == "addresses[1]"
    assert POLICY.addresses[1].address == "10.0.0.0/8"


@pytest.mark.parametrize(
    "bad",
    [
        {"allow": [{"host": "*.com"}]},
        {"allow": [{"host": "*.10.0.0.1"}]},
        {"allow": [{"host": "2130706433"}]},
        {"allow": [{"host": "a.com", "ports": [0]}]},
        {"allow": [{"host": "a.com", "ports": []}]},
        {"allow": [{"host": "a.com", "methods": ["GET POST"]}]},
        {"allow": [{"host": "a.com", "schemes": ["ftp"]}]},
        {"allow": [{"host": "a.com", "path_prefix": "v1"}]},
        {"allow": [{"host": "a.com", "name": "has space"}]},
        {"allow": [{"host": "a.com", "extra": 1}]},
        {"addresses": [{"address": "10.0.0.1/8"}]},
        {"addresses": [{"address": "localhost"}]},
        {"response_bytes_max": 0},
        {"allow": "a.com"},
    ],
)
def test_invalid_policies_are_refused_with_the_field_named(bad: object) -> None:
    with pytest.raises(BadRequestError, match="invalid egress policy"):
        EgressPolicy.parse(bad)


def test_a_policy_round_trips_through_its_json_form() -> None:
    assert EgressPolicy.parse(POLICY.to_json()) == POLICY
    assert EgressPolicy.parse({}).to_json() == {"allow": [], "addresses": []}
