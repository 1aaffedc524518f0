"""Helpers for the cluster_net tests: coordinators on 127.0.0.1, waiting, a fault relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import ClusterKey, Role
from rustbalance.config.schema import CoordinationConfig, Endpoint
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.testnet.cluster import free_udp_ports as free_udp_ports  # re-exported

TOKEN = b"cluster-net-test-token-0123456789abcdef"
INTERVAL, TIMEOUT, GRACE = 0.5, 1.5, 1.5
LOCALHOST = "127.0.0.1"


def coordination_config(port: int, seeds: list[int]) -> CoordinationConfig:
    return CoordinationConfig(
        cluster_token_path=None,
        listen=Endpoint(host=LOCALHOST, port=port),
        peers=tuple(Endpoint(host=LOCALHOST, port=p) for p in seeds),
        heartbeat_interval_secs=INTERVAL,
        heartbeat_timeout_secs=TIMEOUT,
        takeover_grace_secs=GRACE,
    )


def make_node(
    node_id: str,
    priority: int,
    port: int,
    seeds: list[int],
    state_dir: Path | None,
    *,
    advertise: str | None = None,
    eligible: bool = True,
    token: bytes = TOKEN,
    warn_interval: float = 60.0,
) -> Coordinator[IntroPoint]:
    return Coordinator(
        node_id=node_id,
        priority=priority,
        publisher_eligible=eligible,
        config=coordination_config(port, seeds),
        key=ClusterKey(token),
        state_dir=state_dir,
        encode_intro_point=encode_intro_point,
        decode_intro_point=decode_intro_point,
        advertise=advertise,
        warn_interval=warn_interval,
    )


async def wait_until(
    predicate: Callable[[], bool], limit: float, what: str, step: float = 0.02
) -> float:
    """Poll ``predicate`` until true; returns the seconds it took; fails after ``limit`` s."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - start


def publishers(nodes: list[Coordinator[IntroPoint]]) -> list[str]:
    return sorted(n.node_id for n in nodes if n.role is Role.PUBLISHER)


@dataclass
class Cluster:
    """Coordinators running as tasks of one TaskGroup-like scope; stopped by cancel."""

    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    nodes: dict[str, Coordinator[IntroPoint]] = field(default_factory=dict)

    async def start(self, node: Coordinator[IntroPoint]) -> None:
        self.nodes[node.node_id] = node
        self.tasks[node.node_id] = asyncio.create_task(node.run(), name=node.node_id)
        await asyncio.wait_for(node.ready.wait(), 5)

    async def kill(self, node_id: str) -> Coordinator[IntroPoint]:
        """Stop a node abruptly (no lease_release): as if its process crashed."""
        task = self.tasks.pop(node_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return self.nodes.pop(node_id)

    async def stop_all(self) -> None:
        for node_id in list(self.tasks):
            await self.kill(node_id)

    def running(self) -> list[Coordinator[IntroPoint]]:
        return list(self.nodes.values())


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.stop_all()


class FaultRelay:
    """A UDP relay the test controls: one front port per node, forwarding to that node.

    Each node advertises its front port, so all traffic between nodes passes through here.
    ``blocked`` holds pairs of group names that cannot talk (a partition); ``delay`` delays
    every forwarded datagram. Forwarding uses the front socket, whose port is the node's
    advertised one; nodes never reply to source addresses, so one direction is enough.
    """

    def __init__(self) -> None:
        self.group_of_port: dict[int, str] = {}  # a node's real listen port -> its group
        self.blocked: set[frozenset[str]] = set()
        self.delay = 0.0
        self.forwarded = 0
        self.dropped = 0
        self._transports: list[asyncio.DatagramTransport] = []

    async def add_front(self, front_port: int, node_port: int, group: str) -> None:
        relay = self
        self.group_of_port[node_port] = group
        loop = asyncio.get_running_loop()

        class Front(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # The selector transport is a DatagramTransport in all but its class tree.
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                source_group = relay.group_of_port.get(addr[1])
                if source_group is None or frozenset((source_group, group)) in relay.blocked:
                    relay.dropped += 1
                    return
                relay.forwarded += 1
                target = (LOCALHOST, node_port)
                if relay.delay:
                    loop.call_later(relay.delay, self.transport.sendto, data, target)
                else:
                    self.transport.sendto(data, target)

        transport, _ = await loop.create_datagram_endpoint(
            Front, local_addr=(LOCALHOST, front_port)
        )
        self._transports.append(transport)

    def partition(self, a: str, b: str) -> None:
        self.blocked.add(frozenset((a, b)))

    def heal(self) -> None:
        self.blocked.clear()

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()
