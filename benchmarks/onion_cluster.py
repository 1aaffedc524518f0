"""A 3-node RustBalance cluster on the private Tor network, for bench_onion's multi-node run.

A copy in small of ``tests/node_e2e/cluster_helpers.running_cluster`` (without the fault relay):
the benchmark must not change when someone reshapes the test helpers, and ``tests/`` is not
ours to edit. Three ``rustbalance run`` daemons share one master key and a cluster token file
(0600, never on a command line); each has its own managed tor, its own target (a
:class:`~rustbalance.testnet.apps.NamedHTTPServer`), a UDP coordination port on 127.0.0.1 and
priority 10/20/30. Coordination timings are the product defaults (heartbeat 5 s, timeout 15 s,
takeover grace 15 s): the figures are the ones an operator gets.

Every daemon and its managed tor are stopped by PID (SIGTERM, then SIGKILL), also on errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.demo import NodeProcess, write_node_config
from rustbalance.node.status import read_status
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.tor.process import pid_is_alive

__all__ = ["NAMES", "UPLOAD_TIMEOUT_SECS", "BenchCluster", "BenchNode", "bench_cluster"]

LOCALHOST = "127.0.0.1"
NAMES = ("node-a", "node-b", "node-c")
PRIORITIES = (10, 20, 30)
# As in the test suite: on a loaded private network one cold HSDir circuit can hold an
# upload round for the whole default 60 s, and a period counts as published as soon as any
# HSDir accepted it, so stragglers get less time (it only bounds the wait for verdicts).
UPLOAD_TIMEOUT_SECS = 15


def _free_udp_ports(n: int) -> list[int]:
    """n distinct free UDP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _is_tor(pid: int) -> bool:
    # PIDs are reused: only signal a process that still is a tor.
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "tor"
    except OSError:
        return False


@dataclass
class BenchNode:
    name: str
    priority: int
    process: NodeProcess
    work_dir: Path
    killed: bool = False

    @property
    def status_socket(self) -> Path:
        return self.work_dir / "state" / "status.sock"

    def status(self) -> dict[str, Any] | None:
        """The daemon's status document, None when it is dead or does not answer (yet)."""
        if self.killed:
            return None
        try:
            return read_status(self.status_socket, timeout=3.0)
        except Exception:
            return None

    def own_auth_keys(self) -> frozenset[str]:
        doc = self.status() or {}
        return frozenset((doc.get("intro_points") or {}).get("own_auth_keys") or ())

    def tor_pid(self) -> int | None:
        """The managed tor's PID, from the daemon's log (None before tor started)."""
        found = re.findall(r"started tor pid (\d+)", self.process.log_text())
        return int(found[-1]) if found else None

    def _kill_tor(self, tor_pid: int | None) -> None:
        if tor_pid is not None and pid_is_alive(tor_pid) and _is_tor(tor_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(tor_pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the daemon and its tor by PID: a crashed machine, no goodbye to the peers."""
        tor_pid = self.tor_pid()
        self.killed = True
        self.process.stop(signal.SIGKILL, timeout=10)
        self._kill_tor(tor_pid)

    def stop(self) -> None:
        tor_pid = self.tor_pid()
        self.process.stop()  # SIGTERM, SIGKILL after 30 s
        # The managed tor exits with its daemon; make sure, by PID.
        self._kill_tor(tor_pid)


@dataclass
class BenchCluster:
    master: IdentityKey
    nodes: list[BenchNode]
    started: float  # time.monotonic() just before the first daemon was launched

    @property
    def address(self) -> str:
        return self.master.onion_address

    def alive(self) -> list[BenchNode]:
        return [node for node in self.nodes if not node.killed]

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {node.name: node.status() for node in self.alive()}


@contextlib.contextmanager
def bench_cluster(network: PrivateTorNetwork, work_dir: Path) -> Iterator[BenchCluster]:
    """Start the three daemons at once; stop every one of them (and its tor) afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    master = IdentityKey.generate(secrets.token_bytes)
    key_file = work_dir / "master.key"
    write_seed_key_file(master, key_file)
    token = work_dir / "cluster.token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    ports = _free_udp_ports(len(NAMES))
    nodes: list[BenchNode] = []
    targets: list[NamedHTTPServer] = []
    try:
        configs: list[tuple[str, int, Path]] = []
        for index, (name, priority) in enumerate(zip(NAMES, PRIORITIES, strict=True)):
            node_dir = work_dir / name
            node_dir.mkdir()
            target = NamedHTTPServer(f"{name}-target")
            targets.append(target)
            config = write_node_config(
                node_dir / "config.toml",
                node_id=name,
                key_file=key_file,
                master_address=master.onion_address,
                target=f"{LOCALHOST}:{target.port}",
                work_dir=node_dir,
                extra_torrc=network.client_torrc_lines(),
                overrides={
                    "node": {"priority": priority},
                    "publish": {"upload_timeout_secs": UPLOAD_TIMEOUT_SECS},
                    # No timing keys: the defaults 5/15/15 s are what is measured.
                    "coordination": {
                        "cluster_token_path": token,
                        "listen": f"{LOCALHOST}:{ports[index]}",
                        "peers": [f"{LOCALHOST}:{p}" for i, p in enumerate(ports) if i != index],
                    },
                },
            )
            configs.append((name, priority, config))
        # Configs first, then launch together, so "start" means all three at (nearly) once.
        started = time.monotonic()
        for name, priority, config in configs:
            node_dir = config.parent
            process = NodeProcess(config, node_dir / "node.log")
            process.start()
            nodes.append(BenchNode(name, priority, process, node_dir))
        yield BenchCluster(master, nodes, started)
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
        for target in targets:
            target.close()
