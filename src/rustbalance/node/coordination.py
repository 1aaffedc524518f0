"""The node's view of cluster coordination: one interface, one adapter per backend.

The daemon's components never talk to a coordinator directly. They read
:class:`CoordinationFacts` (who is live, whether we hold the publisher lease, the live peers'
intro points), report our own state (intro points, last publish, eligibility) and show
:class:`ClusterStatus` in ``status`` and ``/metrics``. :class:`Coordination` is that
interface; :class:`UdpCoordination` implements it over the embedded sealed-UDP
:class:`~rustbalance.cluster.coordinator.Coordinator` and is the only place in ``node/`` that
constructs or reads one. Another backend (an etcd lease, say) implements the same protocol
and is chosen in :func:`start_coordination`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.config import Config
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.errors import RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.cluster_link import prepare_membership
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.startup import EXIT_CONFIG, StartupError

__all__ = [
    "ClusterStatus",
    "Coordination",
    "CoordinationFacts",
    "UdpCoordination",
    "start_coordination",
]

log = logging.getLogger(DAEMON_LOGGER)


@dataclass(frozen=True)
class CoordinationFacts:
    """What the cluster-mode state machine and the publisher observe of the cluster now."""

    # 2+ live nodes: us and at least one peer.
    is_multi: bool
    # We hold the publisher lease (the election chose us).
    holds_lease: bool
    # Every live peer's intro points that it sent, by node id.
    peer_intro_points: Mapping[str, tuple[IntroPoint, ...]]
    # This node was revoked (issue 16): it must never publish again with its identity.
    revoked: bool = False


ALONE = CoordinationFacts(is_multi=False, holds_lease=False, peer_intro_points={})


@dataclass(frozen=True)
class ClusterStatus:
    """The ``cluster`` part of ``status`` and the coordination metrics."""

    term: int
    election_role: str
    publisher: str | None
    counters: Mapping[str, int]
    rejected: Mapping[str, int]
    peer_intro_points: Mapping[str, int]
    live_peers: tuple[str, ...]
    # The other admitted members (live or not).
    known_peers: tuple[str, ...]
    # This node was revoked; every admitted node as ``rustbalance cluster members`` shows it
    # (ids, fingerprints, addresses, roles: no secrets).
    revoked: bool = False
    members: tuple[Mapping[str, Any], ...] = ()


class Coordination(Protocol):
    """A coordination backend as the node's components use it."""

    def facts(self) -> CoordinationFacts: ...

    def status(self) -> ClusterStatus: ...

    def report_intro_points(self, points: Sequence[IntroPoint]) -> None:
        """Our own current intro points (peers get them when the set changed)."""
        ...

    def report_publish(self, unix_time: int) -> None:
        """We published successfully at ``unix_time``."""
        ...

    def set_eligible(self, eligible: bool) -> None:
        """We may (or may no longer) hold the lease, e.g. while our tor is down."""
        ...

    def clear_changed(self) -> None: ...

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        """Return when something that affects publishing changed, or after ``timeout``."""
        ...

    async def run(self) -> None:
        """The backend's supervised task."""
        ...

    async def leave(self) -> None:
        """Leave the cluster (a lease holder releases the lease)."""
        ...


class UdpCoordination:
    """:class:`Coordination` over the embedded sealed-UDP coordinator."""

    def __init__(self, coordinator: Coordinator[IntroPoint]) -> None:
        self.coordinator = coordinator

    def facts(self) -> CoordinationFacts:
        coordinator = self.coordinator
        return CoordinationFacts(
            is_multi=coordinator.is_multi,
            holds_lease=coordinator.is_publisher,
            peer_intro_points=coordinator.peer_intro_points(),
            revoked=coordinator.revoked,
        )

    def status(self) -> ClusterStatus:
        coordinator = self.coordinator
        own = coordinator.node_id
        live = tuple(p.node_id for p in coordinator.live_peers())
        return ClusterStatus(
            term=coordinator.term,
            election_role=coordinator.role.value,
            publisher=coordinator.publisher(),
            counters=coordinator.counters.as_dict(),
            rejected={str(k): v for k, v in coordinator.rejected.items()},
            peer_intro_points={
                node_id: len(points) for node_id, points in coordinator.peer_intro_points().items()
            },
            live_peers=live,
            known_peers=tuple(
                r.node_id for r in coordinator.membership.members() if r.node_id != own
            ),
            revoked=coordinator.revoked,
            members=tuple(coordinator.members_status()),
        )

    def report_intro_points(self, points: Sequence[IntroPoint]) -> None:
        self.coordinator.set_intro_points(points)

    def report_publish(self, unix_time: int) -> None:
        self.coordinator.set_last_publish(unix_time)

    def set_eligible(self, eligible: bool) -> None:
        self.coordinator.set_eligible(eligible)

    def clear_changed(self) -> None:
        self.coordinator.changed.clear()

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.coordinator.changed.wait(), timeout)

    async def run(self) -> None:
        await self.coordinator.run()

    async def leave(self) -> None:
        await self.coordinator.shutdown()

    def mesh_handle(self) -> Coordinator[Any]:
        """The coordinator the mesh adds admitted peers to (node/mesh.py)."""
        return self.coordinator


def start_coordination(config: Config, identity: NodeIdentity, clock: Clock) -> UdpCoordination:
    """Multi-node: the node key, the membership (a master-key holder admits itself) and the
    coordinator (it runs as a supervised task; the mesh follows its membership)."""
    coordination = config.coordination
    try:
        now_ms = int(clock.wall() * 1000)
        prepared = prepare_membership(
            config, identity.master_public_key, identity.master_key, now_ms
        )
        coordinator: Coordinator[IntroPoint] = Coordinator(
            node_id=config.node.id,
            node_key=prepared.node_key,
            membership=prepared.membership,
            config=coordination,
            state_dir=config.node.state_dir,
            encode_intro_point=encode_intro_point,
            decode_intro_point=decode_intro_point,
        )
    except RustBalanceError as exc:
        raise StartupError(f"coordination: {exc}", EXIT_CONFIG) from None
    advertise = coordination.advertise
    log.info(
        "Multi-node mode: coordination on %s, node key %s, %d members, %d seed peers%s",
        coordination.listen,
        prepared.node_key.fingerprint,
        len(prepared.membership.members()),
        len(coordination.peers),
        f", advertised as {advertise}" if advertise else "",
    )
    return UdpCoordination(coordinator)
