"""A 3-node cluster launcher for the multi-node end-to-end tests (issue "Multi-node cluster").

:func:`running_cluster` starts three ``rustbalance run`` daemons on the session's private Tor
network: one master key (each node makes its own node key and admits itself), distinct UDP
coordination ports on 127.0.0.1, priorities 10/20/30, each node its own managed tor and its own
:class:`~tests.torhelpers.NamedHTTPServer` target answering ``hello from <node>-target``.

With ``relay=True`` all coordination traffic passes through a :class:`UdpFaultRelay` the test
controls: every node listens on its own port but advertises (and is seeded with) a relay front
port, so the relay can cut one node's links, or a single pair of nodes (a non-transitive
partition), and restore them.

Every daemon is stopped by PID (SIGTERM, then SIGKILL), and its managed tor by PID too, also
when the test fails; the relay thread is stopped and joined.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.cluster import (
    LOCALHOST,
    NAMES,
    ClusterNode,
    LaunchedCluster,
    OverridesFor,
    free_udp_ports,
    launch_cluster,
)
from tests.node_e2e import NODE_PUBLISH_TIMEOUT

__all__ = [
    "NAMES",
    "SHORT_TIMINGS",
    "ClusterNode",
    "RunningCluster",
    "UdpFaultRelay",
    "free_udp_ports",
    "running_cluster",
    "wait_for",
]

# interval, timeout, grace: short timings for the tests that do not measure the default bound.
SHORT_TIMINGS = (1.0, 3.0, 3.0)


def wait_for(predicate: Callable[[], bool], limit: float, what: str, step: float = 0.5) -> float:
    """Poll ``predicate`` until true; the seconds it took; AssertionError after ``limit`` s."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(step)


class UdpFaultRelay:
    """A UDP relay in a thread: one front port per node, forwarding to that node's real port.

    A datagram is forwarded only if its source port is a known node port and the pair of
    nodes is not cut. Forwarding uses the front socket, so the target sees the sender's
    advertised address. ``cut(name)`` isolates one node from all others; ``cut_pair(a, b)``
    cuts only the link between a and b (both directions); ``heal()`` undoes every cut.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._name_of_port: dict[int, str] = {}  # real listen port -> node name
        self._blocked: set[str] = set()
        self._blocked_pairs: set[frozenset[str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-fault-relay", daemon=True)
        self.forwarded = 0
        self.dropped = 0

    def add_front(self, front_port: int, node_port: int, name: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCALHOST, front_port))
        sock.setblocking(False)
        self._name_of_port[node_port] = name
        self._selector.register(sock, selectors.EVENT_READ, (node_port, name))

    def start(self) -> None:
        self._thread.start()

    def cut(self, name: str) -> None:
        with self._lock:
            self._blocked.add(name)

    def cut_pair(self, a: str, b: str) -> None:
        with self._lock:
            self._blocked_pairs.add(frozenset((a, b)))

    def heal(self) -> None:
        with self._lock:
            self._blocked.clear()
            self._blocked_pairs.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                node_port, target_name = key.data
                for _ in range(64):  # bounded drain per wake-up
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    source = self._name_of_port.get(addr[1])
                    with self._lock:
                        blocked = (
                            source is None
                            or bool({source, target_name} & self._blocked)
                            or frozenset((source, target_name)) in self._blocked_pairs
                        )
                    if blocked:
                        self.dropped += 1
                        continue
                    with contextlib.suppress(OSError):
                        sock.sendto(data, (LOCALHOST, node_port))
                        self.forwarded += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            sock = key.fileobj
            self._selector.unregister(sock)
            assert isinstance(sock, socket.socket)
            sock.close()
        self._selector.close()


@dataclass
class RunningCluster(LaunchedCluster):
    relay: UdpFaultRelay | None = None
    timings: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def publishers(self) -> list[str]:
        return sorted(
            name for name, doc in self.statuses().items() if doc and doc["role"] == "publisher"
        )

    def wait_formed(self, limit: float = NODE_PUBLISH_TIMEOUT) -> None:
        """One publisher, everyone else standby in mode multi, with every node's intro
        points in the publisher's last published descriptor."""

        def formed() -> bool:
            docs = self.statuses()
            if any(doc is None for doc in docs.values()):
                return False
            ready = [d for d in docs.values() if d is not None]
            if not all(d["mode"] == "multi" for d in ready):
                return False
            pubs = [d for d in ready if d["role"] == "publisher"]
            if len(pubs) != 1:
                return False
            # Stable means the best-ranked live node publishes: a node that starts more than a
            # discovery window (2 intervals) after the others finds one of them publishing and
            # takes over only when its own window ends.
            best = min(self.alive(), key=lambda n: (n.priority, n.name))
            if pubs[0]["node_id"] != best.name:
                return False
            published = set(pubs[0]["intro_points"]["published_auth_keys"])
            return all(
                d["intro_points"]["own_auth_keys"]
                and published & set(d["intro_points"]["own_auth_keys"])
                for d in ready
            )

        wait_for(formed, limit, "the cluster to form and publish a merged descriptor", 1.0)


def _coordination(
    listen: int,
    seeds: list[int],
    timings: tuple[float, float, float] | None,
    advertise: int | None,
) -> dict[str, object]:
    section: dict[str, object] = {
        "listen": f"{LOCALHOST}:{listen}",
        "peers": [f"{LOCALHOST}:{p}" for p in seeds],
    }
    if advertise is not None:
        section["advertise"] = f"{LOCALHOST}:{advertise}"
    if timings is not None:
        interval, timeout, grace = timings
        section["heartbeat_interval_secs"] = interval
        section["heartbeat_timeout_secs"] = timeout
        section["takeover_grace_secs"] = grace
    return section


@contextlib.contextmanager
def running_cluster(
    network: PrivateTorNetwork,
    work_dir: Path,
    *,
    timings: tuple[float, float, float] | None = None,
    relay: bool = False,
    overrides: OverridesFor | None = None,
    sections: Callable[[int, int], Mapping[str, Mapping[str, object]]] | None = None,
) -> Iterator[RunningCluster]:
    """Start the three nodes (see the module docstring); stop everything afterwards.
    ``overrides(i)`` adds config keys of node i (e.g. ``[node] identity_mode``)."""
    ports = free_udp_ports(2 * len(NAMES) if relay else len(NAMES))
    listen_ports = ports[: len(NAMES)]
    # Without the relay, peers talk to each other's listen ports directly.
    front_ports = ports[len(NAMES) :] if relay else listen_ports
    fault_relay: UdpFaultRelay | None = None

    def coordination(index: int) -> dict[str, object]:
        seeds = [p for i, p in enumerate(front_ports) if i != index]
        advertise = front_ports[index] if relay else None
        return _coordination(listen_ports[index], seeds, timings, advertise)

    try:
        if relay:
            fault_relay = UdpFaultRelay()
            for name, listen, front in zip(NAMES, listen_ports, front_ports, strict=True):
                fault_relay.add_front(front, listen, name)
            fault_relay.start()
        with launch_cluster(
            network,
            work_dir,
            coordination=coordination,
            listen_ports=listen_ports,
            overrides=overrides,
            sections=sections,
        ) as launched:
            yield RunningCluster(
                launched.master, launched.nodes, launched.started, fault_relay, timings
            )
    finally:
        if fault_relay is not None:
            fault_relay.close()
