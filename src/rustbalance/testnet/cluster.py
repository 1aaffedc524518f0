"""A RustBalance cluster of ``rustbalance run`` daemons on a private Tor network.

Used by the multi-node end-to-end tests (``tests/node_e2e/cluster_helpers.py``, which adds a
UDP fault relay and short timings) and by the onion benchmark (``benchmarks/onion_cluster.py``,
production timings): one launcher, so what is measured is what is tested.

:func:`launch_cluster` writes one master key (0600, never on a command line), then one config
per node (each node makes its own node key at its first start and, holding the master key,
admits itself; the nodes learn each other through their seed addresses): its own managed tor
joined to the network, its own target (a :class:`~rustbalance.testnet.apps.NamedHTTPServer`
answering ``hello from <node>-target``), priority 10/20/30 and the coordination section the
caller builds, plus any further sections. All configs are written before the first daemon
starts, so "started" means all of them at (nearly) once. Every daemon, and its managed tor, is
stopped by PID (SIGTERM, then SIGKILL), also when the caller fails.

:func:`launch_etcd_cluster` runs the same nodes with ``[coordination] backend = "etcd"``
against a 3-member etcd cluster it starts first (:mod:`rustbalance.testnet.etcd_cluster`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.node.status import read_status
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.testnet.etcd_cluster import EtcdCluster, TestPki, etcd_sections
from rustbalance.testnet.network import PrivateTorNetwork
from rustbalance.testnet.node import NodeProcess, write_node_config
from rustbalance.testnet.previous_release import MODULE as PREVIOUS_RELEASE
from rustbalance.tor.process import pid_is_alive

__all__ = [
    "LOCALHOST",
    "NAMES",
    "PRIORITIES",
    "UPLOAD_TIMEOUT_SECS",
    "ClusterNode",
    "EtcdBackedCluster",
    "LaunchedCluster",
    "OverridesFor",
    "SectionsFor",
    "free_udp_ports",
    "is_tor",
    "launch_cluster",
    "launch_etcd_cluster",
    "stop_all",
]

LOCALHOST = "127.0.0.1"
NAMES = ("node-a", "node-b", "node-c")
PRIORITIES = (10, 20, 30)
# On a loaded private network one cold HSDir circuit can hold an upload round for the whole
# default 60 s, and a period counts as published as soon as any HSDir accepted it, so the
# stragglers get less time (this only bounds the wait for their verdicts).
UPLOAD_TIMEOUT_SECS = 15

_TOR_PID = re.compile(r"started tor pid (\d+)")


def free_udp_ports(n: int) -> list[int]:
    """n distinct free UDP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def is_tor(pid: int) -> bool:
    """Whether ``pid`` is a tor now: PIDs are reused, so only signal one that still is."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "tor"
    except OSError:
        return False


@dataclass
class ClusterNode:
    name: str
    priority: int
    process: NodeProcess
    work_dir: Path
    target: NamedHTTPServer
    listen_port: int
    killed: bool = False

    @property
    def status_socket(self) -> Path:
        return self.work_dir / "state" / "status.sock"

    def status(self) -> dict[str, Any]:
        """The daemon's status document (raises when it does not answer)."""
        return read_status(self.status_socket)

    def try_status(self) -> dict[str, Any] | None:
        """The status document, None when the node was killed or does not answer (yet)."""
        if self.killed:
            return None
        try:
            return self.status()
        except Exception:
            return None

    def own_auth_keys(self) -> frozenset[str]:
        """The auth keys of this node's own intro points (empty when unknown)."""
        doc = self.try_status() or {}
        return frozenset((doc.get("intro_points") or {}).get("own_auth_keys") or ())

    def tor_pid(self) -> int | None:
        """The managed tor's PID, from the daemon's log (None before tor started)."""
        found = _TOR_PID.findall(self.process.log_text())
        return int(found[-1]) if found else None

    def _kill_tor(self, tor_pid: int | None) -> None:
        if tor_pid is not None and pid_is_alive(tor_pid) and is_tor(tor_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(tor_pid, signal.SIGKILL)

    def kill_tor(self) -> None:
        """SIGKILL only the managed tor (by PID): the daemon's watchdog restarts it."""
        self._kill_tor(self.tor_pid())

    def kill(self) -> None:
        """SIGKILL the daemon and its tor by PID: a crashed machine, no lease release."""
        tor_pid = self.tor_pid()
        self.killed = True
        self.process.stop(signal.SIGKILL, timeout=10)
        self._kill_tor(tor_pid)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 30 s); the managed tor exits with it, made sure by PID."""
        tor_pid = self.tor_pid()
        self.process.stop()
        self._kill_tor(tor_pid)


@dataclass
class LaunchedCluster:
    master: IdentityKey
    nodes: list[ClusterNode]
    started: float  # time.monotonic() just before the first daemon was launched

    @property
    def address(self) -> str:
        return self.master.onion_address

    def node(self, name: str) -> ClusterNode:
        return next(n for n in self.nodes if n.name == name)

    def alive(self) -> list[ClusterNode]:
        return [n for n in self.nodes if not n.killed]

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {n.name: n.try_status() for n in self.alive()}


# node index -> the node's [coordination] section.
CoordinationFor = Callable[[int], Mapping[str, object]]
# node index -> extra config keys per section (e.g. [node] identity_mode, [master] backends,
# [publish] distinct_descriptors).
OverridesFor = Callable[[int], Mapping[str, Mapping[str, object]]]
# (node index, its coordination listen port) -> more config sections (or keys) for that node.
SectionsFor = Callable[[int, int], Mapping[str, Mapping[str, object]]]


@contextlib.contextmanager
def launch_cluster(
    network: PrivateTorNetwork,
    work_dir: Path,
    *,
    coordination: CoordinationFor,
    listen_ports: list[int],
    overrides: OverridesFor | None = None,
    master: IdentityKey | None = None,
    previous_release: bool = False,
    names: Sequence[str] = NAMES,
    sections: SectionsFor | None = None,
) -> Iterator[LaunchedCluster]:
    """Start one daemon per name in ``names`` (:data:`NAMES` by default); stop every one (and
    its tor) afterwards.

    ``listen_ports[i]`` is node i's UDP coordination port (its ``coordination.listen``, which
    ``coordination`` must set); ``coordination(i)`` gives node i's section;
    ``overrides(i)`` adds or replaces keys of node i's other sections, and
    ``sections(i, listen_ports[i])`` (optional) more keys, merged key by key after them (a
    value of None removes a key; it runs after the master key file and node i's folder
    exist); ``master`` is the master key to use (default: a new one); ``previous_release``
    starts the daemons as the release before issue 14 (testnet/previous_release.py:
    ``shared`` allowed in a cluster). Node i gets priority ``10 * (i + 1)`` (:data:`PRIORITIES`
    for the first three).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if master is None:
        master = IdentityKey.generate(secrets.token_bytes)
    key_file = work_dir / "master.key"
    write_seed_key_file(master, key_file)
    nodes: list[ClusterNode] = []
    targets: list[NamedHTTPServer] = []
    try:
        configs: list[Path] = []
        priorities = [10 * (index + 1) for index in range(len(names))]
        for index, name in enumerate(names):
            node_dir = work_dir / name
            node_dir.mkdir()
            target = NamedHTTPServer(f"{name}-target")
            targets.append(target)
            config_sections = _merged(
                {
                    "node": {"priority": priorities[index]},
                    "publish": {"upload_timeout_secs": UPLOAD_TIMEOUT_SECS},
                    "coordination": coordination(index),
                },
                overrides(index) if overrides is not None else {},
            )
            configs.append(
                write_node_config(
                    node_dir / "config.toml",
                    node_id=name,
                    key_file=key_file,
                    master_address=master.onion_address,
                    target=f"{LOCALHOST}:{target.port}",
                    work_dir=node_dir,
                    extra_torrc=network.client_torrc_lines(),
                    overrides=_merged(
                        config_sections,
                        sections(index, listen_ports[index]) if sections is not None else {},
                    ),
                )
            )
        started = time.monotonic()
        for index, config in enumerate(configs):
            module = PREVIOUS_RELEASE if previous_release else "rustbalance.cli.main"
            process = NodeProcess(config, config.parent / "node.log", module=module)
            process.start()
            nodes.append(
                ClusterNode(
                    names[index],
                    priorities[index],
                    process,
                    config.parent,
                    targets[index],
                    listen_ports[index],
                )
            )
        yield LaunchedCluster(master, nodes, started)
    finally:
        stop_all(nodes, targets)


