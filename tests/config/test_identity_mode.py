"""The identity mode a config gives (issue 14): left out, ``instance`` in a cluster and
``shared`` alone; ``shared`` with 2+ nodes refused in one line that names the fix."""

from __future__ import annotations

import pytest

from rustbalance.config.identity_mode import (
    SHARED_CLUSTER_PROBLEM,
    cluster_identity_problem,
    effective_identity_mode,
)
from tests.config import ONION_A, parse, problems

PEERS = {
    "listen": "127.0.0.1:9000",
    "peers": ["127.0.0.1:9001"],
}
JOIN = {"enabled": True, "tunnel_network": "10.99.0.0/24"}
WIREGUARD = {
    "enabled": True,
    "private_key_path": "wg.key",
    "address": "10.99.0.1/24",
    "endpoint": "203.0.113.5:51820",
}
# [join] needs the WireGuard identity and a tunnel listen address (config/parser.py).
JOINING = {
    "join": JOIN,
    "wireguard": {**WIREGUARD, "enabled": False},
    "coordination": {"listen": "10.99.0.1:51821"},
    "proxy": {"mode": "http"},
}


def test_the_rule_instance_in_a_cluster_shared_alone_an_explicit_choice_wins() -> None:
    assert effective_identity_mode(None, clustered=True) == "instance"
    assert effective_identity_mode(None, clustered=False) == "shared"
    assert effective_identity_mode("shared", clustered=False) == "shared"
    assert effective_identity_mode("instance", clustered=False) == "instance"
    assert effective_identity_mode("shared", clustered=True) == "shared"  # then refused
    assert cluster_identity_problem("shared", clustered=True) == SHARED_CLUSTER_PROBLEM
    assert cluster_identity_problem("shared", clustered=False) is None
    assert cluster_identity_problem("instance", clustered=True) is None


@pytest.mark.parametrize(
    "sections",
    [{"coordination": PEERS}, JOINING, {"wireguard": WIREGUARD}],
    ids=["coordination peers", "join", "wireguard"],
)
def test_a_cluster_config_without_identity_mode_runs_instance(
    sections: dict[str, dict[str, object]],
) -> None:
    config = parse(**sections)
    assert config.clustered
    assert config.node.identity_mode is None
    assert config.identity_mode == "instance"


def test_a_lone_config_without_identity_mode_runs_shared() -> None:
    config = parse()
    assert not config.clustered
    assert config.identity_mode == "shared"


@pytest.mark.parametrize(
    "sections",
    [{"coordination": PEERS}, JOINING, {"wireguard": WIREGUARD}],
    ids=["coordination peers", "join", "wireguard"],
)
def test_shared_in_a_cluster_is_refused_in_one_line_that_names_the_fix(
    sections: dict[str, dict[str, object]],
) -> None:
    found = problems(**sections, node={"identity_mode": "shared"})
    assert found == (SHARED_CLUSTER_PROBLEM,)
    (line,) = found
    assert "\n" not in line and line.startswith("node.identity_mode: ")
    assert 'set identity_mode = "instance" or leave it out' in line


def test_instance_explicitly_in_a_cluster_is_fine_and_a_lone_shared_node_too() -> None:
    assert parse(coordination=PEERS, node={"identity_mode": "instance"}).identity_mode == (
        "instance"
    )
    assert parse(node={"identity_mode": "shared"}).identity_mode == "shared"


def test_the_master_key_follows_the_resolved_mode() -> None:
    """A standby of a cluster without ``identity_mode`` is an instance: it needs only the
    master address, no master key (before issue 14 it defaulted to shared and needed one)."""
    standby = {"publisher_eligible": False}
    address_only = {"identity_key_path": None, "onion_address": ONION_A}
    config = parse(coordination=PEERS, node=standby, master=address_only)
    assert config.identity_mode == "instance" and config.master.identity_key_path is None
    # Alone, the same node is shared and needs the key.
    assert problems(node=standby, master=address_only) == ("master.identity_key_path: is required",)
    # A publisher-eligible instance needs it too.
    assert problems(coordination=PEERS, master=address_only) == (
        "master.identity_key_path: is required (this instance is publisher-eligible)",
    )
