"""``tor.pow_enabled`` is refused wherever RustBalance, not tor, writes the master descriptor
(docs/pow.md): with peers, plain backends, joins, or in instance mode. A lone shared node keeps
it (tor publishes the master descriptor itself, with its own seed)."""

from __future__ import annotations

from typing import Any

import pytest

from rustbalance.config import parse_config
from tests.config import BASE, ONION_B, parse, problems

POW = {"pow_enabled": True}
JOIN_READY: dict[str, dict[str, Any]] = {
    "wireguard": {
        "private_key_path": "/etc/rustbalance/wireguard.key",
        "address": "10.99.0.1/24",
        "endpoint": "203.0.113.5:51820",
    },
    "join": {"enabled": True},
}


def test_a_lone_shared_node_keeps_pow() -> None:
    config = parse(tor=POW)
    assert config.tor.pow_enabled
    assert config.identity_mode == "shared"


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        (
            {"coordination": {"peers": ["127.0.0.1:51822"]}},
            "coordination.peers is set",
        ),
        ({"master": {"backends": [ONION_B]}}, "master.backends is set"),
        (JOIN_READY, "join.enabled = true"),
        ({"node": {"identity_mode": "instance"}}, 'node.identity_mode = "instance"'),
        (
            {
                "coordination": {"backend": "etcd"},
                "etcd": {
                    "endpoints": ["127.0.0.1:2379"],
                    "ca_path": "etcd/ca.pem",
                    "cert_path": "etcd/node.pem",
                    "key_path": "etcd/node-key.pem",
                },
            },
            'coordination.backend = "etcd"',
        ),
    ],
    ids=["peers", "backends", "join", "instance", "etcd"],
)
def test_pow_where_rustbalance_writes_the_descriptor_is_refused(
    sections: dict[str, dict[str, Any]], reason: str
) -> None:
    # The same document without pow_enabled is valid: the rule alone refuses it.
    parse(**sections)
    found = problems(**sections, tor=POW)
    assert len(found) == 1, found
    message = found[0]
    assert message.startswith("tor.pow_enabled: ")
    assert reason in message
    assert "docs/pow.md" in message
    if reason.startswith("node.identity_mode"):
        # Why: a client binds its solution to the master's blinded key.
        assert "blinded key" in message
    else:
        # Why: one descriptor carries one seed, every tor checks its own.
        assert "seed" in message
    assert "tor.intro_dos_enabled" in message  # what to use instead


def test_every_reason_is_named_once() -> None:
    found = problems(
        node={"identity_mode": "instance"},
        master={"backends": [ONION_B]},
        coordination={"peers": ["127.0.0.1:51822"]},
        tor=POW,
    )
    assert len(found) == 1
    for reason in ("coordination.peers is set", "master.backends is set", "identity_mode"):
        assert reason in found[0]


def test_pow_off_in_a_cluster_stays_valid() -> None:
    config = parse_config(
        '[node]\nid = "n"\nidentity_mode = "instance"\n'
        '[master]\nidentity_key_path = "m.key"\n'
        '[target]\naddress = "127.0.0.1:80"\n'
        '[coordination]\npeers = ["127.0.0.1:51822"]\n'
        "[tor]\npow_enabled = false\n",
        BASE,
    )
    assert not config.tor.pow_enabled
