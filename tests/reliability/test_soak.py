"""Soak (issue 7): concurrent clients through Tor to the master address while faults happen.

A 3-node cluster with the default coordination timings (5/15/15 s) serves the master address.
``WORKERS`` workers on two Tor clients fetch ``http://<master>.onion/`` in a loop for
``LOAD_SECS``, each request on a fresh circuit (its own SOCKS user name: tor's
IsolateSOCKSAuth), so every request looks up the descriptor and introduces itself anew. At
random times (seeded; the seed is printed and written to the report):

- a node's managed tor is SIGKILLed (the node's watchdog restarts it), twice;
- a node's ``rustbalance run`` process (and its tor) is SIGKILLed, and started again with the
  same config 3 s later, as systemd's ``Restart=always`` / ``RestartSec=3`` would.

Reported (printed and written to ``test-logs/soak.json``): requests ok/failed, the longest time
without a successful request, which node answered how often, the fault times.

The bounds follow from the failover budget, not from a measured run:

- a fault may leave the master address without a working path for at most ``FAILOVER_BUDGET``
  (45 s: heartbeat timeout 15 + takeover grace 15 + publish and HSDir propagation; what
  tests/node_e2e/test_cluster.py proves for a killed publisher). A request that started just
  before a fault can hang for its whole ``REQUEST_TIMEOUT`` before the worker tries again, so
  the longest gap is at most ``FAILOVER_BUDGET + REQUEST_TIMEOUT``;
- if every fault cost its whole budget, and requests were spread evenly over time, at most
  ``faults x FAILOVER_BUDGET / LOAD_SECS`` of the requests fail; the success ratio must be at
  least the rest.

Afterwards the cluster must have re-formed: all three nodes alive, exactly one publisher, each
node's intro points in the published descriptor.

The cluster runs in ``instance`` identity mode, the mode that stays reachable across tor's
descriptor rotation (docs/architecture.md, "Descriptor rotation and time periods"). A gap at a
rotation (each shared-random run start: every 8 minutes here, daily on the live network) is
held to ``ROTATION_GAP_BOUND`` unless a fault happened in the ``FAILOVER_BUDGET`` before it;
until issue 14 such gaps lasted 64-128 s and were only reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rustbalance.crypto.time_period import srv_run_start
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.cluster import is_tor
from rustbalance.testnet.node import NodeProcess
from rustbalance.tor.consensus import Consensus, parse_consensus, time_params
from rustbalance.tor.process import pid_is_alive
from tests.node_e2e import NODE_PUBLISH_TIMEOUT, log_lines
from tests.node_e2e.cluster_helpers import ClusterNode, RunningCluster, running_cluster
from tests.torhelpers import get_with_retries, http_get_via_tor

LOAD_SECS = 240.0
WORKERS = 4
REQUEST_TIMEOUT = 30.0
PAUSE_AFTER_OK = 0.5
PAUSE_AFTER_FAILURE = 2.0
# systemd's RestartSec in deploy/ (Phase 1.1).
RESTART_SEC = 3.0
FAILOVER_BUDGET = 45.0
# A new SR run's consensus reaches every tor within about one voting interval (20 s) after it
# starts; tor rotates its descriptors when it arrives.
ROTATION_PROPAGATION = 30.0
# A gap at a rotation with no fault before it: the harness's 5 s (issue 14), plus this test's
# coarser sampling (4 workers, a request every ~1.5 s each).
ROTATION_GAP_BOUND = 10.0
# Every node in the identity mode that survives tor's descriptor rotation.
INSTANCE_MODE = {"node": {"identity_mode": "instance"}}
TOR_KILLS = 2
PROCESS_KILLS = 1


@dataclass
class LoadStats:
    ok: int = 0
    failed: int = 0
    successes: list[float] = field(default_factory=list)  # monotonic completion times
    answered_by: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    failures: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, error)

    def gaps(self, start: float, end: float) -> list[tuple[float, float]]:
        """Every stretch without a successful request: (start, end), monotonic."""
        times = [start, *sorted(self.successes), end]
        return list(itertools.pairwise(times))


@dataclass
class Fault:
    at: float  # seconds into the load window
    kind: str  # "tor" or "process"
    node: str
    done_at: float | None = None
    detail: str = ""


def _schedule(rng: random.Random, names: list[str]) -> list[Fault]:
    """Fault times spread over the window, leaving the last 50 s for recovery to show; faults
    are at least 0.7 slot (about 40 s) apart, more than the watchdog needs to notice (15 s)."""
    slots = TOR_KILLS + PROCESS_KILLS
    usable = LOAD_SECS - 50.0 - 20.0
    width = usable / slots
    kinds = ["tor"] * TOR_KILLS + ["process"] * PROCESS_KILLS
    rng.shuffle(kinds)
    return [
        Fault(20.0 + i * width + rng.uniform(0, width * 0.3), kind, rng.choice(names))
        for i, kind in enumerate(kinds)
    ]


async def _worker(
    index: int, socks: tuple[str, int], address: str, stats: LoadStats, stop_at: float
) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        try:
            status, body = await http_get_via_tor(
                socks, address, isolation=f"soak-{index}-{n}", timeout=REQUEST_TIMEOUT
            )
        except Exception as exc:  # python-socks, timeouts, resets: all count as failures
            stats.failed += 1
            stats.errors[type(exc).__name__] += 1
            stats.failures.append((time.monotonic(), type(exc).__name__))
            await asyncio.sleep(PAUSE_AFTER_FAILURE)
            continue
        if status == 200 and body.startswith("hello from "):
            stats.ok += 1
            stats.successes.append(time.monotonic())
            stats.answered_by[body.strip().removeprefix("hello from ")] += 1
            await asyncio.sleep(PAUSE_AFTER_OK)
        else:
            stats.failed += 1
            stats.errors[f"HTTP {status}"] += 1
            stats.failures.append((time.monotonic(), f"HTTP {status}"))
            await asyncio.sleep(PAUSE_AFTER_FAILURE)


def _kill_tor(node: ClusterNode) -> str:
    pid = node.tor_pid()
    if pid is None or not pid_is_alive(pid) or not is_tor(pid):
        return "no tor running"
    os.kill(pid, signal.SIGKILL)
    return f"tor pid {pid} killed"


def _kill_and_restart(node: ClusterNode) -> str:
    old = node.process.pid
    node.kill()
    time.sleep(RESTART_SEC)
    fresh = NodeProcess(node.work_dir / "config.toml", node.work_dir / "node.log")
    fresh.start()
    node.process = fresh
    node.killed = False
    return f"daemon pid {old} killed, restarted as pid {fresh.pid}"


async def _inject(
    cluster: RunningCluster, faults: list[Fault], start: float, log: Callable[[str], None]
) -> None:
    for fault in faults:
        await asyncio.sleep(max(0.0, start + fault.at - time.monotonic()))
        node = cluster.node(fault.node)
        action = _kill_tor if fault.kind == "tor" else _kill_and_restart
        fault.detail = await asyncio.to_thread(action, node)
        fault.done_at = time.monotonic() - start
        log(f"soak: t={fault.at:.0f} s {fault.kind} fault on {fault.node}: {fault.detail}")


def _consensus(net: PrivateTorNetwork, client: TorInstance) -> Consensus:
    text = net.consensus_text(client)
    assert text is not None, f"{client.name} has no consensus"
    return parse_consensus(text)


def _rotation_times(consensus: Consensus, since: float, until: float) -> list[float]:
    """Unix times of the SR protocol run starts in [since - run, until]: when tor rotates its
    onion-service descriptors (a run is 24 voting intervals: 8 minutes here, a day live)."""
    params = time_params(consensus)
    run = 24 * params.voting_interval_seconds
    first = srv_run_start(consensus.valid_after, params)
    times: list[float] = []
    at = first - run * (1 + max(0, int((first - since) // run)))
    for _ in range(1000):  # bounded: a few runs at most
        if at > until:
            break
        if at >= since - run:
            times.append(float(at))
        at += run
    return times


def _save_node_logs(cluster: RunningCluster, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for node in cluster.nodes:
        (dest / f"{node.name}.log").write_text(node.process.log_text())


def _tor_restart_expected(fault: Fault, faults: list[Fault]) -> bool:
    """A killed tor must be restarted by its node's watchdog, unless the node's process was
    killed too before the watchdog's check (then the restarted daemon starts a new tor)."""
    if fault.kind != "tor" or fault.detail == "no tor running":
        return False
    return not any(
        f.kind == "process" and f.node == fault.node and 0 < f.at - fault.at < 45.0 for f in faults
    )


