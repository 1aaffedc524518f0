"""Three nodes coordinated by a real 3-member etcd cluster, on the private Tor network (issue 20).

One module-scoped stack: a test PKI, etcd 3.4 (Debian's ``etcd-server``) with TLS, client
certificate auth and the RBAC of docs/etcd.md, three ``rustbalance run`` daemons with
``[coordination] backend = "etcd"`` (lease TTL 5 s), each talking to the members through its
own relays (:class:`~tests.node_e2e.etcd_helpers.EtcdRelays`) so that one node can be cut
off, and a fourth daemon whose certificate's CN is no etcd user. A sampler reads every node's
``status`` four times a second for the whole module: two nodes never claim the publisher role
at once. The tests run in file order, each on the state the one before left:

1. the master answers; ``status`` and ``/metrics`` report the etcd backend; the intruder never
   registers (nobody sees it, its intro points are never published);
2. the publisher, cut off from etcd, steps down within the TTL; the others take over; healed,
   it comes back as a standby;
3. quorum lost (two members SIGKILLed): nobody publishes, every node keeps running, the
   descriptor on the HSDirs stays the last one published and the master keeps answering;
   the members restarted, a publisher is back by itself;
4. SIGKILL of the publisher: a new descriptor is accepted (the time is printed; with the
   default TTL, BENCHMARKS.md has it beside the embedded backend's, measured in the same run);
5. SIGTERM of the publisher: its lease is revoked, the last node takes over at once and,
   the only node registered, publishes alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.cluster import NAMES, EtcdBackedCluster, launch_etcd_cluster
from rustbalance.testnet.etcd_cluster import etcd_sections
from rustbalance.testnet.node import NodeProcess, write_node_config
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.network import FetchError, fetch_descriptor, read_network_view
from rustbalance.tor.process import pick_free_ports
from tests.node_e2e import NODE_PUBLISH_TIMEOUT
from tests.node_e2e.cluster_helpers import wait_for
from tests.node_e2e.etcd_helpers import EtcdRelays, RoleSampler
from tests.torhelpers import NamedHTTPServer, get_with_retries

pytestmark = pytest.mark.tor

TTL = 5
# Lease keep-alives every TTL/3; a node stops trusting its lease max(1, TTL/4) s before etcd
# can expire it (docs/etcd.md). Slack for a loaded 2-core machine on top of each bound.
SLACK = 3.0


@dataclass
class Stack:
    cluster: EtcdBackedCluster
    relays: EtcdRelays
    sampler: RoleSampler
    intruder: NodeProcess
    metrics_ports: list[int]

    @property
    def address(self) -> str:
        return self.cluster.launched.address

    def alive(self) -> list[Any]:
        return self.cluster.launched.alive()

    def node(self, name: str) -> Any:
        return self.cluster.launched.node(name)

    def publishers(self) -> list[str]:
        docs = [n.try_status() for n in self.alive()]
        return sorted(d["node_id"] for d in docs if d and d["role"] == "publisher")

    def publisher(self) -> Any:
        (name,) = self.publishers()
        return self.node(name)


def _formed(stack: Stack) -> bool:
    """One publisher, every live node in mode multi and connected to etcd, and every node's
    intro points in the publisher's last published descriptor."""
    docs = [n.try_status() for n in stack.alive()]
    if any(d is None for d in docs):
        return False
    ready = [d for d in docs if d is not None]
    if not all(d["mode"] == "multi" and d["cluster"]["etcd"]["registered"] for d in ready):
        return False
    publishers = [d for d in ready if d["role"] == "publisher"]
    if len(publishers) != 1:
        return False
    published = set(publishers[0]["intro_points"]["published_auth_keys"])
    return all(
        d["intro_points"]["own_auth_keys"] and published & set(d["intro_points"]["own_auth_keys"])
        for d in ready
    )


