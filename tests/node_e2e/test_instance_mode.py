"""``node.identity_mode = "instance"`` end to end on the private Tor network (issue 5).

Two RustBalance nodes in instance mode form a cluster: node-a is publisher-eligible and holds
the master key; node-b is not eligible and has no master key anywhere (not in its config, its
state or its tor's HiddenServiceDir), only the master address. Each node's tor hosts the node's
own key as an Onionbalance instance of the master (``HiddenServiceOnionbalanceInstance 1``,
``ob_config`` naming the master, tor.md §11); node-a merges both nodes' intro points into the
master descriptor and publishes it.

Then clients reach the master address, and over isolated circuits both nodes serve, in both
halves of a time period (tor.md §3.2/§10): with 20 s voting a period is 24 voting intervals (8
minutes), segment A (new SRV -> period start) and segment B (period start -> next SRV)
alternate every 4 minutes; clients use the first descriptor's subcredential in A and the
second's in B, and an instance accepts the master's subcredentials of the previous, current
and next period. The test always crosses B -> A (a new SRV), where tor drops ``desc_current``
and closes its intro points: a node must have published intro points that survive it (in
segment B it takes them from its own ``desc_next``, own_descriptor.py). Each wait across a
boundary is bounded (a segment + a consensus); a fresh client fetches right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.cluster import stop_all
from rustbalance.testnet.node import NodeProcess
from tests.node_e2e import NODE_PUBLISH_TIMEOUT
from tests.node_e2e.cluster_helpers import (
    SHORT_TIMINGS,
    ClusterNode,
    RunningCluster,
    free_udp_ports,
)
from tests.node_e2e.instance_helpers import names_served
from tests.node_e2e.test_periods import (
    _consensus,
    _next_boundary,
    _segment,
    _wait_for_segment_change,
)
from tests.torhelpers import NamedHTTPServer
from tests.trust import admit_keyless_node

LOCALHOST = "127.0.0.1"


def _write_config(
    node_dir: Path,
    *,
    name: str,
    eligible: bool,
    master: IdentityKey,
    key_file: Path | None,
    target_port: int,
    listen: int,
    peer: int,
    extra_torrc: list[str],
) -> Path:
    interval, timeout, grace = SHORT_TIMINGS
    master_section: dict[str, object] = {"onion_address": master.onion_address}
    if key_file is not None:
        master_section["identity_key_path"] = str(key_file)
    doc = {
        "node": {
            "id": name,
            "state_dir": str(node_dir / "state"),
            "status_socket": str(node_dir / "state" / "status.sock"),
            "publisher_eligible": eligible,
            "identity_mode": "instance",
            "node_key_path": str(node_dir / "node.key"),
        },
        "master": master_section,
        "target": {"address": f"{LOCALHOST}:{target_port}"},
        "tor": {"mode": "managed", "data_dir": str(node_dir / "tor"), "extra_torrc": extra_torrc},
        "proxy": {"listen_port": 0},
        "publish": {"upload_timeout_secs": 15},
        "coordination": {
            "listen": f"{LOCALHOST}:{listen}",
            "peers": [f"{LOCALHOST}:{peer}"],
            "heartbeat_interval_secs": interval,
            "heartbeat_timeout_secs": timeout,
            "takeover_grace_secs": grace,
        },
        "metrics": {"enabled": False},
    }
    path = node_dir / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@contextlib.contextmanager
def instance_cluster(net: PrivateTorNetwork, work_dir: Path) -> Iterator[RunningCluster]:
    """node-a (eligible, master key) and node-b (not eligible, no master key)."""
    master = IdentityKey.generate(secrets.token_bytes)
    (work_dir / "secrets").mkdir(parents=True, mode=0o700)
    key_file = work_dir / "secrets" / "master.key"  # node-a's only: outside node-b's folders
    write_seed_key_file(master, key_file)
    ports = free_udp_ports(2)
    nodes: list[ClusterNode] = []
    targets: list[NamedHTTPServer] = []
    started = time.monotonic()
    try:
        for index, (name, eligible) in enumerate((("node-a", True), ("node-b", False))):
            node_dir = work_dir / name
            node_dir.mkdir()
            if not eligible:  # admitted by a master-key holder, as `rustbalance join` does
                admit_keyless_node(
                    master,
                    name,
                    key_path=node_dir / "node.key",
                    state_dir=node_dir / "state",
                    coordination=f"{LOCALHOST}:{ports[index]}",
                    priority=10 * (index + 1),
                )
            target = NamedHTTPServer(f"{name}-target")
            targets.append(target)
            config = _write_config(
                node_dir,
                name=name,
                eligible=eligible,
                master=master,
                key_file=key_file if eligible else None,
                target_port=target.port,
                listen=ports[index],
                peer=ports[1 - index],
                extra_torrc=net.client_torrc_lines(),
            )
            process = NodeProcess(config, node_dir / "node.log")
            process.start()
            nodes.append(
                ClusterNode(name, 10 * (index + 1), process, node_dir, target, ports[index])
            )
        yield RunningCluster(master, nodes, started, relay=None, timings=SHORT_TIMINGS)
    finally:
        stop_all(nodes, targets)


def _files_holding(folder: Path, needles: list[bytes]) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(path)
    return found


async def _serve_in_segment(
    net: PrivateTorNetwork, factory: Callable[[], TorInstance], address: str, label: str
) -> tuple[str, str, dict[str, int]]:
    """A fresh client reaches both nodes through the master address; (segment before, after,
    answers)."""
    client = await asyncio.to_thread(factory)
    assert client.socks_address is not None
    before = _segment(_consensus(net, client))
    seen = await names_served(
        client.socks_address, address, {"node-a-target", "node-b-target"}, tag=f"inst-{label}"
    )
    after = _segment(_consensus(net, client))
    net.remove(client)
    return before, after, seen


@pytest.mark.tor
async def test_instance_nodes_serve_the_master_in_both_halves_of_a_period(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    net = tor_network
    started = time.monotonic()
    with instance_cluster(net, tmp_path) as cluster:
        await asyncio.to_thread(cluster.wait_formed, NODE_PUBLISH_TIMEOUT)
        formed = time.monotonic() - started
        node_a, node_b = cluster.nodes
        doc_a, doc_b = node_a.status(), node_b.status()
        assert (doc_a["role"], doc_b["role"]) == ("publisher", "standby")
        master = cluster.master
        for node, doc in ((node_a, doc_a), (node_b, doc_b)):
            instance = doc["instance_onion_address"]
            assert instance != master.onion_address
            assert doc["master_onion_address"] == master.onion_address
            hs_dir = node.work_dir / "tor" / "hidden_service"
            # tor hosts the node's own key, as an Onionbalance instance of the master.
            assert (hs_dir / "hostname").read_text().strip() == instance
            assert (
                hs_dir / "ob_config"
            ).read_text() == f"MasterOnionAddress {master.onion_address}\n"
            torrc = (node.work_dir / "tor" / "torrc").read_text()
            assert "HiddenServiceOnionbalanceInstance 1" in torrc
            # Native publishing stays on: the instance's own descriptor.
            assert "PublishHidServDescriptors 1" in torrc
            assert (node.work_dir / "state" / "keys" / "instance.key").stat().st_mode & 0o077 == 0
        assert doc_a["instance_onion_address"] != doc_b["instance_onion_address"]
        # node-b never had the master key: not in its config, state, or tor's files.
        assert master.seed is not None
        needles = [master.seed, master.expanded]
        assert _files_holding(node_b.work_dir, needles) == []
        assert "identity_key_path" not in (node_b.work_dir / "config.toml").read_text()
        assert _files_holding(node_a.work_dir, needles) == []  # node-a reads it from secrets/

        reference = net.clients[0]
        if _next_boundary(_consensus(net, reference)) - time.time() < 60:
            await _wait_for_segment_change(net, reference, _segment(_consensus(net, reference)))
        _, first_after, seen = await _serve_in_segment(
            net, tor_client_factory, master.onion_address, "1"
        )
        segments = [first_after]
        answers = [seen]
        # Cross the next boundary and serve at once; if that was A -> B, also cross B -> A,
        # where tor drops desc_current and closes its intro points (the harder boundary).
        for label in ("2", "3"):
            if len(segments) == 3 or segments[-2:] == ["B", "A"]:
                break
            await _wait_for_segment_change(net, reference, segments[-1])
            crossed = time.monotonic()
            _, after, seen = await _serve_in_segment(
                net, tor_client_factory, master.onion_address, label
            )
            segments.append(after)
            answers.append(seen)
            print(f"\nsegment {after}: both nodes served {time.monotonic() - crossed:.0f} s after")
        assert segments[-2:] == ["B", "A"], segments
        # Still one publisher with both nodes' intro points after the boundary.
        await asyncio.to_thread(cluster.wait_formed, 120)
        print(
            f"\ncluster formed and published {formed:.0f} s after start; segments {segments}: "
            f"answers {answers}"
        )
