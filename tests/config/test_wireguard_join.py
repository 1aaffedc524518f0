"""The [wireguard] and [join] sections: defaults, and every mistake named with its key."""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.config import parse, problems

WG = {
    "private_key_path": "/etc/rustbalance/wireguard.key",
    "address": "10.99.0.1/24",
    "endpoint": "203.0.113.5:51820",
}
JOIN = {"enabled": True}


def _join(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {"wireguard": dict(WG), "join": dict(JOIN)}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


def test_defaults_are_off_and_documented_values() -> None:
    config = parse()
    wg, join = config.wireguard, config.join
    assert (wg.enabled, wg.interface, wg.listen_port, wg.mode) == (
        False,
        "wg-rb",
        51820,
        "auto",
    )
    assert wg.private_key_path is None and wg.address is None and wg.endpoint is None
    assert (join.enabled, join.tunnel_network) == (False, None)


def test_network_follows_address() -> None:
    config = parse(node={"state_dir": "/srv/rb"}, wireguard={"address": "10.5.0.9/22"})
    assert config.join.tunnel_network == ipaddress.IPv4Network("10.5.0.0/22")


def test_protocol_v2_keys_name_the_upgrade() -> None:
    """Issue 16: the cluster token, the join secret and the mesh peers file are gone; a v2
    config gets one clear problem per key, naming the command that upgrades it."""
    hint = (
        "removed with protocol v3 (per-node identities, docs/security.md); run "
        "'rustbalance cluster upgrade --config FILE' on this node"
    )
    assert problems(
        coordination={"cluster_token_path": "cluster.token"},
        wireguard={"peers_path": "p.json"},
        join={"secret_path": "join.secret"},
    ) == (
        f"coordination.cluster_token_path: {hint}",
        f"wireguard.peers_path: {hint}",
        f"join.secret_path: {hint}",
    )


def test_a_complete_join_config_parses_with_relative_paths_resolved() -> None:
    config = parse(**_join(wireguard={"mode": "userspace", "enabled": True}))
    assert config.join.enabled and config.wireguard.enabled
    assert str(config.wireguard.address) == "10.99.0.1/24"
    assert str(config.wireguard.endpoint) == "203.0.113.5:51820"
    assert config.wireguard.mode == "userspace"
    assert str(config.join.tunnel_network) == "10.99.0.0/24"


def test_enabled_wireguard_needs_key_and_address() -> None:
    assert problems(wireguard={"enabled": True}) == (
        "wireguard.private_key_path: is required when wireguard.enabled = true",
        "wireguard.address: is required when wireguard.enabled = true",
    )


def test_join_needs_the_master_key_its_identity_http_and_a_reachable_listen() -> None:
    found = problems(join={"enabled": True}, proxy={"mode": "tcp"})
    assert found == (
        "wireguard.private_key_path: is required when join.enabled = true",
        "wireguard.address: is required when join.enabled = true",
        "wireguard.endpoint: is required when join.enabled = true",
        "proxy.mode: must be 'http' when join.enabled = true, got 'tcp'",
    )
    # Admitting a node is signing its record with the master key (issue 16).
    keyless = problems(
        **_join(
            node={"identity_mode": "instance", "publisher_eligible": False},
            master={"identity_key_path": None, "onion_address": None},
        )
    )
    assert any(p.startswith("join.enabled: only a node holding the master key") for p in keyless)
    wildcard = problems(**_join(coordination={"listen": "0.0.0.0:51821"}))
    assert len(wildcard) == 1 and wildcard[0].startswith(
        "coordination.listen: 0.0.0.0:51821 is a wildcard address"
    )
    # An advertised address is what joiners get: then a wildcard listen is fine.
    advertised = _join(coordination={"listen": "0.0.0.0:51821", "advertise": "10.99.0.1:51821"})
    assert parse(**advertised).join.enabled


def test_bad_values_are_named() -> None:
    assert problems(wireguard={"address": "10.99.0.1"}) == (
        "wireguard.address: must be an IPv4 address with its network's prefix, such as "
        "'10.99.0.1/24', got '10.99.0.1'",
    )
    assert problems(wireguard={"address": "10.99.0.0/24"}) == (
        "wireguard.address: 10.99.0.0 is the network or broadcast address of 10.99.0.0/24",
    )
    assert problems(wireguard={"address": "fd00::1/64"})[0].startswith("wireguard.address: must")
    assert problems(wireguard={"interface": "a-name-far-too-long"}) == (
        "wireguard.interface: must be 1-15 characters of A-Z a-z 0-9 _ = + . -, "
        "got 'a-name-far-too-long'",
    )
    assert problems(wireguard={"interface": "wg 0"})[0].startswith("wireguard.interface:")
    assert problems(wireguard={"mode": "fast"}) == (
        "wireguard.mode: must be 'auto' or 'kernel' or 'userspace', got 'fast'",
    )
    assert problems(wireguard={"listen_port": 0}) == (
        "wireguard.listen_port: must be 1..65535, got 0",
    )
    assert problems(wireguard={"endpoint": "nowhere"})[0].startswith("wireguard.endpoint:")
    assert problems(join={"enabled": "yes"}) == (
        "join.enabled: must be true or false, got string 'yes'",
    )


def test_tunnel_network_rules() -> None:
    assert problems(join={"tunnel_network": "10.99.0.0/16"}) == (
        "join.tunnel_network: must be a /20 to /30 network, got '10.99.0.0/16'",
    )
    assert problems(join={"tunnel_network": "10.99.0.1/24"}) == (
        "join.tunnel_network: must be an IPv4 network such as '10.99.0.0/24', got '10.99.0.1/24'",
    )
    assert problems(
        wireguard={"address": "10.98.0.1/24"}, join={"tunnel_network": "10.99.0.0/24"}
    ) == (
        "join.tunnel_network: 10.99.0.0/24 does not contain this node's wireguard.address "
        "10.98.0.1",
    )


def test_unknown_keys_stay_errors() -> None:
    assert problems(join={"secret": "inline-secret-value"})[0].startswith(
        "join.secret: unknown key"
    )
    assert problems(wireguard={"private_key": "abc"}) == (
        "wireguard.private_key: unknown key (did you mean 'private_key_path'?)",
    )
