"""Helpers for the etcd-backed cluster on the private Tor network (issue 20).

- :class:`EtcdRelays`: one :class:`~rustbalance.testnet.etcd_cluster.TcpCutter` per node and
  etcd member, on an event loop in a thread of its own (the daemons are subprocesses, the
  tests are partly synchronous), so a test can cut one node off from every member (silence
  both ways, no reset, as a partition looks) and heal it. The thread is stopped and joined.
- :class:`RoleSampler`: a thread that reads every node's ``status`` a few times a second and
  keeps who claimed the publisher role, so a test can assert that two nodes never did at
  once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from rustbalance.testnet.cluster import ClusterNode
from rustbalance.testnet.etcd_cluster import TcpCutter

__all__ = ["EtcdRelays", "RoleSampler"]

_THREAD_JOIN_SECS = 10.0
_CALL_SECS = 15.0


class EtcdRelays:
    """See the module docstring. ``add(node, endpoints)`` returns the relay endpoints."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-relays", daemon=True
        )
        self._thread.start()
        self._cutters: dict[str, list[TcpCutter]] = {}

    def add(self, node: str, endpoints: Iterable[str]) -> list[str]:
        cutters = []
        for endpoint in endpoints:
            host, _, port = endpoint.rpartition(":")
            cutter = TcpCutter(host, int(port))
            asyncio.run_coroutine_threadsafe(cutter.start(), self._loop).result(_CALL_SECS)
            cutters.append(cutter)
        self._cutters[node] = cutters
        return [c.endpoint for c in cutters]

    def _each(self, node: str, action: Callable[[TcpCutter], None]) -> None:
        async def run() -> None:
            for cutter in self._cutters[node]:
                action(cutter)

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(_CALL_SECS)

    def cut(self, node: str) -> None:
        self._each(node, TcpCutter.cut)

    def heal(self, node: str) -> None:
        self._each(node, TcpCutter.heal)

    def close(self) -> None:
        async def close_all() -> None:
            for cutters in self._cutters.values():
                for cutter in cutters:
                    await cutter.close()

        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(_CALL_SECS)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_THREAD_JOIN_SECS)
            if not self._thread.is_alive():
                self._loop.close()


class RoleSampler:
    """Samples ``nodes()`` every ``step`` seconds in a thread; see the module docstring."""

    def __init__(self, nodes: Callable[[], list[ClusterNode]], step: float = 0.25) -> None:
        self._nodes = nodes
        self._step = step
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # (monotonic time, publishers in that sample), one entry per change.
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.reads = 0
        self._thread = threading.Thread(target=self._run, name="role-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            docs: list[dict[str, Any] | None] = [n.try_status() for n in self._nodes()]
            publishers = tuple(
                sorted(d["node_id"] for d in docs if d and d.get("role") == "publisher")
            )
            with self._lock:
                self.reads += 1
                if not self.samples or self.samples[-1][1] != publishers:
                    self.samples.append((time.monotonic(), publishers))
            self._stop.wait(self._step)

    def publishers_since(self, start: float) -> list[tuple[str, ...]]:
        """The publisher sets seen since ``start`` (monotonic), the one current then first."""
        with self._lock:
            before = [p for t, p in self.samples if t < start][-1:]
            return before + [p for t, p in self.samples if t >= start]

    def never_two(self) -> None:
        with self._lock:
            twos = [(t, p) for t, p in self.samples if len(p) > 1]
        assert not twos, f"two publishers at once: {twos}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(_THREAD_JOIN_SECS)