@dataclass
class EtcdBackedCluster:
    """The nodes of :func:`launch_etcd_cluster`, the etcd cluster they use and its PKI."""

    launched: LaunchedCluster
    etcd: EtcdCluster
    pki: TestPki


# (node index, the etcd cluster) -> the endpoints that node is configured with.
EndpointsFor = Callable[[int, EtcdCluster], list[str]]


@contextlib.contextmanager
def launch_etcd_cluster(
    network: PrivateTorNetwork,
    work_dir: Path,
    *,
    lease_ttl_secs: int = 10,
    endpoints: EndpointsFor | None = None,
    sections: SectionsFor | None = None,
) -> Iterator[EtcdBackedCluster]:
    """The nodes of :func:`launch_cluster` with ``[coordination] backend = "etcd"``: a test
    PKI (one client certificate per node, CN = node id), a 3-member etcd cluster with TLS,
    client-certificate auth and the RBAC of docs/etcd.md, started first; every node talks to
    all members (or to ``endpoints(i, etcd)``, e.g. relays a test can cut). Everything is
    stopped by PID afterwards, the nodes first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    pki = TestPki(work_dir / "pki")
    etcd = EtcdCluster(work_dir / "etcd", pki, node_ids=NAMES)
    etcd.start()
    try:

        def node_sections(index: int, listen_port: int) -> dict[str, dict[str, object]]:
            found = endpoints(index, etcd) if endpoints is not None else etcd.endpoints
            own = etcd_sections(
                pki,
                pki.client(NAMES[index]),
                found,
                prefix=etcd.prefix,
                lease_ttl_secs=lease_ttl_secs,
            )
            more = sections(index, listen_port) if sections is not None else {}
            return _merged(own, more)

        with launch_cluster(
            network,
            work_dir / "nodes",
            coordination=lambda _index: {},
            listen_ports=[0] * len(NAMES),  # no UDP coordination with etcd
            sections=node_sections,
        ) as launched:
            yield EtcdBackedCluster(launched, etcd, pki)
    finally:
        etcd.stop()


def _merged(
    base: Mapping[str, Mapping[str, object]], more: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    merged = {name: dict(values) for name, values in base.items()}
    for name, values in more.items():
        merged.setdefault(name, {}).update(values)
    return merged


def stop_all(nodes: list[ClusterNode], targets: list[NamedHTTPServer]) -> None:
    """Stop every node (and its tor) by PID, then close the targets; never raises for one."""
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()
    for target in targets:
        target.close()