@pytest.fixture(scope="module")
def stack(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("etcd-cluster")
    relays = EtcdRelays()
    metrics_ports = pick_free_ports(len(NAMES))
    sampler: RoleSampler | None = None
    target = NamedHTTPServer("node-d-target")
    try:
        with launch_etcd_cluster(
            tor_network,
            work,
            lease_ttl_secs=TTL,
            endpoints=lambda index, etcd: relays.add(NAMES[index], etcd.endpoints),
            sections=lambda index, _port: {
                "metrics": {"enabled": True, "listen": f"127.0.0.1:{metrics_ports[index]}"}
            },
        ) as cluster:
            # A fourth node with a certificate of the right CA whose CN is no etcd user.
            node_dir = work / "node-d"
            node_dir.mkdir()
            config = write_node_config(
                node_dir / "config.toml",
                node_id="node-d",
                key_file=work / "nodes" / "master.key",
                master_address=cluster.launched.address,
                target=f"127.0.0.1:{target.port}",
                work_dir=node_dir,
                extra_torrc=tor_network.client_torrc_lines(),
                overrides=etcd_sections(
                    cluster.pki,
                    cluster.pki.client("stranger"),
                    cluster.etcd.endpoints,
                    prefix=cluster.etcd.prefix,
                    lease_ttl_secs=TTL,
                ),
            )
            intruder = NodeProcess(config, node_dir / "node.log")
            intruder.start()
            launched = cluster.launched

            def sampled() -> list[Any]:
                return launched.alive()

            try:
                sampler = RoleSampler(sampled)
                stack = Stack(cluster, relays, sampler, intruder, metrics_ports)
                wait_for(
                    lambda: _formed(stack),
                    NODE_PUBLISH_TIMEOUT,
                    "the etcd-backed cluster to form",
                )
                yield stack
                sampler.never_two()
            finally:
                if sampler is not None:
                    sampler.close()
                intruder.stop()  # while etcd still runs: its lease is revoked, not left
    finally:
        target.close()
        relays.close()


@pytest.fixture(scope="module")
def visitor(tor_network: PrivateTorNetwork) -> Iterator[TorInstance]:
    client = tor_network.add_client(f"etcdvisitor{os.getpid() % 100000}")
    try:
        yield client
    finally:
        tor_network.remove(client)


async def _fetch(client: TorInstance, address: str) -> tuple[int, set[str]] | None:
    """(revision counter, intro auth keys hex) of the master descriptor on the HSDirs."""
    conn = await ControlConnection.connect(client.control_address)
    try:
        view = await read_network_view(conn)
        decoded = await fetch_descriptor(conn, address, view, timeout=20)
    except FetchError:
        return None
    finally:
        await conn.close()
    return decoded.revision_counter, {p.auth_key.hex() for p in decoded.intro_points}


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def _last_publish(doc: dict[str, Any]) -> float:
    times = [t for t in (doc.get("last_publish") or {}).values() if isinstance(t, int | float)]
    return max(times, default=0.0)


async def test_the_master_answers_and_status_and_metrics_report_etcd(
    stack: Stack, visitor: TorInstance
) -> None:
    publisher = stack.publisher()
    docs = {n.name: n.status() for n in stack.alive()}
    for name, doc in docs.items():
        cluster = doc["cluster"]
        assert cluster["backend"] == "etcd"
        assert cluster["publisher"] == publisher.name
        # instance mode (a cluster's default): each tor publishes its own instance descriptor;
        # the master descriptor comes only from the lease holder.
        assert cluster["native_publishing"] is True
        assert doc["instance_onion_address"] != stack.cluster.launched.address
        assert cluster["etcd"]["connected"] is True
        assert cluster["etcd"]["registered"] is True
        assert cluster["etcd"]["last_error"] is None
        assert {p["node_id"]: p["alive"] for p in doc["peers"]} == {
            n: True for n in NAMES if n != name
        }
    # The term is the create revision of the publisher's candidacy, the same everywhere.
    assert len({doc["cluster"]["term"] for doc in docs.values()}) == 1
    pub = docs[publisher.name]
    assert pub["cluster"]["peer_intro_points"].keys() == set(NAMES) - {publisher.name}
    assert pub["last_publish"]["results"]["current"]["ok"] is True
    # Every upload was fenced by a transaction on its candidacy first.
    assert pub["cluster"]["counters"]["fencing_passed"] >= 2

    # /metrics says the same (the feed renders the same snapshot every 5 s).
    port = stack.metrics_ports[NAMES.index(publisher.name)]

    def metrics_agree() -> bool:
        text = _metrics(port)
        return (
            all(
                line in text
                for line in (
                    "rustbalance_is_publisher 1.0",
                    "rustbalance_peers_alive 2.0",
                    "rustbalance_etcd_connected 1.0",
                )
            )
            and 'rustbalance_etcd_fencing_total{result="passed"}' in text
        )

    await asyncio.to_thread(wait_for, metrics_agree, 15, "the publisher's metrics")
    standby = next(n for n in stack.alive() if n is not publisher)
    text = _metrics(stack.metrics_ports[NAMES.index(standby.name)])
    assert "rustbalance_is_publisher 0.0" in text
    assert "rustbalance_etcd_connected 1.0" in text

    # The HSDirs serve the merged descriptor and a client reaches the master address.
    fetched = await _fetch(visitor, stack.address)
    assert fetched is not None
    for doc in docs.values():
        assert fetched[1] & set(doc["intro_points"]["own_auth_keys"]), doc["node_id"]
    socks = visitor.socks_address
    assert socks is not None
    body = await get_with_retries(socks, stack.address, isolation="etcd-first")
    assert body.strip() in {f"hello from {n}-target" for n in NAMES}

    # The node whose certificate's CN is no etcd user never registered.
    intruder = stack.intruder
    refused = "the client certificate's CN must be an etcd user"
    await asyncio.to_thread(
        intruder.wait_for_log, rf"ERROR .*etcd: .*{refused}", NODE_PUBLISH_TIMEOUT
    )
    doc = await asyncio.to_thread(intruder.status)
    assert doc["role"] == "standby" and doc["mode"] == "single"
    assert doc["cluster"]["backend"] == "etcd"
    # etcd grants it a lease (any authenticated client may), but it cannot write its keys.
    assert doc["cluster"]["etcd"]["registered"] is False
    assert refused in (doc["cluster"]["etcd"]["last_error"] or "")
    for node in stack.alive():
        assert "node-d" not in {p["node_id"] for p in node.status()["peers"]}
    published = set(stack.publisher().status()["intro_points"]["published_auth_keys"])
    assert not published & set(doc["intro_points"]["own_auth_keys"])


async def test_a_publisher_cut_off_from_etcd_steps_down_within_the_ttl(stack: Stack) -> None:
    old = stack.publisher()
    started = time.monotonic()
    cut_wall = time.time()
    stack.relays.cut(old.name)
    try:
        step_down = await asyncio.to_thread(
            wait_for,
            lambda: (old.try_status() or {}).get("role") == "standby",
            TTL + SLACK,
            "the cut-off publisher to step down",
            0.1,
        )
        takeover = await asyncio.to_thread(
            wait_for,
            lambda: len([p for p in stack.publishers() if p != old.name]) == 1,
            3 * TTL + SLACK,
            "another node to take over",
            0.1,
        )
        print(
            f"cut off from etcd: the publisher stepped down {step_down:.1f} s after the cut, "
            f"another node took over {step_down + takeover:.1f} s after the cut (TTL {TTL} s)"
        )
        assert step_down <= TTL  # within the TTL, measured
        doc = old.status()  # it keeps running and answering
        assert doc["cluster"]["etcd"]["connected"] is False
        assert doc["cluster"]["etcd"]["last_error"]
        # The new publisher's descriptor is accepted.
        new = stack.publisher()
        await asyncio.to_thread(
            wait_for,
            lambda: _last_publish(new.status()) > cut_wall,
            NODE_PUBLISH_TIMEOUT,
            "the new publisher's upload",
        )
    finally:
        stack.relays.heal(old.name)
    # Back in touch: its old lease expired meanwhile, so it rejoins as a standby.
    await asyncio.to_thread(
        wait_for,
        lambda: _formed(stack) and old.name not in stack.publishers(),
        6 * TTL + SLACK,
        "the healed node to rejoin as a standby",
    )
    assert old.status()["cluster"]["etcd"]["connected"] is True
    assert all(len(p) <= 1 for p in stack.sampler.publishers_since(started))
    stack.sampler.never_two()


async def test_quorum_loss_keeps_serving_and_recovers_by_itself(
    stack: Stack, visitor: TorInstance
) -> None:
    etcd = stack.cluster.etcd
    await asyncio.to_thread(wait_for, lambda: _formed(stack), 60, "a formed cluster")
    started = time.monotonic()
    etcd.kill("m2")
    etcd.kill("m3")
    try:
        gone = await asyncio.to_thread(
            wait_for, lambda: not stack.publishers(), TTL + SLACK, "the publisher to step down"
        )
        print(f"quorum lost: no publisher {gone:.1f} s after two of three members died")
        uploads = {n.name: _last_publish(n.status()) for n in stack.alive()}
        before = await _fetch(visitor, stack.address)
        assert before is not None
        # Nobody publishes for a while; every node keeps running and answering.
        quiet_until = time.monotonic() + 2 * TTL
        while time.monotonic() < quiet_until:
            docs = [n.status() for n in stack.alive()]
            assert all(d["role"] == "standby" for d in docs), docs
            assert all(not d["cluster"]["etcd"]["connected"] for d in docs)
            await asyncio.sleep(0.5)
        assert {n.name: _last_publish(n.status()) for n in stack.alive()} == uploads
        # The descriptor on the HSDirs is still the last one published, and clients use it.
        during = await _fetch(visitor, stack.address)
        assert during is not None and during[0] == before[0]
        socks = visitor.socks_address
        assert socks is not None
        body = await get_with_retries(socks, stack.address, isolation="etcd-quorum-lost")
        assert body.strip() in {f"hello from {n}-target" for n in NAMES}
    finally:
        etcd.restart("m2", wait=False)
        etcd.restart("m3", wait=False)
    back = await asyncio.to_thread(
        wait_for,
        lambda: (
            len(stack.publishers()) == 1
            and all(n.status()["cluster"]["etcd"]["connected"] for n in stack.alive())
        ),
        60,
        "a publisher after quorum is back",
    )
    print(f"quorum back: one publisher again {back:.1f} s after the members restarted")
    await asyncio.to_thread(wait_for, lambda: _formed(stack), 60, "the cluster to form again")
    seen = stack.sampler.publishers_since(started)
    assert () in seen and all(len(p) <= 1 for p in seen), seen


async def test_sigkill_of_the_publisher_a_new_descriptor_is_accepted(
    stack: Stack, visitor: TorInstance
) -> None:
    await asyncio.to_thread(wait_for, lambda: _formed(stack), 60, "a formed cluster")
    old = stack.publisher()
    dead_keys = set(old.status()["intro_points"]["own_auth_keys"])
    killed_at = time.monotonic()
    killed_wall = time.time()
    old.kill()

    def accepted() -> float | None:
        for node in stack.alive():
            doc = node.try_status() or {}
            if doc.get("role") == "publisher" and _last_publish(doc) > killed_wall:
                times = [
                    t
                    for t in doc["last_publish"].values()
                    if isinstance(t, int | float) and t > killed_wall
                ]
                return min(times) - killed_wall
        return None

    found: float | None = None
    while found is None and time.monotonic() - killed_at < NODE_PUBLISH_TIMEOUT:
        found = await asyncio.to_thread(accepted)
        await asyncio.sleep(0.25)
    assert found is not None, "no node published after the publisher died"
    print(f"etcd failover: a new descriptor was accepted {found:.1f} s after the SIGKILL")
    # The lease expires at most TTL after the last keep-alive; then one upload round.
    assert found <= TTL + 30
    new = stack.publisher()
    await asyncio.to_thread(
        wait_for,
        lambda: not set(new.status()["intro_points"]["published_auth_keys"]) & dead_keys,
        60,
        "a published descriptor without the dead node's intro points",
    )
    assert {p["node_id"] for p in new.status()["peers"]} == set(NAMES) - {old.name, new.name}
    socks = visitor.socks_address
    assert socks is not None
    body = await get_with_retries(socks, stack.address, isolation="etcd-after-kill")
    assert body.strip() in {f"hello from {n.name}-target" for n in stack.alive()}
    stack.sampler.never_two()


def test_the_nodes_etcd_keys_are_private(stack: Stack) -> None:
    """The client keys the nodes use are 0600 in a 0700 folder (the log-secret scan harvests
    them, so a key in any log of this module fails the run)."""
    pki = stack.cluster.pki.directory
    assert Path(pki).stat().st_mode & 0o777 == 0o700
    for key in Path(pki).glob("*-key.pem"):
        assert key.stat().st_mode & 0o777 == 0o600, key


async def test_sigterm_of_the_publisher_revokes_its_lease_and_the_last_node_publishes_alone(
    stack: Stack,
) -> None:
    """``lease_release`` with etcd is a revoke: the next node takes over without waiting for
    the TTL. The node left is the only one registered: it holds the lease and publishes."""
    await asyncio.to_thread(wait_for, lambda: len(stack.publishers()) == 1, 60, "a publisher")
    old = stack.publisher()
    (last,) = [n for n in stack.alive() if n is not old]
    process = old.process.proc
    assert process is not None
    signalled_wall = time.time()
    os.kill(process.pid, signal.SIGTERM)
    took = await asyncio.to_thread(
        wait_for,
        lambda: (last.try_status() or {}).get("role") == "publisher",
        TTL,
        "the last node to take over",
        0.05,
    )
    print(f"SIGTERM: the last node took over {took:.2f} s after the signal (TTL {TTL} s)")
    assert took < TTL - 1  # the revoke, not the lease's expiry
    assert await asyncio.to_thread(process.wait, 60) == 0
    old.killed = True
    old.stop()  # its tor, by PID
    assert "etcd: lease revoked (publisher lease released)" in old.process.log_text()
    await asyncio.to_thread(
        wait_for,
        lambda: _last_publish(last.status()) > signalled_wall,
        NODE_PUBLISH_TIMEOUT,
        "the last node's upload",
    )
    doc = last.status()
    assert (doc["mode"], doc["role"]) == ("single", "publisher")
    # Alone on etcd it still publishes the master itself (never tor: lease_only), and its tor
    # its own instance descriptor.
    assert doc["cluster"]["native_publishing"] is True
    assert set(doc["intro_points"]["published_auth_keys"]) == set(
        doc["intro_points"]["own_auth_keys"]
    )
    stack.sampler.never_two()
