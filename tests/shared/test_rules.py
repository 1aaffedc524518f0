"""The shared value rules of :mod:`rustbalance.rules`: each accepts exactly its language."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.errors import ConfigError, RuleError
from rustbalance.rules import (
    NODE_ID_RULE,
    Endpoint,
    is_interface_name,
    is_node_id,
    node_id_from,
    parse_endpoint,
    parse_host,
    parse_ip_address,
    parse_tunnel_network,
)
from tests.budget import budget
from tests.config import ONION_A

NODE_ID_CHARS = set(string.ascii_letters + string.digits + "._-")


def test_rule_errors_are_config_errors_for_the_callers_that_catch_those() -> None:
    assert issubclass(RuleError, ConfigError)


@pytest.mark.parametrize("value", ["a", "node-1", "A.b_c-9", "x" * 64])
def test_node_ids_that_follow_the_rule(value: str) -> None:
    assert is_node_id(value)


@pytest.mark.parametrize("value", ["", "x" * 65, "node a", "nöde", "a\n", "a/b", 7, None])
def test_node_ids_that_break_it(value: object) -> None:
    assert not is_node_id(value)


def test_the_rule_text_names_every_allowed_character() -> None:
    assert NODE_ID_RULE == "1-64 characters of A-Z a-z 0-9 . _ -"


@settings(max_examples=budget(200), deadline=None)
@given(st.text(max_size=80))
def test_node_id_is_exactly_the_ascii_alphabet_of_1_to_64(value: str) -> None:
    assert is_node_id(value) == (1 <= len(value) <= 64 and set(value) <= NODE_ID_CHARS)


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("web-1.example", "web-1.example"),
        ("höst name", "h-st-name"),
        ("--", ""),
        ("x" * 80, "x" * 64),
    ],
)
def test_node_id_from_a_host_name(hostname: str, expected: str) -> None:
    assert node_id_from(hostname) == expected
    assert expected == "" or is_node_id(expected)


@pytest.mark.parametrize("value", ["wg-rb", "eth0", "a=b+c.d_e", "x" * 15, "1"])
def test_interface_names(value: str) -> None:
    assert is_interface_name(value)


@pytest.mark.parametrize("value", ["", "x" * 16, "wg 0", "a/b", "a:b", "a%b", 'a"', None])
def test_not_interface_names(value: object) -> None:
    assert not is_interface_name(value)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:80", "127.0.0.1", 80),
        ("[::1]:65535", "::1", 65535),
        ("[FE80::1%eth0]:9", "fe80::1%eth0", 9),
        ("App.Example:1", "app.example", 1),
        (f"{ONION_A.upper()}:443", ONION_A, 443),
    ],
)
def test_endpoints_come_back_canonical(text: str, host: str, port: int) -> None:
    endpoint = parse_endpoint(text, allow_onion=True)
    assert endpoint == Endpoint(host=host, port=port)
    assert parse_endpoint(str(endpoint), allow_onion=True) == endpoint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "'127.0.0.1' must be 'HOST:PORT'"),
        ("::1:80", "an IPv6 address needs brackets"),
        ("[::1:80", "must be '[IPv6]:PORT'"),
        ("[::g]:80", "'[::g]' is not a valid IPv6 address"),
        ("h:0", "'h:0': port must be 1-65535, got 0"),
        ("h:²", "port '²' is not a number"),
        (f"{ONION_A}:80", "onion addresses are not allowed here"),
        ("[fe80::1%a b]:1", "an IPv6 zone id must be 1-15 characters"),
    ],
)
def test_bad_endpoints_say_why(text: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_endpoint(text)
    assert message in str(info.value)


def test_port_zero_only_where_allowed() -> None:
    assert parse_endpoint("127.0.0.1:0", allow_port_zero=True).port == 0


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=60))
def test_an_accepted_endpoint_prints_as_plain_ascii(text: str) -> None:
    """Whatever a peer sends, an address that passes prints on one line, without quotes."""
    try:
        endpoint = parse_endpoint(text)
    except RuleError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)
        return
    shown = str(endpoint)
    assert shown.isascii() and shown.isprintable()
    assert not set(shown) & set(" \t\"'\\")


@settings(max_examples=budget(200), deadline=None)
@given(
    st.ip_addresses(v=6),
    st.text(alphabet=string.ascii_letters + string.digits + "_=+.-", min_size=1, max_size=15),
    st.integers(1, 65535),
)
def test_interface_zone_ids_round_trip(
    address: ipaddress.IPv6Address, zone: str, port: int
) -> None:
    endpoint = parse_endpoint(f"[{address}%{zone}]:{port}")
    assert endpoint.host == f"{address}%{zone}"
    assert parse_endpoint(str(endpoint)) == endpoint


def test_ip_addresses_with_and_without_zones() -> None:
    assert parse_ip_address("10.99.0.1") == ipaddress.IPv4Address("10.99.0.1")
    assert str(parse_ip_address("fe80::1%wg0")) == "fe80::1%wg0"
    with pytest.raises(RuleError, match="zone id is not allowed here"):
        parse_ip_address("fe80::1%wg0", allow_zone=False)
    with pytest.raises(RuleError, match="not a valid IP address"):
        parse_ip_address("10.99.0.300")


def test_hosts() -> None:
    assert parse_host("[::1]", allow_onion=False) == "::1"
    assert parse_host("Example.COM.", allow_onion=False) == "example.com."
    for bad in ("300.1.1.1", "bad_host", "", "a" * 254):
        with pytest.raises(RuleError):
            parse_host(bad, allow_onion=False)


@pytest.mark.parametrize(("text", "prefix"), [("10.99.0.0/24", 24), ("10.0.0.0/20", 20)])
def test_tunnel_networks(text: str, prefix: int) -> None:
    assert parse_tunnel_network(text).prefixlen == prefix


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.99.0.1/24", "must be an IPv4 network such as '10.99.0.0/24', got '10.99.0.1/24'"),
        ("10.99.0.0/16", "must be a /20 to /30 network, got '10.99.0.0/16'"),
        ("10.99.0.0", "must be a /20 to /30 network, got '10.99.0.0'"),
        ("10.99.0.0/31", "must be a /20 to /30 network"),
        ("fd00::/64", "must be an IPv4 network"),
    ],
)
def test_bad_tunnel_networks(text: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_tunnel_network(text)
    assert message in str(info.value)
