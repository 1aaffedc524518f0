"""Failover on the private Tor network: the embedded coordination vs the etcd backend.

Two 3-node clusters, one after the other on one fresh private network (3 authorities, 4
relays, 20 s voting), each with its product defaults: the embedded sealed-UDP coordination
(heartbeat 5 s, timeout 15 s, takeover grace 15 s; :func:`benchmarks.onion_cluster.
bench_cluster`) and ``[coordination] backend = "etcd"`` against a 3-member etcd cluster on
loopback (lease TTL 10 s; :func:`benchmarks.onion_cluster.bench_etcd_cluster`). For each:
start -> every node's intro points in a fetched descriptor, then SIGKILL of the publisher
(daemon and tor) -> the first upload of a new publisher accepted by an HSDir (its log), a
fetched descriptor with a higher revision and without the dead publisher's intro points, and
the master answering through a client tor that never fetched it. The probes and the kill are
bench_onion's (:func:`benchmarks.bench_onion._kill_publisher`), so the embedded row measures
what bench_onion's "publisher killed" row measures; here it stands beside etcd's, same run.

Every process is stopped by PID, every wait is bounded; a bound that was hit reads "> N s".
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from benchmarks.bench_onion import (
    BOUNDS,
    FORM_TIMEOUT,
    Figures,
    _cell,
    _Fetched,
    _kill_publisher,
    _network,
    _roles,
    _watch_descriptor,
)
from benchmarks.onion_cluster import BenchCluster, bench_cluster, bench_etcd_cluster
from benchmarks.results import finite, record
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.network import TorInstance

EMBEDDED = "embedded (UDP heartbeats 5/15/15 s)"
ETCD = "etcd (3 members, lease TTL 10 s)"
Launcher = Callable[[PrivateTorNetwork, Path], AbstractContextManager[BenchCluster]]
SYSTEMS: dict[str, Launcher] = {EMBEDDED: bench_cluster, ETCD: bench_etcd_cluster}
FIGURES = ("formed", "takeover_accepted", "takeover_fetched", "takeover_answering")


def _failover(
    net: PrivateTorNetwork, probe: TorInstance, work: Path, launch: Launcher, tag: str
) -> Figures:
    fresh = net.add_client(f"failover{tag}")
    try:
        with launch(net, work) as cluster:
            figures: Figures = {}

            def formed(fetched: _Fetched) -> bool:
                return _roles(cluster) is not None and all(
                    fetched.auth_keys & node.own_auth_keys() for node in cluster.nodes
                )

            figures["formed"], last = _watch_descriptor(
                probe, cluster.address, cluster.started, FORM_TIMEOUT, formed
            )
            roles = _roles(cluster)
            if figures["formed"] is None or roles is None or last is None:
                return figures  # the takeover figures are absent: not measured
            publisher, _standbys = roles
            _kill_publisher(cluster, probe, fresh, publisher, last, figures)
            return figures
    finally:
        net.remove(fresh)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rb-bench-failover-") as tmp:
        yield Path(tmp)


def _ratio(etcd: Figures, embedded: Figures, key: str) -> str:
    mine, theirs = etcd.get(key), embedded.get(key)
    if mine is None or theirs is None:
        return "—"
    return f"{mine / theirs:.2f}x"


def run() -> list[str]:
    results: dict[str, Figures] = {}
    failed: dict[str, str] = {}
    load = os.getloadavg()[0]
    with _workdir() as base, _network(base) as (net, probe):
        for index, (name, launch) in enumerate(SYSTEMS.items()):
            try:
                results[name] = _failover(net, probe, base / f"sys{index}", launch, str(index))
            except Exception as exc:  # one failed system is reported, the other still runs
                failed[name] = f"{type(exc).__name__}: {exc}"
                results[name] = {}
    record(
        "failover",
        "systems",
        {name: {k: finite(v) for k, v in figures.items()} for name, figures in results.items()},
    )
    embedded, etcd = results.get(EMBEDDED, {}), results.get(ETCD, {})
    lines = [
        "## Failover: embedded coordination vs etcd",
        "",
        "One private Tor network, the two 3-node clusters one after the other, each with its "
        "default timings; SIGKILL of the publisher (daemon and its tor) -> ... (load average "
        f'{load:.2f} when this section started). A bound that was hit reads "> N s".',
        "",
        "| coordination | start -> every node's intro points fetched | ... a new publisher's "
        "upload accepted by an HSDir | ... a fetched descriptor without its intro points | "
        "... master answers through a fresh client |",
        "|---|---|---|---|---|",
    ]
    for name, figures in results.items():
        cells = " | ".join(_cell(name, figures, key) for key in FIGURES)
        lines.append(f"| {name} | {cells} |")
    lines.append(
        "| etcd / embedded | " + " | ".join(_ratio(etcd, embedded, key) for key in FIGURES) + " |"
    )
    lines += [""]
    for name, reason in failed.items():
        lines += [f"{name}: FAILED: {reason}", ""]
    lines += [
        "- Embedded: a standby takes over once the publisher was silent for the heartbeat "
        "timeout plus the takeover grace (30 s with the defaults), then publishes at once.",
        "- etcd: the dead publisher's lease expires at most `lease_ttl_secs` (10 s) after its "
        "last keep-alive; etcd deletes its candidacy, the next candidate learns it from its "
        "watch at once and publishes (every upload fenced by a transaction on its "
        "candidacy). The etcd members run on the same 2 cores.",
        f"- Bounds: {', '.join(f'{k} {BOUNDS[k]:.0f} s' for k in FIGURES)}.",
        "",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(run()))
