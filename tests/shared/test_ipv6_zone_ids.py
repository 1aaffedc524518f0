"""Issue 16, finding 7: an IPv6 zone id is part of an endpoint's text, so it must obey a rule.

Python's ``ipaddress`` accepts any characters after ``%`` (newlines, quotes, escapes). A
gossiped ``[fe80::1%a\\nWARNING x]:9`` therefore became a peer address and, logged, a second
log line. Every place that parses an endpoint goes through the one rule
(:mod:`rustbalance.rules`), so each is checked here with the same hostile values.
"""

from __future__ import annotations

import json

import pytest

from rustbalance.cluster.messages import CoordinationError, check_peer_address
from rustbalance.cluster.peers import load_known_peers
from rustbalance.cluster.wireguard import WireGuardError, WireGuardPeer
from rustbalance.config import parse_endpoint
from rustbalance.deploy.join_token import JoinPayload, JoinTokenError
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.node.join import JoinError, parse_join_answer, parse_join_request
from rustbalance.proxy.settings import ProxyError, parse_target
from rustbalance.tor.control import ControlAddress
from tests.config import ONION_A, problems

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
    (problem,) = problems(coordination={"cluster_token_path": "t", "peers": [endpoint]})
    assert problem.startswith("coordination.peers[0]: ")
    assert "\n" not in problem


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_gossip_and_the_peers_file_refuse_it(endpoint: str) -> None:
    with pytest.raises(CoordinationError):
        check_peer_address(endpoint)
    text = json.dumps({"version": 1, "peers": [{"node_id": "evil", "address": endpoint}]})
    with pytest.raises(CoordinationError):
        load_known_peers(text)


def _request(wg_endpoint: str) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "node_id": "joiner",
            "cluster_token": "t" * 40,
            "wg_public_key": WG_KEY,
            "wg_endpoint": wg_endpoint,
            "coordination_port": 51821,
            "request_time": 1_700_000_000,
        }
    ).encode()


def _answer(coordination: str) -> bytes:
    peer = {
        "node_id": "node-b",
        "coordination": coordination,
        "wg_public_key": WG_KEY,
        "wg_endpoint": "203.0.113.9:51820",
        "tunnel_address": "10.99.0.3",
    }
    return json.dumps(
        {
            "v": 1,
            "responder_node_id": "node-a",
            "tunnel_address": "10.99.0.2",
            "tunnel_network": "10.99.0.0/24",
            "peers": [peer],
        }
    ).encode()


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_join_requests_and_answers_refuse_it(endpoint: str) -> None:
    # The valid forms parse, so the refusal below is the endpoint's.
    assert parse_join_request(_request("203.0.113.5:51820")).wg_endpoint == "203.0.113.5:51820"
    assert parse_join_answer(_answer("10.99.0.3:51821")).peers[0].coordination == (
        "10.99.0.3:51821"
    )
    with pytest.raises(JoinError) as info:
        parse_join_request(_request(endpoint))
    assert "\n" not in str(info.value)
    with pytest.raises(JoinError):
        parse_join_answer(_answer(endpoint))


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_wireguard_peers_refuse_it_as_endpoint_and_as_tunnel_ip(endpoint: str) -> None:
    assert WireGuardPeer(WG_KEY, "fd00::2", "[fe80::1%eth0]:51820").endpoint
    with pytest.raises(WireGuardError):
        WireGuardPeer(WG_KEY, "10.99.0.2", endpoint)
    tunnel_ip = endpoint.removeprefix("[").removesuffix("]:9")
    with pytest.raises(WireGuardError):
        WireGuardPeer(WG_KEY, tunnel_ip, None)


@pytest.mark.parametrize("endpoint", HOSTILE, ids=IDS)
def test_join_token_seed_peers_refuse_it(endpoint: str) -> None:
    def payload(peer: str) -> JoinPayload:
        return JoinPayload.issue(
            master_onion=ONION_A,
            cluster_token="c" * 43,
            join_secret="s" * 43,
            seed_peers=(peer,),
            issuer_node_id="node-a",
            now=1_700_000_000,
        )

    assert payload("10.0.0.1:51821").seed_peers == ("10.0.0.1:51821",)
    with pytest.raises(JoinTokenError):
        payload(endpoint)


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
