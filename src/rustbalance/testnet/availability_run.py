"""One availability run: a 3-node cluster on a private Tor network, load, faults, report.

The scenario of issue 14: three ``rustbalance run`` nodes (the launcher of the multi-node
tests, :func:`rustbalance.testnet.cluster.launch_cluster`, product coordination timings) in a
chosen identity mode (``""``: no ``identity_mode`` key, the default), optionally with plain
tor backends (Onionbalance-style instances listed in ``[master] backends``), on a private
network whose voting interval sets the time-period length (10 s voting: 4-minute periods, a
descriptor rotation every 240 s and a period change 120 s after each). Fresh-circuit and
keep-alive clients (:mod:`.availability`) load the master address while:

- optionally the cluster is changed node by node (a rolling migration: node-c, node-b, then
  node-a, the publisher, each stopped, its ``identity_mode`` changed and started again, the
  next one once the restarted node's intro points are published);
- faults hit the nodes (:class:`Fault`: SIGKILL of a daemon and its tor for good, of a tor
  alone, which the node's watchdog restarts, or of both with the daemon started again 3 s
  later, as systemd's ``Restart=always`` would);
- the load lasts ``load_secs``, or, with ``cover``, until it has seen each boundary kind
  (a descriptor rotation, a period change) at least ``lead_secs`` after it started (and after
  the migration), plus ``tail_secs``.

Afterwards the run waits (bounded) for the cluster to re-form: one publisher, every live
node's intro points known. Written to the output folder: ``availability.json`` (the summary,
every request), ``timeline.png`` and the nodes' logs.

Used by tests/reliability/test_availability.py (CI length) and benchmarks/bench_availability.py
(the long runs); by hand::

    python -m rustbalance.testnet.availability_run OUT_DIR --identity-mode instance --secs 540

Every process it starts is stopped by PID (the network's tors, the nodes and their tors, the
backends), also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rustbalance.crypto.keys import IdentityKey
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.testnet.availability import (
    FRESH,
    LoadGenerator,
    LoadSettings,
    Mark,
    MarkKind,
    RequestRecord,
    plan_cover,
    schedule_marks,
    summarize,
)
from rustbalance.testnet.cluster import (
    LOCALHOST,
    NAMES,
    ClusterNode,
    LaunchedCluster,
    free_udp_ports,
    launch_cluster,
)
from rustbalance.testnet.network import PrivateTorNetwork, TorInstance
from rustbalance.testnet.node import NodeProcess
from rustbalance.testnet.timeline import write_timeline_png
from rustbalance.tor.consensus import parse_consensus, time_params

__all__ = ["Fault", "Scenario", "run_scenario", "running_scenario_cluster"]

# How long the cluster may take to form and answer (network ready, nodes started).
READY_TIMEOUT_SECS = 240.0
# ... and to form again after the load (a restarted node rejoins, a takeover settles).
RECOVERY_TIMEOUT_SECS = 120.0
# systemd's RestartSec in deploy/ (the "restart" fault starts the daemon again after it).
RESTART_SECS = 3.0
# Rolling migration: the next node is changed once the restarted one's intro points are in
# the published descriptor, or after this long (with one intro point per relay, a node whose
# relays are all taken gets none in the descriptor; docs/architecture.md).
MIGRATION_STEP_TIMEOUT_SECS = 60.0
# The watchdog's restart of a killed tor, as the daemon logs it (node/runtime.py).
_TOR_RESTARTED = re.compile(r"Tor restarted via managed process")

FaultAction = Literal["kill", "kill_tor", "restart"]


@dataclass(frozen=True)
class Fault:
    """``action`` on ``node`` at ``at_secs`` after the load start, or, with
    ``after_boundary``, after the first boundary the load covers (see :class:`Scenario`).
    ``kill``: the daemon and its tor SIGKILLed for good (a crashed machine); ``kill_tor``:
    its tor alone (the node's watchdog restarts it); ``restart``: daemon and tor SIGKILLed and
    the daemon started again after ``RESTART_SECS``."""

    action: FaultAction
    node: str
    at_secs: float
    after_boundary: bool = False


@dataclass(frozen=True)
class Scenario:
    identity_mode: str = ""  # [node] identity_mode of every node ("": the key left out)
    plain_backends: int = 0  # plain tor services merged through [master] backends
    load_secs: float = 540.0  # the load's length; with ``cover`` its upper bound
    faults: tuple[Fault, ...] = ()
    # Run until each of these boundary kinds happened at least ``lead_secs`` after the load
    # started (and after the migration), then ``tail_secs`` more.
    cover: tuple[MarkKind, ...] = ()
    lead_secs: float = 10.0
    tail_secs: float = 20.0
    load: LoadSettings = field(default_factory=LoadSettings)
    # The rolling change (None: none): node-c, node-b, node-a restarted one by one with
    # identity_mode set to this ("": the key removed), from ``migrate_from_secs`` on.
    migrate_to: str | None = None
    migrate_from_secs: float = 10.0
    # The nodes start as the release before issue 14 (testnet/previous_release.py: shared
    # allowed in a cluster); a restarted node runs today's.
    previous_release: bool = False
    # Launch the nodes only when no descriptor rotation comes within this long (a cluster
    # of shared nodes loses every intro point at one: the known gap the migration removes).
    calm_start_secs: float = 0.0

    def label(self) -> str:
        mode = self.identity_mode or "default"
        text = mode + (f" + {self.plain_backends} plain backends" if self.plain_backends else "")
        if self.migrate_to is not None:
            text += f" -> {self.migrate_to or 'default'} (rolling)"
        return text


@dataclass
class _Backends:
    tors: list[TorInstance] = field(default_factory=list)
    targets: list[NamedHTTPServer] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [t.onion_address for t in self.tors if t.onion_address]


@contextlib.contextmanager
def _plain_backends(
    network: PrivateTorNetwork, master: IdentityKey, count: int
) -> Iterator[_Backends]:
    backends = _Backends()
    try:
        for i in range(count):
            target = NamedHTTPServer(f"backend{i}-target")
            backends.targets.append(target)
            backends.tors.append(
                network.add_onion_service(
                    f"avbackend{i}{secrets.token_hex(2)}",
                    {80: target.port},
                    onionbalance_master=master.onion_address,
                )
            )
        yield backends
    finally:
        for tor in backends.tors:
            with contextlib.suppress(Exception):
                network.remove(tor)
        for target in backends.targets:
            target.close()


@contextlib.contextmanager
def running_scenario_cluster(
    network: PrivateTorNetwork, work_dir: Path, scenario: Scenario
) -> Iterator[tuple[LaunchedCluster, list[str]]]:
    """The three nodes (and the plain backends) of ``scenario``; stopped afterwards."""
    master = IdentityKey.generate(secrets.token_bytes)
    ports = free_udp_ports(len(NAMES))

    def coordination(index: int) -> dict[str, object]:
        return {
            "listen": f"{LOCALHOST}:{ports[index]}",
            "peers": [f"{LOCALHOST}:{p}" for i, p in enumerate(ports) if i != index],
        }

    with _plain_backends(network, master, scenario.plain_backends) as backends:
        addresses = backends.addresses

        def overrides(index: int) -> dict[str, dict[str, object]]:
            sections: dict[str, dict[str, object]] = {}
            if scenario.identity_mode:
                sections["node"] = {"identity_mode": scenario.identity_mode}
            if addresses:
                sections["master"] = {"backends": addresses}
            return sections

        with launch_cluster(
            network,
            work_dir,
            coordination=coordination,
            listen_ports=ports,
            overrides=overrides,
            master=master,
            previous_release=scenario.previous_release,
        ) as cluster:
            yield cluster, addresses


def _formed(cluster: LaunchedCluster) -> bool:
    """Every live node answers, runs in multi-node mode with intro points of its own, and
    exactly one of them publishes."""
    docs = [n.try_status() for n in cluster.alive()]
    if not docs or any(d is None for d in docs):
        return False
    publishers = [d for d in docs if d and d.get("role") == "publisher"]
    return len(publishers) == 1 and all(
        d and d.get("mode") == "multi" and d["intro_points"]["own_auth_keys"] for d in docs
    )


def _published_auth_keys(cluster: LaunchedCluster) -> set[str]:
    for node in cluster.alive():
        doc = node.try_status()
        if doc and doc.get("role") == "publisher":
            return set(doc["intro_points"].get("published_auth_keys") or ())
    return set()


def _node_published(cluster: LaunchedCluster, node: ClusterNode) -> bool:
    own = node.own_auth_keys()
    return bool(own) and bool(own & _published_auth_keys(cluster))


async def _wait_ready(cluster: LaunchedCluster, socks: list[tuple[str, int]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while not await asyncio.to_thread(_formed, cluster):
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not form")
        await asyncio.sleep(2)
    probe = LoadGenerator(socks, cluster.address, LoadSettings(keepalive_clients=0))
    for client in range(len(socks)):
        while True:
            await probe.fresh_request(client)
            if probe.records[-1].ok:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cluster.address} did not answer through client {client}")
            await asyncio.sleep(2)


def _start_again(node: ClusterNode) -> NodeProcess:
    fresh = NodeProcess(node.work_dir / "config.toml", node.work_dir / "node.log")
    fresh.start()
    node.process = fresh
    node.killed = False
    return fresh


def _fault(node: ClusterNode, action: FaultAction) -> str:
    pid, tor = node.process.pid, node.tor_pid()
    if action == "kill":
        node.kill()
        return f"{node.name}: daemon pid {pid} and tor pid {tor} SIGKILLed"
    if action == "kill_tor":
        node.kill_tor()
        return f"{node.name}: tor pid {tor} SIGKILLed (the watchdog restarts it)"
    node.kill()
    time.sleep(RESTART_SECS)
    fresh = _start_again(node)
    return f"{node.name}: daemon pid {pid} and tor pid {tor} SIGKILLed, restarted as {fresh.pid}"


def _set_identity_mode(config: Path, mode: str) -> None:
    """``[node] identity_mode`` set to ``mode``, or removed when ``mode`` is empty."""
    lines = [
        line for line in config.read_text().splitlines() if not line.startswith("identity_mode")
    ]
    if mode:
        lines.insert(lines.index("[node]") + 1, f'identity_mode = "{mode}"')
    config.write_text("\n".join(lines) + "\n")


def _change_mode(node: ClusterNode, mode: str) -> str:
    """Stop ``node`` (SIGTERM: it leaves the cluster), change its identity mode and start it
    again with the same state and tor data."""
    old_pid = node.process.pid
    node.stop()
    _set_identity_mode(node.work_dir / "config.toml", mode)
    fresh = _start_again(node)
    return (
        f"{node.name}: pid {old_pid} stopped, restarted with identity mode "
        f"{mode or 'left to the default'} as pid {fresh.pid}"
    )


def _save_logs(cluster: LaunchedCluster, out: Path) -> None:
    logs = out / "nodes"
    logs.mkdir(parents=True, exist_ok=True)
    for node in cluster.nodes:
        (logs / f"{node.name}.log").write_text(node.process.log_text())
        tor_log = node.work_dir / "tor" / "tor.log"
        if tor_log.exists():
            shutil.copy(tor_log, logs / f"{node.name}-tor.log")


@dataclass
class _Run:
    """What happened during one run, besides the requests."""

    scenario: Scenario
    cluster: LaunchedCluster
    load: LoadGenerator
    origin: float  # time.monotonic() at the load's time 0
    schedule: list[Mark]  # tor's rotations and period changes, relative to the origin
    marks: list[Mark] = field(default_factory=list)  # faults and migration steps
    details: list[str] = field(default_factory=list)
    migration: list[dict[str, Any]] = field(default_factory=list)
    migrated: asyncio.Event = field(default_factory=asyncio.Event)
    first_boundary: asyncio.Future[float] | None = None
    covered: dict[str, float] = field(default_factory=dict)
    watchdog_logs: list[tuple[str, int]] = field(default_factory=list)  # (node, log offset)

    def now(self) -> float:
        return time.monotonic() - self.origin

    async def until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, self.origin + at - time.monotonic()))

    async def migrate(self) -> None:
        """The rolling change, node by node, the best-ranked (the publisher) last."""
        mode = self.scenario.migrate_to
        if mode is None:
            self.migrated.set()
            return
        await self.until(self.scenario.migrate_from_secs)
        for node in reversed(self.cluster.nodes):
            at = self.now()
            detail = await asyncio.to_thread(_change_mode, node, mode)
            self.marks.append(Mark(at, "fault", f"{node.name} -> {mode or 'default'}"))
            self.details.append(detail)
            deadline = time.monotonic() + MIGRATION_STEP_TIMEOUT_SECS
            published = False
            while time.monotonic() < deadline:
                if await asyncio.to_thread(_node_published, self.cluster, node):
                    published = True
                    break
                await asyncio.sleep(1.0)
            step = {"node": node.name, "at_secs": round(at, 1), "published": published}
            step["back_after_secs"] = round(self.now() - at, 1)
            self.migration.append(step)
        self.migrated.set()

    async def plan(self) -> None:
        """Once the migration is done, end the load when it has covered the boundaries."""
        await self.migrated.wait()
        scenario = self.scenario
        if not scenario.cover:
            self._first(self.now())
            if scenario.migrate_to is not None:  # the migration was the point: end soon
                self.load.end_at(self.now() + scenario.tail_secs)
            return
        not_before = max(scenario.lead_secs, self.now() + scenario.lead_secs)
        planned = plan_cover(self.schedule, not_before, scenario.cover, scenario.tail_secs)
        if planned is None:
            raise RuntimeError("the load's schedule does not reach the boundaries to cover")
        first, end = planned
        for kind in scenario.cover:
            self.covered[kind] = min(
                m.at for m in self.schedule if m.kind == kind and m.at >= not_before
            )
        self._first(first)
        latest = max((f.at_secs + first for f in scenario.faults if f.after_boundary), default=0)
        self.load.end_at(max(end, latest + scenario.tail_secs))

    def _first(self, at: float) -> None:
        assert self.first_boundary is not None
        if not self.first_boundary.done():
            self.first_boundary.set_result(at)

    async def inject(self, fault: Fault) -> None:
        at = fault.at_secs
        if fault.after_boundary:
            assert self.first_boundary is not None
            at += await self.first_boundary
        await self.until(at)
        node = self.cluster.node(fault.node)
        offset = len(node.process.log_text())
        self.marks.append(Mark(self.now(), "fault", f"{fault.action} {fault.node}"))
        self.details.append(await asyncio.to_thread(_fault, node, fault.action))
        if fault.action == "kill_tor":
            self.watchdog_logs.append((fault.node, offset))


async def run_scenario(
    network: PrivateTorNetwork,
    clients: list[TorInstance],
    work_dir: Path,
    out: Path,
    scenario: Scenario,
    *,
    records: list[RequestRecord] | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` on ``network`` with ``clients``; the summary (also written to
    ``out/availability.json``, the picture to ``out/timeline.png``). ``records``, if given,
    receives every request."""
    socks = [c.socks_address for c in clients if c.socks_address is not None]
    if not socks:
        raise ValueError("no client with a SOCKS port")
    if scenario.calm_start_secs > 0:
        await _calm_start(network, clients[0], scenario.calm_start_secs)
    with running_scenario_cluster(network, work_dir, scenario) as (cluster, backends):
        try:
            started = time.monotonic()
            await _wait_ready(cluster, socks)
            ready_secs = time.monotonic() - started
            consensus_text = network.consensus_text(clients[0])
            if consensus_text is None:
                raise RuntimeError("the client has no consensus")
            consensus = parse_consensus(consensus_text)
            params = time_params(consensus)
            wall_start = time.time()
            origin = time.monotonic()
            schedule = schedule_marks(
                consensus.valid_after, params, wall_start, wall_start + scenario.load_secs
            )
            load = LoadGenerator(socks, cluster.address, scenario.load)
            run = _Run(scenario, cluster, load, origin, schedule)
            run.first_boundary = asyncio.get_running_loop().create_future()
            async with asyncio.TaskGroup() as group:
                group.create_task(load.run(scenario.load_secs, origin))
                group.create_task(run.migrate())
                group.create_task(run.plan())
                for fault in scenario.faults:
                    group.create_task(run.inject(fault))
            duration = run.now()
            recovered = await _recover(cluster)
            publishers = [
                n.name for n in cluster.alive() if (n.try_status() or {}).get("role") == "publisher"
            ]
            restarts = {
                name: len(_TOR_RESTARTED.findall(cluster.node(name).process.log_text()[offset:]))
                for name, offset in run.watchdog_logs
            }
        finally:
            await asyncio.to_thread(_save_logs, cluster, out)
    if records is not None:
        records.extend(load.records)
    marks = [m for m in schedule if m.at <= duration] + run.marks
    info = {
        "scenario": {**asdict(scenario), "label": scenario.label()},
        "master": cluster.address,
        "plain_backends": backends,
        "voting_interval_secs": params.voting_interval_seconds,
        "period_length_minutes": params.period_length_minutes,
        "wall_start_unix": round(wall_start, 1),
        "ready_secs": round(ready_secs, 1),
        "covered_at_secs": {k: round(v, 1) for k, v in run.covered.items()},
        "faults": run.details,
        "migration": run.migration,
        "recovered_secs_after_load": recovered,
        "publishers_after": publishers,
        "watchdog_restarts": restarts,
    }
    summary = summarize(load.records, marks, duration, info)
    await asyncio.to_thread(_write_outputs, out, summary, load.records, marks, scenario)
    return summary


async def _calm_start(network: PrivateTorNetwork, client: TorInstance, secs: float) -> None:
    """Return when no descriptor rotation comes within ``secs`` (waiting past one if due)."""
    text = network.consensus_text(client)
    if text is None:
        raise RuntimeError("the client has no consensus")
    consensus = parse_consensus(text)
    now = time.time()
    marks = schedule_marks(consensus.valid_after, time_params(consensus), now, now + secs)
    rotations = [m.at for m in marks if m.kind == "rotation"]
    if rotations:
        await asyncio.sleep(rotations[0] + 5.0)


async def _recover(cluster: LaunchedCluster) -> float | None:
    """Seconds until the cluster formed again after the load (None: not within the bound)."""
    began = time.monotonic()
    while time.monotonic() - began < RECOVERY_TIMEOUT_SECS:
        if await asyncio.to_thread(_formed, cluster):
            return round(time.monotonic() - began, 1)
        await asyncio.sleep(2)
    return None


def _write_outputs(
    out: Path,
    summary: dict[str, Any],
    records: Sequence[RequestRecord],
    marks: list[Mark],
    scenario: Scenario,
) -> None:
    fresh = summary["kinds"][FRESH]
    title = (
        f"{scenario.label()}: success {summary['success_rate']:.1%}, fresh-circuit longest gap "
        f"{fresh['longest_gap_secs']} s, TTFB p50/p95 {fresh['ttfb_p50_secs']}/"
        f"{fresh['ttfb_p95_secs']} s ({summary['voting_interval_secs']} s voting)"
    )
    write_timeline_png(
        out / "timeline.png",
        records,
        marks,
        summary["duration_secs"],
        title,
        scenario.load.timeout,
    )
    document = {**summary, "records": [asdict(r) for r in records]}
    (out / "availability.json").write_text(json.dumps(document, indent=1) + "\n")


async def _main_async(args: argparse.Namespace, out: Path, base: Path) -> int:
    network = PrivateTorNetwork(base / "net", n_relays=4, voting_interval=args.voting)
    try:
        await asyncio.to_thread(network.start)
        clients = []
        for i in range(2):
            # An info log shows what each client did with the descriptor and intro points.
            lines = [f"Log info file {base / f'avclient{i}-info.log'}"] if args.client_info else []
            clients.append(
                await asyncio.to_thread(network.add_client, f"avclient{i}", extra_lines=lines)
            )
        faults = (Fault("kill", args.kill, args.kill_at),) if args.kill else ()
        scenario = Scenario(
            identity_mode=args.identity_mode,
            plain_backends=args.backends,
            load_secs=args.secs,
            faults=faults,
            cover=tuple(args.cover),
            migrate_to=args.migrate_to,
            load=LoadSettings(fresh_rate=args.rate, keepalive_clients=args.keepalive),
        )
        summary = await run_scenario(network, clients, base / "cluster", out, scenario)
        print(json.dumps({k: v for k, v in summary.items() if k != "marks"}, indent=1))
        return 0
    finally:
        await asyncio.to_thread(_stop_and_collect, network, base, out)


def _stop_and_collect(network: PrivateTorNetwork, base: Path, out: Path) -> None:
    network.stop()
    with contextlib.suppress(OSError):
        network.collect_logs(out / "tor-network")
        for info in base.glob("avclient*-info.log"):
            shutil.copy(info, out / info.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rustbalance.testnet.availability_run")
    parser.add_argument("out", help="output folder (availability.json, timeline.png, logs)")
    parser.add_argument(
        "--identity-mode", default="", choices=["shared", "instance", ""], help="'' = default"
    )
    parser.add_argument("--backends", type=int, default=0, help="plain tor backends to merge")
    parser.add_argument("--secs", type=float, default=540.0, help="load duration (upper bound)")
    parser.add_argument("--kill", default="node-a", help="node to SIGKILL ('' = none)")
    parser.add_argument("--kill-at", type=float, default=200.0)
    parser.add_argument(
        "--cover", nargs="*", default=[], choices=["rotation", "period"], help="run until seen"
    )
    parser.add_argument("--voting", type=int, default=10, help="voting interval (s)")
    parser.add_argument("--rate", type=float, default=2.0, help="fresh-circuit requests/s")
    parser.add_argument("--keepalive", type=int, default=2, help="keep-alive clients")
    parser.add_argument(
        "--migrate-to", default=None, help="rolling change of node-c, b, a to this mode"
    )
    parser.add_argument("--client-info", action="store_true", help="info logs of the clients")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    return asyncio.run(_main_async(args, out, Path(tempfile.mkdtemp(prefix="rb-avail-"))))


if __name__ == "__main__":
    sys.exit(main())
