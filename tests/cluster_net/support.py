"""Helpers for the cluster_net tests: coordinators on 127.0.0.1, waiting, a fault relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME, Coordinator, load_membership_file
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.messages import Role
from rustbalance.config.schema import CoordinationConfig, Endpoint
from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.testnet.cluster import free_udp_ports as free_udp_ports  # re-exported
from tests.trust import MASTER, node_key, now_ms, record, signed

INTERVAL, TIMEOUT, GRACE = 0.5, 1.5, 1.5
LOCALHOST = "127.0.0.1"


def self_admitted(
    node_id: str,
    key: NodeKey,
    coordination: str,
    *,
    priority: int,
    eligible: bool = True,
    state_dir: Path | None = None,
    master: IdentityKey = MASTER,
) -> Membership:
    """What the daemon of a master-key holder starts with: its saved membership (if any) and
    its own admission record, signed with the master key (node/cluster_link.py)."""
    at = now_ms()
    if state_dir is not None:
        membership, _ = load_membership_file(state_dir / MEMBERS_FILE_NAME, master.public_key, at)
    else:
        membership = Membership(master.public_key)
    own = record(
        node_id,
        key=key,
        priority=priority,
        eligible=eligible,
        holds_master_key=True,
        coordination=coordination,
        issued_at_ms=at,
    )
    membership.apply(signed(own, master), at)
    return membership


def coordination_config(port: int, seeds: list[int]) -> CoordinationConfig:
    return CoordinationConfig(
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
    warn_interval: float = 60.0,
    key: NodeKey | None = None,
    master: IdentityKey = MASTER,
) -> Coordinator[IntroPoint]:
    """A master-key holder's coordinator (it admits itself), as the daemon builds it."""
    key = key or node_key(node_id)
    config = coordination_config(port, seeds)
    # Where the others reach it is its record's business (its advertised address).
    reach = advertise or f"{LOCALHOST}:{port}"
    return Coordinator(
        node_id=node_id,
        node_key=key,
        membership=self_admitted(
            node_id,
            key,
            reach,
            priority=priority,
            eligible=eligible,
            state_dir=state_dir,
            master=master,
        ),
        config=config,
        state_dir=state_dir,
        encode_intro_point=encode_intro_point,
        decode_intro_point=decode_intro_point,
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
