"""node/daemon.py: the wiring, with the tor network and the clock injected (no tor started).

The Daemon is built as ``rustbalance run`` builds it, except that its
:class:`~rustbalance.node.tor_network.TorNetwork` is the fake of tests/node/fakes.py (the
seam the real-tor fault test in tests/node_e2e uses too) and its clock is manual; coordination
is the fake of the same module. What this proves is that the components are connected: our
intro points reach coordination and the publisher, the cluster task switches tor's native
publishing through the injected network, a takeover republishes, and status and metrics are
rendered from the same state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rustbalance.config import Config, parse_config
from rustbalance.node.coordination import CoordinationFacts
from rustbalance.node.daemon import Daemon
from rustbalance.node.sdnotify import SystemdNotifier
from rustbalance.node.snapshot import metrics_values, status_document
from rustbalance.node.tor_network import TorNetwork
from tests.node.fakes import (
    VIEW,
    FakeCoordination,
    FakeNetwork,
    ManualClock,
    at_valid_after,
    decoded,
    intro_points,
    master_key,
    until,
)

KEY = master_key()
OWN = intro_points(3, seed=1)
PEER = intro_points(2, seed=2)


def config(tmp_path: Path, extra: str = "") -> Config:
    return parse_config(
        f'[node]\nid = "node-a"\nstate_dir = "{tmp_path}/state"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:8000"\n' + extra,
        tmp_path,
    )


CLUSTER = '[coordination]\nlisten = "127.0.0.1:40001"\npeers = ["127.0.0.1:40002"]\n'


def build(cfg: Config) -> tuple[Daemon, FakeNetwork, ManualClock, list[object]]:
    clock = ManualClock()
    network = FakeNetwork(clock)
    sessions: list[object] = []

    def factory(controller: object) -> TorNetwork:
        sessions.append(controller)
        return network

    daemon = Daemon(cfg, KEY, notifier=SystemdNotifier(env={}), clock=clock, network=factory)
    return daemon, network, clock, sessions


def test_the_tor_network_is_injected_over_the_runtime_control_session(tmp_path: Path) -> None:
    daemon, network, _, sessions = build(config(tmp_path))
    assert daemon.network is network
    assert sessions == [daemon.runtime.controller]


def test_a_single_node_before_start_up(tmp_path: Path) -> None:
    daemon, _, clock, _ = build(config(tmp_path))
    clock.advance(12.34)
    doc = status_document(daemon.snapshot())
    assert (doc["mode"], doc["role"], doc["ready"]) == ("single", "publisher", False)
    assert doc["tor"]["running"] is False
    assert doc["uptime_secs"] == 12.3
    assert "cluster" not in doc
    assert metrics_values(daemon.snapshot())["peers_alive"] == 0
    assert [t.name for t in daemon.tasks()] == [
        "publish",
        "intro-points",
        "network-watch",
        "tor-watchdog",
        "sd-watchdog",
        "verify",
    ]
    assert [h.name for h in daemon.hooks()] == [
        "leave cluster",
        "drain proxy",
        "stop tor",
    ]


async def test_a_published_round_shows_in_status_and_metrics(tmp_path: Path) -> None:
    daemon, network, _, _ = build(config(tmp_path))
    network.own = [decoded(OWN)]
    assert await daemon.intro.refresh()
    assert daemon.publisher.schedule.pending == ["intro points changed"]
    outcome = await daemon.publisher.publish_counted()
    assert all(r.ok for r in outcome.values())
    snap = daemon.snapshot()
    doc = status_document(snap)
    assert doc["ready"] is False  # nothing started: no proxy listens, no tor bootstrapped
    assert doc["intro_points"]["own"] == doc["intro_points"]["published"] == 3
    assert metrics_values(snap)["publishes"] == {
        "current": {"ok": 1, "failed": 0},
        "next": {"ok": 1, "failed": 0},
    }


async def test_the_cluster_task_wires_coordination_tor_and_the_publisher(tmp_path: Path) -> None:
    daemon, network, clock, _ = build(config(tmp_path, CLUSTER))
    coordination = FakeCoordination()
    daemon.cluster.coordination = coordination
    network.own = [decoded(OWN)]
    await daemon.intro.refresh()
    assert coordination.reported == [OWN]  # our intro points go to the peers
    daemon.publisher.schedule.pending.clear()
    task = asyncio.ensure_future(daemon.cluster.run())
    try:
        # Alone at start: native publishing off, standby until a timeout passed.
        await until(lambda: network.native == [False])
        assert not daemon.cluster.is_publisher()
        # A peer appears and the election gives us the lease: a takeover publishes at once.
        coordination.current = CoordinationFacts(True, True, {"node-b": PEER})
        await until(lambda: "became publisher" in daemon.publisher.schedule.pending)
        assert daemon.cluster.is_publisher()
        doc = status_document(daemon.snapshot())
        assert (doc["mode"], doc["role"]) == ("multi", "publisher")
        assert doc["cluster"]["native_publishing"] is False
        assert doc["peers"] == [{"node_id": "node-b", "alive": True}]
        # The peer dies: alone, native publishing back on (the peer was silent already).
        coordination.current = CoordinationFacts(False, False, {})
        clock.advance(1.0)
        await until(lambda: network.native == [False, True])
        # tor goes down: not eligible for the lease any more.
        daemon.runtime.guarded_tor = _Down()  # type: ignore[assignment]
        await until(lambda: coordination.eligible == [False])
        # Revoked (issue 16), even holding the lease alone: never publishes again,
        # and tor's own publishing of the master descriptor goes off too.
        coordination.current = CoordinationFacts(False, True, {})
        assert daemon.cluster.is_publisher() and network.native[-1] is True
        coordination.current = CoordinationFacts(False, True, {}, revoked=True)
        await until(lambda: network.native[-1] is False)
        assert not daemon.cluster.is_publisher()
        doc = status_document(daemon.snapshot())
        assert doc["role"] == "standby" and doc["cluster"]["revoked"] is True
    finally:
        task.cancel()
    await daemon.cluster.leave()
    assert coordination.left


class _Down:
    running = False


class _Session:
    """A fresh control session as the reconnecting controller hands it to its hooks."""

    def __init__(self) -> None:
        self.confs: list[dict[str, str]] = []

    async def set_conf(self, items: dict[str, str]) -> None:
        self.confs.append(dict(items))


async def test_a_new_control_session_gets_native_publishing_set_again(tmp_path: Path) -> None:
    daemon, network, _, _ = build(config(tmp_path, CLUSTER))
    session = _Session()
    await daemon.cluster.on_control_connected(session)  # type: ignore[arg-type]
    assert session.confs == []  # no coordination yet: the torrc says it
    daemon.cluster.coordination = FakeCoordination()
    await daemon.cluster.on_control_connected(session)  # type: ignore[arg-type]
    await daemon.cluster.on_control_connected(session)  # type: ignore[arg-type]
    assert session.confs == [{"PublishHidServDescriptors": "0"}] * 2  # on this very session
    assert network.native == []
    assert status_document(daemon.snapshot())["cluster"]["native_publishing"] is False


async def test_read_intro_points_reach_readiness(tmp_path: Path) -> None:
    """What start() reports (proxy, bootstrap) plus the intro points IntroWatch reads make the
    node ready; nothing else does (node/readiness.py)."""
    daemon, network, _, _ = build(config(tmp_path))
    daemon.readiness.proxy_listening("127.0.0.1:8080")
    daemon.readiness.tor_bootstrap(100)
    network.own = [decoded([])]
    await daemon.intro.refresh()
    assert not daemon.readiness.ready
    network.own = [decoded(OWN)]
    await daemon.intro.refresh()
    assert daemon.readiness.ready
    assert status_document(daemon.snapshot())["ready"] is True


async def test_a_new_srv_run_in_the_consensus_makes_the_intro_watch_read_at_once(
    tmp_path: Path,
) -> None:
    """Issue 14: the consensus watch's boundary reaches the intro-point watch, which reads
    our own descriptor within about a second instead of at its 20 s poll."""
    daemon, network, clock, _ = build(config(tmp_path))
    network.own = [decoded(OWN)]
    await daemon.views.poll()
    task = asyncio.ensure_future(daemon.intro.run())
    try:
        await until(lambda: network.own_reads == 1)
        clock.advance(5.0)
        network.view = at_valid_after(VIEW, VIEW.valid_after + 240)  # the next SRV run
        network.valid_after = "2025-06-01 12:08:00"
        seen = clock.monotonic()
        await daemon.views.poll()
        await until(lambda: network.own_reads == 2)
        assert clock.monotonic() - seen <= 2.0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
