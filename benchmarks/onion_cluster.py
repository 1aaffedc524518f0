"""A 3-node RustBalance cluster on the private Tor network, for bench_onion's multi-node run.

The launcher is the one the multi-node tests use (:mod:`rustbalance.testnet.cluster`): three
``rustbalance run`` daemons sharing one master key (0600, never on a command line; each node
makes its own node key and admits itself), each with its own managed tor, its own target, a UDP
coordination port on 127.0.0.1 and priority 10/20/30, all launched at (nearly) once. Here the
coordination timings are the product defaults (heartbeat 5 s, timeout 15 s, takeover grace 15
s), seeds point straight at each other's ports (no fault relay): the figures are the ones an
operator gets.

:func:`bench_etcd_cluster` runs the same three daemons with ``[coordination] backend =
"etcd"`` (lease TTL 10 s, the default) against a 3-member etcd cluster on loopback with TLS,
client certificates and RBAC (:func:`rustbalance.testnet.cluster.launch_etcd_cluster`, the
launcher of tests/node_e2e/test_etcd_cluster.py).

Every daemon and its managed tor are stopped by PID (SIGTERM, then SIGKILL), also on errors;
so is every etcd member.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.cluster import (
    LOCALHOST,
    NAMES,
    UPLOAD_TIMEOUT_SECS,
    ClusterNode,
    LaunchedCluster,
    free_udp_ports,
    launch_cluster,
    launch_etcd_cluster,
)

__all__ = [
    "NAMES",
    "UPLOAD_TIMEOUT_SECS",
    "BenchCluster",
    "BenchNode",
    "bench_cluster",
    "bench_etcd_cluster",
]

BenchNode = ClusterNode
BenchCluster = LaunchedCluster


@contextlib.contextmanager
def bench_cluster(network: PrivateTorNetwork, work_dir: Path) -> Iterator[BenchCluster]:
    """Start the three daemons at once; stop every one of them (and its tor) afterwards."""
    ports = free_udp_ports(len(NAMES))

    def coordination(index: int) -> dict[str, object]:
        # No timing keys: the defaults 5/15/15 s are what is measured.
        return {
            "listen": f"{LOCALHOST}:{ports[index]}",
            "peers": [f"{LOCALHOST}:{p}" for i, p in enumerate(ports) if i != index],
        }

    with launch_cluster(network, work_dir, coordination=coordination, listen_ports=ports) as c:
        yield c


@contextlib.contextmanager
def bench_etcd_cluster(network: PrivateTorNetwork, work_dir: Path) -> Iterator[BenchCluster]:
    """The three daemons coordinated by etcd (default lease TTL); stops everything after."""
    with launch_etcd_cluster(network, work_dir) as stack:
        yield stack.launched
