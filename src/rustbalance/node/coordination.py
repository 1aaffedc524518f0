"""The node's view of cluster coordination: one interface, one adapter per backend.

The daemon's components never talk to a coordinator directly. They read
:class:`CoordinationFacts` (who is live, whether we hold the publisher lease, the live peers'
intro points), report our own state (intro points, last publish, eligibility), ask
:meth:`Coordination.may_publish` immediately before every upload, and show
:class:`ClusterStatus` in ``status`` and ``/metrics``. :class:`Coordination` is that
interface, with one adapter per ``[coordination] backend``, chosen in
:func:`start_coordination`:

- :class:`UdpCoordination` (``embedded``) over the sealed-UDP
  :class:`~rustbalance.cluster.coordinator.Coordinator`; the only place in ``node/`` that
  constructs or reads one. Its election already decided who publishes and there is no quorum
  to ask, so its fencing check is always yes.
- :class:`EtcdCoordination` (``etcd``) over :class:`~rustbalance.cluster.etcd_backend.EtcdBackend`
  (docs/etcd.md): its fencing check is a transaction on our candidacy's create revision. Its
  lease is the whole answer (``ModePolicy.lease_only``: a node never publishes alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.etcd_backend import EtcdBackend
from rustbalance.config import Config
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.cluster_link import prepare_membership
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.startup import EXIT_CONFIG, StartupError

__all__ = [
    "ClusterStatus",
    "Coordination",
    "CoordinationFacts",
    "EtcdCoordination",
    "EtcdLink",
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
class EtcdLink:
    """The etcd backend's connection, for ``status`` and ``/metrics``."""

    endpoint: str  # the member the node talks to now
    connected: bool  # our lease is valid: etcd answered within the TTL
    registered: bool  # and our member record is written on it (the others see us)
    last_error: str | None  # the latest error of a kind of call that has not worked since


@dataclass(frozen=True)
class ClusterStatus:
    """The ``cluster`` part of ``status`` and the coordination metrics."""

    # The election's term: the embedded lease term, or etcd's create revision of the
    # publisher's candidacy (both grow with every new publisher).
    term: int
    election_role: str
    publisher: str | None
    counters: Mapping[str, int]
    rejected: Mapping[str, int]
    peer_intro_points: Mapping[str, int]
    live_peers: tuple[str, ...]
    # The other admitted members (live or not).
    known_peers: tuple[str, ...]
    backend: str = "embedded"  # [coordination] backend
    etcd: EtcdLink | None = None
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

    async def may_publish(self) -> bool:
        """Fencing: awaited immediately before every upload; False = do not upload."""
        ...

    async def run(self) -> None:
        """The backend's supervised task."""
        ...

    async def leave(self) -> None:
        """Leave the cluster (a lease holder releases the lease)."""
        ...

    def mesh_handle(self) -> Coordinator[Any] | None:
        """The embedded coordinator the mesh adds admitted peers to (node/mesh.py), if any."""
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

    async def may_publish(self) -> bool:
        return True

    async def run(self) -> None:
        await self.coordinator.run()

    async def leave(self) -> None:
        await self.coordinator.shutdown()

    def mesh_handle(self) -> Coordinator[Any]:
        """The coordinator the mesh adds admitted peers to (node/mesh.py)."""
        return self.coordinator


class EtcdCoordination:
    """:class:`Coordination` over the etcd backend (cluster/etcd_backend.py)."""

    def __init__(self, backend: EtcdBackend[IntroPoint]) -> None:
        self.backend = backend

    def facts(self) -> CoordinationFacts:
        facts = self.backend.facts()
        return CoordinationFacts(
            is_multi=facts.is_multi,
            holds_lease=facts.holds_lease,
            peer_intro_points=facts.peer_intro_points,
            # Never: with etcd a node's identity is its TLS client certificate, and taking a
            # node out is revoking that certificate (or its etcd user) at the CA and in etcd,
            # outside rustbalance (docs/etcd.md). No admission records, so nothing to revoke.
            revoked=False,
        )

    def status(self) -> ClusterStatus:
        status = self.backend.status()
        return ClusterStatus(
            term=status.term,
            election_role=status.election_role,
            publisher=status.publisher,
            counters=status.counters,
            rejected=status.rejected,
            peer_intro_points=status.peer_intro_points,
            live_peers=status.live_peers,
            known_peers=status.known_peers,
            backend="etcd",
            etcd=EtcdLink(status.endpoint, status.connected, status.registered, status.last_error),
        )

    def report_intro_points(self, points: Sequence[IntroPoint]) -> None:
        self.backend.report_intro_points(points)

    def report_publish(self, unix_time: int) -> None:
        self.backend.report_publish(unix_time)

    def set_eligible(self, eligible: bool) -> None:
        self.backend.set_eligible(eligible)

    def clear_changed(self) -> None:
        self.backend.clear_changed()

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        await self.backend.wait_changed(timeout)

    async def may_publish(self) -> bool:
        return await self.backend.may_publish()

    async def run(self) -> None:
        await self.backend.run()

    async def leave(self) -> None:
        await self.backend.leave()

    def mesh_handle(self) -> Coordinator[Any] | None:
        return None  # joins are refused with etcd (the parser says so): members are etcd's


def start_coordination(
    config: Config, identity: NodeIdentity, clock: Clock
) -> UdpCoordination | EtcdCoordination:
    """Multi-node: the backend ``[coordination] backend`` names (it runs as a supervised
    task). Its key or certificate files are read here: a problem is exit 2.

    Embedded: the node key, the membership (a master-key holder admits itself) and the
    coordinator (the mesh follows its membership). etcd: ``identity`` is not used, a node is
    known to etcd by its TLS client certificate (docs/etcd.md)."""
    if config.coordination.backend == "etcd":
        return _start_etcd(config, clock)
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


def _start_etcd(config: Config, clock: Clock) -> EtcdCoordination:
    try:
        backend: EtcdBackend[IntroPoint] = EtcdBackend.from_config(
            config,
            encode_intro_point=encode_intro_point,
            decode_intro_point=decode_intro_point,
            monotonic=clock.monotonic,
        )
    except ConfigError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None
    except RustBalanceError as exc:
        raise StartupError(f"coordination: {exc}", EXIT_CONFIG) from None
    settings = config.etcd
    log.info(
        "Multi-node mode: etcd coordination, %d endpoints, prefix %s, lease TTL %d s",
        len(settings.endpoints),
        settings.prefix,
        settings.lease_ttl_secs,
    )
    return EtcdCoordination(backend)
