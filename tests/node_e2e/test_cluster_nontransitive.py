"""A non-transitive partition of three real nodes on the private Tor network (issue 5).

The cluster of :func:`~tests.node_e2e.cluster_helpers.running_cluster` (node-a, node-b, node-c
with priorities 10/20/30, short timings 1/3/3 s, coordination through the fault relay). The
relay cuts only the link node-a <-> node-b: node-c, the *worst*-ranked node, is then the only
link between the two others. Each of node-a and node-b sees nothing better than itself; before
heartbeats carried the believed publisher, node-b took over after timeout + grace and both
published for as long as the cut lasted. Now node-c reports "node-a publishes" to node-b, so
the status documents show exactly one publisher during the partition (held well past the
takeover time) and after the heal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from rustbalance.testnet import PrivateTorNetwork
from tests.node_e2e.cluster_helpers import (
    SHORT_TIMINGS,
    RunningCluster,
    running_cluster,
    wait_for,
)

NAMES = ("node-a", "node-b", "node-c")


@pytest.fixture(scope="module")
def relayed_cluster(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCluster]:
    with running_cluster(
        tor_network, tmp_path_factory.mktemp("nontransitive"), timings=SHORT_TIMINGS, relay=True
    ) as cluster:
        cluster.wait_formed()
        yield cluster


def _alive_peers(doc: dict[str, Any]) -> set[str]:
    return {p["node_id"] for p in doc["peers"] if p["alive"]}


def _docs(cluster: RunningCluster) -> dict[str, dict[str, Any]]:
    docs = cluster.statuses()
    missing = [name for name, doc in docs.items() if doc is None]
    assert not missing, f"no status from {missing}"
    return {name: doc for name, doc in docs.items() if doc is not None}


def _assert_one_publisher(cluster: RunningCluster, seconds: float) -> int:
    """Sample the status documents for ``seconds``: node-a is the only publisher, and every
    node names it. Returns the number of samples."""
    samples = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        docs = _docs(cluster)
        roles = {name: doc["role"] for name, doc in docs.items()}
        assert roles == {"node-a": "publisher", "node-b": "standby", "node-c": "standby"}, roles
        named = {name: doc["cluster"]["publisher"] for name, doc in docs.items()}
        assert named == dict.fromkeys(NAMES, "node-a"), named
        samples += 1
        time.sleep(0.5)
    return samples


@pytest.mark.tor
def test_worst_node_between_two_keeps_one_publisher(relayed_cluster: RunningCluster) -> None:
    cluster = relayed_cluster
    relay = cluster.relay
    assert relay is not None
    interval, timeout, grace = SHORT_TIMINGS
    assert cluster.publishers() == ["node-a"]
    relay.cut_pair("node-a", "node-b")
    try:

        def split() -> bool:
            docs = _docs(cluster)
            return (
                _alive_peers(docs["node-a"]) == {"node-c"}
                and _alive_peers(docs["node-b"]) == {"node-c"}
                and _alive_peers(docs["node-c"]) == {"node-a", "node-b"}
            )

        took = wait_for(split, 30, "node-a and node-b to lose each other (and only that)", 0.25)
        print(f"\nnon-transitive partition in place {took:.1f} s after the cut")
        # node-b would have taken over timeout + grace after losing node-a; hold for twice that.
        samples = _assert_one_publisher(cluster, 2 * (timeout + grace) + 2 * interval)
        print(f"one publisher in all {samples} status samples during the partition")
        docs = _docs(cluster)
        assert docs["node-a"]["mode"] == "multi" and docs["node-b"]["mode"] == "multi"
        # What node-a can merge is what reaches it: node-c's intro points, not node-b's.
        assert set(docs["node-a"]["cluster"]["peer_intro_points"]) == {"node-c"}
    finally:
        relay.heal()
    cluster.wait_formed(60)
    docs = _docs(cluster)
    assert set(docs["node-a"]["cluster"]["peer_intro_points"]) == {"node-b", "node-c"}
    samples = _assert_one_publisher(cluster, 2 * timeout)
    print(f"one publisher in all {samples} status samples after the heal")
    assert relay.dropped > 0
