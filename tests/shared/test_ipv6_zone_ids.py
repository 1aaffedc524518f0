"""Issue 16, finding 7: an IPv6 zone id is part of an endpoint's text, so it must obey a rule.

Python's ``ipaddress`` accepts any characters after ``%`` (newlines, quotes, escapes). A
gossiped ``[fe80::1%a\\nWARNING x]:9`` therefore became a peer address and, logged, a second
log line. Every place that parses an endpoint goes through the one rule
(:mod:`rustbalance.rules`), so each is checked here with the same hostile values. Since
protocol v3 (per-node identities) a node learns other nodes' addresses only from master-signed
admission records (in hellos, membership messages, join answers and the members file), and a
join token carries no address at all.
"""

from __future__ import annotations

import json

import pytest

from rustbalance.cluster.authority import DOMAIN, WireGuardIdentity, decode_statement
from rustbalance.cluster.messages import CoordinationError, check_peer_address
from rustbalance.cluster.wireguard import WireGuardError, WireGuardPeer
from rustbalance.config import parse_endpoint
from rustbalance.deploy.join_token import JoinTokenError
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.node.join import JoinError, JoinRequest, parse_join_request
from rustbalance.proxy.settings import ProxyError, parse_target
from rustbalance.tor.control import ControlAddress
from tests.config import problems
from tests.trust import MASTER, grant, node_key, record, wg_key

# Zone ids that would forge a log line, close a quoted string or inject a terminal escape.
HOSTILE_ZONES = [
    "a\nWARNING x",
    "eth0\r\nx",
    'a"b',
    "a'b",
    "a b",
    "a\\b",
    "\x1b[31m",
    "a\x00",
    "",
    "a%b",
    "x" * 16,
]
HOSTILE = [f"[fe80::1%{zone}]:9" for zone in HOSTILE_ZONES]
IDS = [repr(zone) for zone in HOSTILE_ZONES]
WG_KEY = "A" * 43 + "="
GRANT_SECRET = b"\x05" * 32


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_the_rule_refuses_a_hostile_zone_id(endpoint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint(endpoint)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)


@pytest.mark.parametrize("zone", ["eth0", "wg-rb", "1", "br0.10", "veth_a=b+c"])
def test_an_interface_zone_id_stays_valid(zone: str) -> None:
    endpoint = parse_endpoint(f"[fe80::1%{zone}]:9")
    assert str(endpoint) == f"[fe80::1%{zone}]:9"


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_config_refuses_it_on_one_line(endpoint: str) -> None:
    (problem,) = problems(coordination={"peers": [endpoint]})
    assert problem.startswith("coordination.peers[0]: ")
    assert "\n" not in problem


def _field(text: str) -> bytes:
    """A string as the statement encoding writes it: len(u8) || UTF-8."""
    raw = text.encode("utf-8")
    return bytes([len(raw)]) + raw


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_admission_records_refuse_it(endpoint: str) -> None:
    """The only way an address reaches another node: a master-signed record. The record
    refuses to hold it, and a correctly signed record whose bytes carry it is refused."""
    with pytest.raises(CoordinationError):
        check_peer_address(endpoint)
    with pytest.raises(CoordinationError):
        record("evil", coordination=endpoint)
    with pytest.raises(CoordinationError):
        WireGuardIdentity(wg_key("evil"), endpoint, "10.99.0.3")
    valid = record("evil", coordination="10.99.0.3:51821")
    body = valid.body()
    assert body.count(_field("10.99.0.3:51821")) == 1
    forged = body.replace(_field("10.99.0.3:51821"), _field(endpoint))
    kind = bytes([valid.kind])
    signature = MASTER.sign(DOMAIN + kind + forged)
    assert decode_statement(kind + body + MASTER.sign(DOMAIN + kind + body), MASTER.public_key)
    with pytest.raises(CoordinationError) as info:
        decode_statement(kind + forged + signature, MASTER.public_key)
    assert "\n" not in str(info.value)


def _request(wg_endpoint: str) -> bytes:
    """A signed join request (node/join.py) whose ``wg_endpoint`` is replaced afterwards."""
    key = node_key("joiner")
    request = JoinRequest(
        node_id="joiner",
        node_key=key.public,
        wg_public_key=wg_key("joiner"),
        wg_endpoint="203.0.113.5:51820",
        coordination_port=51821,
        priority=10,
        request_time=1_700_000_000,
        grant=grant(GRANT_SECRET).data,
        grant_secret=GRANT_SECRET,
    )
    obj = json.loads(request.to_json(key))
    obj["wg_endpoint"] = wg_endpoint
    return json.dumps(obj).encode()


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_join_requests_refuse_it(endpoint: str) -> None:
    # The valid form parses, so the refusal below is the endpoint's.
    assert parse_join_request(_request("203.0.113.5:51820"))[0].wg_endpoint == ("203.0.113.5:51820")
    with pytest.raises(JoinError) as info:
        parse_join_request(_request(endpoint))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_wireguard_peers_refuse_it_as_endpoint_and_as_tunnel_ip(endpoint: str) -> None:
    assert WireGuardPeer(WG_KEY, "fd00::2", "[fe80::1%eth0]:51820").endpoint
    with pytest.raises(WireGuardError):
        WireGuardPeer(WG_KEY, "10.99.0.2", endpoint)
    tunnel_ip = endpoint.removeprefix("[").removesuffix("]:9")
    with pytest.raises(WireGuardError):
        WireGuardPeer(WG_KEY, tunnel_ip, None)


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_tor_control_address_and_proxy_target_refuse_it(endpoint: str) -> None:
    assert str(ControlAddress.parse("[::1]:9051")) == "[::1]:9051"
    with pytest.raises(ConfigError):
        ControlAddress.parse(endpoint)
    assert parse_target("[::1]:80").host == "::1"
    with pytest.raises(ProxyError):
        parse_target(endpoint)


def test_every_refusal_is_a_project_error() -> None:
    # The types above are the layers' own; none lets a ValueError escape.
    for error in (CoordinationError, JoinError, WireGuardError, JoinTokenError, ProxyError):
        assert issubclass(error, RustBalanceError)