@pytest.mark.tor
async def test_soak_with_random_tor_and_node_kills(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    seed_text = os.environ.get("RB_SOAK_SEED", "").strip()
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"\nsoak: seed {seed} (set RB_SOAK_SEED={seed} to replay the schedule)")
    report_path = request.config.rootpath / "test-logs" / "soak.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        running_cluster(
            tor_network, tmp_path / "cluster", overrides=lambda _index: INSTANCE_MODE
        ) as cluster,
        contextlib.ExitStack() as keep,
    ):
        # The nodes' logs go next to the report (pass or fail): the temp folder does not last.
        keep.callback(_save_node_logs, cluster, report_path.parent / "soak-nodes")
        clients = await asyncio.gather(
            asyncio.to_thread(tor_client_factory), asyncio.to_thread(tor_client_factory)
        )
        await asyncio.to_thread(cluster.wait_formed, NODE_PUBLISH_TIMEOUT)
        socks = [c.socks_address for c in clients]
        assert all(s is not None for s in socks)
        sockets = [s for s in socks if s is not None]
        consensus = _consensus(tor_network, clients[0])
        for i, s in enumerate(sockets):  # both clients reach the master before the clock runs
            await get_with_retries(s, cluster.address, isolation=f"soak-warm-{i}", deadline_s=180)

        faults = _schedule(rng, [n.name for n in cluster.nodes])
        stats = LoadStats()
        start = time.monotonic()
        stop_at = start + LOAD_SECS
        wall_start = time.time()
        async with asyncio.TaskGroup() as group:
            for i in range(WORKERS):
                group.create_task(
                    _worker(i, sockets[i % len(sockets)], cluster.address, stats, stop_at)
                )
            group.create_task(_inject(cluster, faults, start, print))
        end = time.monotonic()
        # Every gap is held to the fault bound; a gap at a rotation with no fault in the
        # failover budget before it is held to the rotation bound (module docstring).
        to_wall = wall_start - start
        rotations = _rotation_times(consensus, wall_start, wall_start + (end - start))
        gaps = [(a - start, b - start) for a, b in stats.gaps(start, end)]
        rotation_gaps: list[tuple[float, float]] = []
        for a, b in gaps:
            spans = any(
                a + start + to_wall <= r + ROTATION_PROPAGATION and b + start + to_wall >= r
                for r in rotations
            )
            after_fault = any(0.0 <= a - f.at <= FAILOVER_BUDGET for f in faults)
            if spans and not after_fault:
                rotation_gaps.append((a, b))
        gap, gap_at = max((b - a, a) for a, b in gaps)
        rotation_gap = max((b - a for a, b in rotation_gaps), default=0.0)
        total = stats.ok + stats.failed
        ratio = stats.ok / total if total else 0.0
        min_ratio = 1.0 - len(faults) * FAILOVER_BUDGET / LOAD_SECS
        max_gap = FAILOVER_BUDGET + REQUEST_TIMEOUT

        # Recovery: the restarted node rejoins, the killed tors were restarted by the watchdog.
        await asyncio.to_thread(cluster.wait_formed, NODE_PUBLISH_TIMEOUT)
        recovered_after = time.monotonic() - end
        publishers = cluster.publishers()
        watchdog_restarts: dict[str, int] = {}
        for fault in faults:
            if not _tor_restart_expected(fault, faults):
                continue
            node = cluster.node(fault.node)
            lines = log_lines(
                node.process.log_text(),
                r"^Tor restarted via managed process$",
                after=wall_start + fault.at - 1,
            )
            watchdog_restarts[fault.node] = watchdog_restarts.get(fault.node, 0) + len(lines)

        report: dict[str, Any] = {
            "seed": seed,
            "load_secs": LOAD_SECS,
            "workers": WORKERS,
            "requests_ok": stats.ok,
            "requests_failed": stats.failed,
            "success_ratio": round(ratio, 4),
            "success_ratio_bound": round(min_ratio, 4),
            "longest_gap_secs": round(gap, 1),
            "longest_gap_from_secs": round(gap_at, 1),
            "longest_gap_bound_secs": max_gap,
            "descriptor_rotations_at_secs": [round(r - wall_start, 1) for r in rotations],
            "longest_rotation_gap_secs": round(rotation_gap, 1),
            "rotation_gap_bound_secs": ROTATION_GAP_BOUND,
            "identity_mode": "instance",
            "answered_by": dict(stats.answered_by),
            "errors": dict(stats.errors),
            "failures_at_secs": [[round(t - start, 1), e] for t, e in stats.failures],
            "faults": [
                {"at_secs": round(f.at, 1), "kind": f.kind, "node": f.node, "detail": f.detail}
                for f in faults
            ],
            "recovered_secs_after_load": round(recovered_after, 1),
            "publishers_after": publishers,
        }
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print("soak: " + json.dumps(report))

        assert len(publishers) == 1, publishers
        assert all(f.done_at is not None for f in faults)
        for fault in faults:
            if _tor_restart_expected(fault, faults):
                assert watchdog_restarts.get(fault.node, 0) >= 1, (fault, watchdog_restarts)
        assert total > 0
        assert gap <= max_gap, report
        assert rotation_gap <= ROTATION_GAP_BOUND, report
        assert ratio >= min_ratio, report
        # More than one node served: the load was balanced, not pinned to one survivor.
        assert len(stats.answered_by) >= 2, report
