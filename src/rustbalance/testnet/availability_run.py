"""One availability run: a 3-node cluster on a private Tor network, load, faults, report.

The scenario of issue 14: three ``rustbalance run`` nodes (the launcher of the multi-node
tests, :func:`rustbalance.testnet.cluster.launch_cluster`, product coordination timings) in a
chosen identity mode, optionally with plain tor backends (Onionbalance-style instances listed
in ``[master] backends``), on a private network whose voting interval sets the time-period
length (10 s voting: 4-minute periods, a descriptor rotation every 240 s and a period change
120 s after each). Fresh-circuit and keep-alive clients (:mod:`.availability`) load the master
address while one node (daemon and its tor) is SIGKILLed at a chosen time. Written to the
output folder: ``availability.json`` (the summary, every request), ``timeline.png``, and the
nodes' logs.

Used by tests/reliability/test_availability.py (CI length) and benchmarks/bench_availability.py
(the long run); by hand::

    python -m rustbalance.testnet.availability_run OUT_DIR --identity-mode instance --secs 540

Every process it starts is stopped by PID (the network's tors, the nodes and their tors, the
backends), also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.testnet.availability import (
    FRESH,
    LoadGenerator,
    LoadSettings,
    Mark,
    RequestRecord,
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

__all__ = ["Scenario", "run_scenario", "running_scenario_cluster"]

# How long the cluster may take to form and answer (network ready, nodes started).
READY_TIMEOUT_SECS = 240.0


@dataclass(frozen=True)
class Scenario:
    identity_mode: str = "instance"  # [node] identity_mode of every node ("" = the default)
    plain_backends: int = 0  # plain tor services merged through [master] backends
    load_secs: float = 540.0
    kill_node: str | None = "node-a"  # SIGKILLed (daemon and its tor) at kill_at_secs
    kill_at_secs: float = 200.0
    # Start the load this many seconds before the next descriptor rotation ("rotation") or
    # time-period start ("period"), as ``align_to`` says (None: at once).
    lead_secs: float | None = None
    align_to: str = "rotation"
    load: LoadSettings = field(default_factory=LoadSettings)
    # The rolling shared -> instance migration: at each time one more node (node-c first) is
    # stopped, switched to identity_mode = "instance" and started again.
    migrate_at_secs: tuple[float, ...] = ()

    def label(self) -> str:
        mode = self.identity_mode or "default"
        return f"{mode}" + (
            f" + {self.plain_backends} plain backends" if self.plain_backends else ""
        )


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

    def coordination(index: int, token: Path) -> dict[str, object]:
        return {
            "cluster_token_path": token,
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
        ) as cluster:
            yield cluster, addresses


def _formed(cluster: LaunchedCluster) -> bool:
    docs = [n.try_status() for n in cluster.alive()]
    if any(d is None for d in docs):
        return False
    publishers = [d for d in docs if d and d.get("role") == "publisher"]
    return len(publishers) == 1 and all(
        d and d.get("mode") == "multi" and d["intro_points"]["own_auth_keys"] for d in docs
    )


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


def _kill(node: ClusterNode) -> str:
    pid = node.process.pid
    tor = node.tor_pid()
    node.kill()
    return f"{node.name}: daemon pid {pid} and tor pid {tor} SIGKILLed"


def _restart_as_instance(node: ClusterNode) -> str:
    """Stop ``node`` (SIGTERM: it leaves the cluster), switch its config to
    ``identity_mode = "instance"`` and start it again with the same state and tor data."""
    config = node.work_dir / "config.toml"
    old_pid = node.process.pid
    node.stop()
    text = config.read_text()
    if 'identity_mode = "shared"' in text:
        text = text.replace('identity_mode = "shared"', 'identity_mode = "instance"')
    else:
        text = text.replace("[node]\n", '[node]\nidentity_mode = "instance"\n', 1)
    config.write_text(text)
    fresh = NodeProcess(config, node.work_dir / "node.log")
    fresh.start()
    node.process = fresh
    return f"{node.name}: pid {old_pid} stopped, restarted in instance mode as pid {fresh.pid}"


def _save_logs(cluster: LaunchedCluster, out: Path) -> None:
    logs = out / "nodes"
    logs.mkdir(parents=True, exist_ok=True)
    for node in cluster.nodes:
        (logs / f"{node.name}.log").write_text(node.process.log_text())
        tor_log = node.work_dir / "tor" / "tor.log"
        if tor_log.exists():
            shutil.copy(tor_log, logs / f"{node.name}-tor.log")


async def run_scenario(
    network: PrivateTorNetwork,
    clients: list[TorInstance],
    work_dir: Path,
    out: Path,
    scenario: Scenario,
) -> dict[str, Any]:
    """Run ``scenario`` on ``network`` with ``clients``; the summary (also written to
    ``out/availability.json``, the picture to ``out/timeline.png``)."""
    socks = [c.socks_address for c in clients if c.socks_address is not None]
    if not socks:
        raise ValueError("no client with a SOCKS port")
    with running_scenario_cluster(network, work_dir, scenario) as (cluster, backends):
        try:
            await _wait_ready(cluster, socks)
            consensus_text = network.consensus_text(clients[0])
            if consensus_text is None:
                raise RuntimeError("the client has no consensus")
            consensus = parse_consensus(consensus_text)
            params = time_params(consensus)
            if scenario.lead_secs is not None:
                run = params.srv_run_seconds
                now = time.time()
                ahead = [
                    m.at
                    for m in schedule_marks(consensus.valid_after, params, now, now + 2 * run)
                    if m.kind == scenario.align_to and m.at >= scenario.lead_secs
                ]
                await asyncio.sleep(ahead[0] - scenario.lead_secs)
            load = LoadGenerator(socks, cluster.address, scenario.load)
            faults: list[Mark] = []
            fault_details: list[str] = []
            wall_start = time.time()
            origin = time.monotonic()

            async def inject() -> None:
                if scenario.kill_node is None:
                    return
                await asyncio.sleep(max(0.0, origin + scenario.kill_at_secs - time.monotonic()))
                at = time.monotonic() - origin
                detail = await asyncio.to_thread(_kill, cluster.node(scenario.kill_node))
                faults.append(Mark(at, "fault", f"SIGKILL {scenario.kill_node}"))
                fault_details.append(detail)

            async def migrate() -> None:
                # The rolling shared -> instance change, node by node, the best-ranked last.
                for when, node in zip(
                    scenario.migrate_at_secs, reversed(cluster.nodes), strict=False
                ):
                    await asyncio.sleep(max(0.0, origin + when - time.monotonic()))
                    at = time.monotonic() - origin
                    detail = await asyncio.to_thread(_restart_as_instance, node)
                    faults.append(Mark(at, "fault", f"{node.name} -> instance"))
                    fault_details.append(detail)

            async with asyncio.TaskGroup() as group:
                group.create_task(load.run(scenario.load_secs, origin))
                group.create_task(inject())
                group.create_task(migrate())
            marks = [
                *schedule_marks(
                    consensus.valid_after, params, wall_start, wall_start + scenario.load_secs
                ),
                *faults,
            ]
        finally:
            await asyncio.to_thread(_save_logs, cluster, out)
    records: list[RequestRecord] = load.records
    info = {
        "scenario": {**asdict(scenario), "label": scenario.label()},
        "master": cluster.address,
        "plain_backends": backends,
        "voting_interval_secs": params.voting_interval_seconds,
        "period_length_minutes": params.period_length_minutes,
        "wall_start_unix": round(wall_start, 1),
        "faults": fault_details,
    }
    summary = summarize(records, marks, scenario.load_secs, info)
    await asyncio.to_thread(_write_outputs, out, summary, records, marks, scenario)
    return summary


def _write_outputs(
    out: Path,
    summary: dict[str, Any],
    records: list[RequestRecord],
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
        out / "timeline.png", records, marks, scenario.load_secs, title, scenario.load.timeout
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
        scenario = Scenario(
            identity_mode=args.identity_mode,
            plain_backends=args.backends,
            load_secs=args.secs,
            kill_node=args.kill or None,
            kill_at_secs=args.kill_at,
            lead_secs=args.lead,
            align_to=args.align_to,
            migrate_at_secs=tuple(args.migrate_at),
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
    parser.add_argument("--identity-mode", default="instance", choices=["shared", "instance", ""])
    parser.add_argument("--backends", type=int, default=0, help="plain tor backends to merge")
    parser.add_argument("--secs", type=float, default=540.0, help="load duration")
    parser.add_argument("--kill", default="node-a", help="node to SIGKILL ('' = none)")
    parser.add_argument("--kill-at", type=float, default=200.0)
    parser.add_argument("--lead", type=float, default=None, help="start N s before --align-to")
    parser.add_argument("--align-to", default="rotation", choices=["rotation", "period"])
    parser.add_argument("--voting", type=int, default=10, help="voting interval (s)")
    parser.add_argument("--rate", type=float, default=2.0, help="fresh-circuit requests/s")
    parser.add_argument("--keepalive", type=int, default=2, help="keep-alive clients")
    parser.add_argument(
        "--migrate-at", type=float, nargs="*", default=[], help="restart node-c, b, a as instance"
    )
    parser.add_argument("--client-info", action="store_true", help="info logs of the clients")
    args = parser.parse_args(argv)
    out = Path(args.out).absolute()
    return asyncio.run(_main_async(args, out, Path(tempfile.mkdtemp(prefix="rb-avail-"))))


if __name__ == "__main__":
    sys.exit(main())
