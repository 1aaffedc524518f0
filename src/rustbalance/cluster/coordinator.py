"""The coordination shell: drives :class:`PeerTable` and :class:`Election` over a UDP transport.

One coroutine, :meth:`Coordinator.run`, runs inside the daemon's TaskGroup until cancelled. Every
tick (about 1 s, at most half a heartbeat interval) it expires silent peers, lets the election
evaluate, sends a heartbeat when one is due and saves the learned peers. Incoming authenticated
messages are handled as they arrive (see :mod:`rustbalance.cluster.transport`).

What the daemon gets:

- :attr:`Coordinator.role` / :attr:`is_publisher`, :attr:`is_multi` (at least one live peer),
  :meth:`live_peers` (with their decoded intro points), :meth:`peer_intro_points`;
- :attr:`changed` (an :class:`asyncio.Event`) and the optional ``on_change`` callback, fired on
  anything that affects publishing: our role changed, a peer appeared or died, a peer's intro
  points changed;
- :attr:`counters` and :attr:`rejected` for metrics.

What the daemon tells it: :meth:`set_intro_points` (sent to every peer at once when the *set*
changes), :meth:`set_last_publish`, :meth:`set_eligible`, and :meth:`shutdown` from its SIGTERM
hook (a publisher sends ``lease_release`` so the next node takes over in about a second).

Intro points go out at once when our set changes, to a peer when it appears (right after a
heartbeat, because a node ignores intro points from a sender it has no heartbeat from), to a
peer whose last copy from us is not our current set, and to every peer every
``intro_refresh_heartbeats`` heartbeats. The protocol has no "please resend": the refresh is what
repairs a lost datagram or a peer that restarted within the heartbeat timeout.

Every heartbeat carries the election's believed publisher (``Election.report``). When the
election says a newer sign of life of that publisher arrived, or the belief changed
(:class:`~rustbalance.cluster.election.RelayBelief`), the heartbeat goes out at once instead of
at its time (at most once per half interval, and the periodic timer restarts from it), so the
news crosses a non-transitive partition hop by hop without an interval of delay per hop.
When a peer's heartbeat names no publisher or a worse one than ours, or a worse peer claims
(:class:`~rustbalance.cluster.election.InformPeer`), that peer alone gets our heartbeat at once
(at most once per half interval per peer): a node that has just started learns the publisher
within a round trip of its first heartbeat, well inside its discovery window, and a wrong claim
is answered within one.

Learned peers are saved as JSON (``cluster_peers.json`` in the state dir, mode 0600, written
atomically) and loaded at start, so a restarted node finds the cluster without its seed peers.

Two clocks are injected: ``clock`` (wall time, only for message timestamps, which the receivers
check against the skew tolerance) and ``monotonic`` (liveness, election timers), so a wall
clock step never expires peers or triggers a takeover.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Generic, TypeVar

from rustbalance.atomic_file import write_file_atomic
from rustbalance.cluster.election import (
    Action,
    BecomePublisher,
    Election,
    ElectionTimings,
    InformPeer,
    RelayBelief,
    SendLeaseClaim,
    SendLeaseRelease,
    StepDown,
)
from rustbalance.cluster.messages import (
    MAX_INTRO_POINTS,
    MAX_KNOWN_PEERS,
    MAX_U64,
    ClusterKey,
    CoordinationError,
    Envelope,
    Heartbeat,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    Payload,
    PeerAnnounce,
    Receiver,
    RejectReason,
    Role,
    Sender,
    check_node_id,
    check_peer_address,
    intro_points_digest,
)
from rustbalance.cluster.peers import AddressSource, KnownPeer, PeerTable, load_known_peers
from rustbalance.cluster.transport import DEFAULT_WARN_INTERVAL_SECS, Address, ClusterTransport
from rustbalance.config.schema import Config, CoordinationConfig
from rustbalance.errors import RustBalanceError

__all__ = [
    "PEERS_FILE_NAME",
    "ChangeKind",
    "Coordinator",
    "CoordinatorCounters",
    "LivePeer",
]

log = logging.getLogger(__name__)

PEERS_FILE_NAME = "cluster_peers.json"
_MAX_TICK_SECS = 1.0
_DEFAULT_INTRO_REFRESH_HEARTBEATS = 6
# lease_release is sent twice: it is what makes a graceful failover fast, and one lost UDP
# datagram would turn it into a timeout failover.
_RELEASE_COPIES = 2

PointT = TypeVar("PointT")


class ChangeKind(StrEnum):
    ROLE = "role"
    PEER_UP = "peer_up"
    PEER_DOWN = "peer_down"
    INTRO_POINTS = "intro_points"


@dataclass(frozen=True)
class LivePeer(Generic[PointT]):
    node_id: str
    role: Role
    priority: int
    term: int
    publisher_eligible: bool
    address: str | None
    last_heard: float  # on the coordinator's monotonic clock
    last_publish: int | None
    intro_points: tuple[PointT, ...]
    # False while the intro points we hold differ from what the peer's last heartbeat advertised.
    intro_points_current: bool


@dataclass
class CoordinatorCounters:
    """Monotonic counters for metrics (datagrams, not messages, where one is sent to many)."""

    heartbeats_sent: int = 0
    early_heartbeats_sent: int = 0  # sent before their time to relay the believed publisher
    inform_heartbeats_sent: int = 0  # sent to one peer that does not know our publisher
    heartbeats_received: int = 0
    intro_points_sent: int = 0
    intro_points_received: int = 0
    lease_claims_sent: int = 0
    lease_claims_received: int = 0
    lease_releases_sent: int = 0
    lease_releases_received: int = 0
    peer_announces_received: int = 0
    invalid_intro_points: int = 0
    oversized_outgoing: int = 0
    peers_file_writes: int = 0
    role_changes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Coordinator(Generic[PointT]):
    """The cluster member of one node. See the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        priority: int,
        publisher_eligible: bool,
        config: CoordinationConfig,
        key: ClusterKey,
        state_dir: Path | None,
        encode_intro_point: Callable[[PointT], bytes],
        decode_intro_point: Callable[[bytes], PointT],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        randbytes: Callable[[int], bytes] = os.urandom,
        advertise: str | None = None,
        tick_interval: float | None = None,
        intro_refresh_heartbeats: int = _DEFAULT_INTRO_REFRESH_HEARTBEATS,
        on_change: Callable[[ChangeKind], None] | None = None,
        warn_interval: float = DEFAULT_WARN_INTERVAL_SECS,
    ) -> None:
        # ElectionTimings runs validate_timings: a bad combination fails here, at start-up.
        self.timings = ElectionTimings(
            config.heartbeat_interval_secs,
            config.heartbeat_timeout_secs,
            config.takeover_grace_secs,
        )
        self.node_id = node_id
        self.priority = priority
        self.config = config
        self._encode = encode_intro_point
        self._decode = decode_intro_point
        self._clock = clock
        self._monotonic = monotonic
        self._eligible = publisher_eligible
        self._listen = str(config.listen)
        # What we tell others to use for us (e.g. a NAT or relay address); listen by default.
        self.advertise = check_peer_address(advertise if advertise is not None else self._listen)
        self.tick_interval = (
            tick_interval
            if tick_interval is not None
            else min(_MAX_TICK_SECS, config.heartbeat_interval_secs / 2)
        )
        if intro_refresh_heartbeats < 1:
            raise CoordinationError("intro_refresh_heartbeats must be at least 1")
        self._refresh_every = intro_refresh_heartbeats
        self._on_change = on_change
        self.peers_file = state_dir / PEERS_FILE_NAME if state_dir is not None else None
        self.peers = PeerTable(
            node_id, self.advertise, heartbeat_timeout=config.heartbeat_timeout_secs
        )
        self.election = self._new_election()
        sender = Sender(
            node_id,
            key,
            boot_time=clock(),
            randbytes=randbytes,
            max_datagram_bytes=config.max_datagram_bytes,
        )
        receiver = Receiver(
            node_id,
            key,
            clock_skew_tolerance=config.clock_skew_tolerance_secs,
            max_datagram_bytes=config.max_datagram_bytes,
        )
        self.transport = ClusterTransport(
            self._listen,
            sender,
            receiver,
            self._on_message,
            clock=clock,
            monotonic=monotonic,
            max_datagram_bytes=config.max_datagram_bytes,
            warn_interval=warn_interval,
        )
        self._seeds = tuple(str(peer) for peer in config.peers)
        self.counters = CoordinatorCounters()
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        self._own_encoded: tuple[bytes, ...] = ()
        self._own_digest = intro_points_digest(())
        self._sent_digest: dict[str, bytes] = {}
        self._decoded: dict[str, tuple[PointT, ...]] = {}
        self._sources: dict[str, Address] = {}
        self._last_publish: int | None = None
        self._next_heartbeat = 0.0
        self._last_heartbeat: float | None = None  # when the last broadcast heartbeat went out
        # When each peer last got a heartbeat of its own (on appearing, or InformPeer).
        self._answered: dict[str, float] = {}
        self._heartbeats = 0
        self._gossip_limit = MAX_KNOWN_PEERS
        self._saved_peers_json: str | None = None
        self._running = False
        self._stopped = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        key: ClusterKey,
        *,
        encode_intro_point: Callable[[PointT], bytes],
        decode_intro_point: Callable[[bytes], PointT],
        on_change: Callable[[ChangeKind], None] | None = None,
    ) -> Coordinator[PointT]:
        return cls(
            node_id=config.node.id,
            priority=config.node.priority,
            publisher_eligible=config.node.publisher_eligible,
            config=config.coordination,
            key=key,
            state_dir=config.node.state_dir,
            encode_intro_point=encode_intro_point,
            decode_intro_point=decode_intro_point,
            on_change=on_change,
            advertise=(
                str(config.coordination.advertise) if config.coordination.advertise else None
            ),
        )

    def __repr__(self) -> str:
        return (
            f"Coordinator(node_id={self.node_id!r}, role={self.role.value}, "
            f"live_peers={len(self.peers.live_peers(self._monotonic()))})"
        )

    def _new_election(self) -> Election:
        # The coordinator is only run in multi-node mode (peers configured or remembered), so
        # never single_node: a lone member listens for the discovery window and then claims.
        return Election(
            self.node_id,
            self.priority,
            boot_time=self._monotonic(),
            eligible=self._eligible,
            timings=self.timings,
        )

    # -- observable state ---------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.election.role

    @property
    def is_publisher(self) -> bool:
        return self.election.is_publisher

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def is_multi(self) -> bool:
        """True while at least one other node is live (2+ live nodes including us)."""
        return bool(self.peers.live_peers(self._monotonic()))

    @property
    def rejected(self) -> dict[RejectReason, int]:
        return self.transport.rejected

    @property
    def local_address(self) -> Address:
        return self.transport.local_address

    @property
    def own_intro_digest(self) -> bytes:
        return self._own_digest

    def publisher(self) -> str | None:
        """The node we believe publishes (ourselves or a live peer), None if none is known."""
        return self.election.publisher(self._monotonic())

    def live_peers(self) -> list[LivePeer[PointT]]:
        now = self._monotonic()
        return [
            LivePeer(
                node_id=p.node_id,
                role=p.role,
                priority=p.priority,
                term=p.term,
                publisher_eligible=p.publisher_eligible,
                address=self.peers.address_of(p.node_id),
                last_heard=p.last_heard,
                last_publish=p.last_publish,
                intro_points=self._decoded.get(p.node_id, ()),
                intro_points_current=p.intro_points_current,
            )
            for p in self.peers.live_peers(now)
        ]

    def peer_intro_points(self) -> dict[str, tuple[PointT, ...]]:
        """Decoded intro points of every live peer that sent any, by node id."""
        now = self._monotonic()
        return {
            p.node_id: self._decoded[p.node_id]
            for p in self.peers.live_peers(now)
            if self._decoded.get(p.node_id)
        }

    # -- inputs from the daemon ---------------------------------------------------------------

    def set_intro_points(self, points: Iterable[PointT]) -> bool:
        """Our own current intro points; sent to every peer at once if the *set* changed."""
        encoded = tuple(dict.fromkeys(self._encode(point) for point in points))
        if len(encoded) > MAX_INTRO_POINTS:
            encoded = encoded[:MAX_INTRO_POINTS]
        digest = intro_points_digest(encoded)
        if digest == self._own_digest:
            return False
        self._own_encoded = encoded
        self._own_digest = digest
        if self._running and not self._stopped:
            self._send_intro_points(self._all_targets(), list(self._live_ids()))
        return True

    def add_peer(self, node_id: str, address: str) -> None:
        """A peer learned outside coordination (a node admitted over the master onion, or the
        saved mesh peers): it gets our heartbeats from the next tick and is saved with the
        learned peers. Its own heartbeats later replace the address (it speaks for itself)."""
        canonical = check_peer_address(address)
        if check_node_id(node_id) == self.node_id:
            raise CoordinationError("a peer cannot have our own node id")
        self.peers.restore(
            [KnownPeer(node_id, canonical, AddressSource.RESTORED, 0.0)], self._monotonic()
        )

    def set_last_publish(self, unix_time: int) -> None:
        """Record a successful publish (advertised in our heartbeats)."""
        self._last_publish = int(unix_time)

    def set_eligible(self, eligible: bool) -> None:
        """Publisher eligibility changed (e.g. tor down): an ineligible publisher steps down."""
        self._eligible = eligible
        self._apply(self.election.set_eligible(eligible, self._monotonic()))

    # -- the long-running coroutine -----------------------------------------------------------

    async def run(self) -> None:
        """Bind, rejoin from the peers file, then tick until cancelled."""
        if self._running:
            raise CoordinationError("coordinator is already running")
        await self._load_peers_file()
        await self.transport.open()
        self._running = True
        self.election = self._new_election()
        self._next_heartbeat = self._monotonic()
        self.ready.set()
        log.info(
            "coordination listening on %s as %s (priority %d, eligible %s, %d seed peers)",
            self._listen,
            self.node_id,
            self.priority,
            self._eligible,
            len(self._seeds),
        )
        try:
            while True:
                await self._tick()
                await asyncio.sleep(self.tick_interval)
        finally:
            self._running = False
            self.ready.clear()
            self.transport.close()

    async def shutdown(self) -> None:
        """Leave the cluster (SIGTERM): a publisher sends lease_release; heartbeats stop.

        Call it before cancelling :meth:`run`; if the transport is already closed, the release
        goes out through a short-lived socket instead.
        """
        if self._stopped:
            return
        self._stopped = True
        actions = self.election.shutdown(self._monotonic())
        if not actions:
            return
        temporary = not self.transport.is_open
        if temporary:
            await self.transport.open(ephemeral=True)
        try:
            self._apply(actions)
        finally:
            if temporary:
                self.transport.close()

    # -- the tick -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        now = self._monotonic()
        for address in self._addresses():
            # Literals return at once; host names are looked up (cached) so sends never block.
            await self.transport.resolve(address)
        for node_id in self.peers.expire(now):
            self._decoded.pop(node_id, None)
            self._sent_digest.pop(node_id, None)
            log.info("peer %s is down (silent for %.1f s)", node_id, self.timings.heartbeat_timeout)
            self._apply(self.election.on_peer_expired(node_id, now))
            self._notify(ChangeKind.PEER_DOWN)
        self._apply(self.election.tick(now))
        # Bounded: only the entries that can still hold an answer back.
        limit = self.timings.heartbeat_interval / 2
        self._answered = {k: t for k, t in self._answered.items() if now - t < limit}
        if not self._stopped and now >= self._next_heartbeat:
            self._broadcast_heartbeat(now)
        await self._save_peers_file()

    def _broadcast_heartbeat(self, now: float) -> None:
        """The periodic heartbeat (also sent early to relay our believed publisher)."""
        self._next_heartbeat = now + self.timings.heartbeat_interval
        self._last_heartbeat = now
        self._send_heartbeat(self._all_targets())
        self._heartbeats += 1
        if self._heartbeats % self._refresh_every == 0:
            live = list(self._live_ids())
            self._send_intro_points(self._targets_of(live), live)

    # -- receiving ----------------------------------------------------------------------------

    def _on_message(self, envelope: Envelope, source: Address) -> None:
        now = self._monotonic()
        sender = envelope.sender
        payload = envelope.payload
        if _highest_term(payload) >= MAX_U64:
            # A node that adopts this term can never claim the next one (it does not fit the
            # wire's 64 bits): the election would be stuck for good. Only a broken or hostile
            # cluster member sends it; drop it like an undecodable message.
            self.transport.warn(
                f"term:{sender}", "dropped a message from %s: its term cannot be exceeded", sender
            )
            return
        self._sources[sender] = source
        if isinstance(payload, Heartbeat):
            self.counters.heartbeats_received += 1
            appeared = self.peers.on_heartbeat(sender, payload, now)
            actions = self.election.on_heartbeat(
                sender,
                payload.role,
                payload.priority,
                payload.term,
                payload.publisher_eligible,
                now,
                seq=envelope.seq,
                report=payload.believed_publisher,
            )
            if appeared:
                log.info("peer %s is up (%s, priority %d)", sender, payload.role, payload.priority)
                self._notify(ChangeKind.PEER_UP)
                if not self._stopped and self._running:
                    # It may not know us yet and would drop our intro points: heartbeat first.
                    self._send_heartbeat(self._targets_of([sender]))
                    self._answered[sender] = now  # it has our belief: no InformPeer on top
            if (
                not self._stopped
                and self._running
                and self.peers.get(sender) is not None
                and self._sent_digest.get(sender) != self._own_digest
            ):
                self._send_intro_points(self._targets_of([sender]), [sender])
            self._apply(actions)
        elif isinstance(payload, IntroPoints):
            self.counters.intro_points_received += 1
            if self.peers.on_intro_points(sender, payload, now):
                # The table's copy: duplicates removed, so a point is never merged twice.
                peer = self.peers.get(sender)
                points = peer.intro_points if peer is not None else payload.intro_points
                self._decoded[sender] = self._decode_points(sender, points)
                self._notify(ChangeKind.INTRO_POINTS)
        elif isinstance(payload, LeaseClaim):
            self.counters.lease_claims_received += 1
            log.info("peer %s claims the publisher lease (term %d)", sender, payload.term)
            self._apply(
                self.election.on_lease_claim(
                    sender, payload.term, payload.priority, now, seq=envelope.seq
                )
            )
        elif isinstance(payload, LeaseRelease):
            self.counters.lease_releases_received += 1
            log.info("peer %s released the publisher lease (term %d)", sender, payload.term)
            self._apply(self.election.on_lease_release(sender, payload.term, now, seq=envelope.seq))
            # Its publishing stopped: the daemon's view of who publishes changed.
            self._notify(ChangeKind.ROLE)
        elif isinstance(payload, PeerAnnounce):
            self.counters.peer_announces_received += 1
            self.peers.on_peer_announce(sender, payload, now)

    def _decode_points(self, sender: str, raw: Iterable[bytes]) -> tuple[PointT, ...]:
        decoded: list[PointT] = []
        for data in raw:
            try:
                decoded.append(self._decode(data))
            except (RustBalanceError, ValueError) as exc:
                # Authenticated but undecodable: a version mismatch or a bug, not an attack.
                self.counters.invalid_intro_points += 1
                self.transport.warn(
                    f"intro:{sender}", "dropped an undecodable intro point from %s: %s", sender, exc
                )
        return tuple(decoded)

    # -- sending ------------------------------------------------------------------------------

    def _addresses(self) -> list[str]:
        """Every address we talk to: seeds and learned peers, without ourselves."""
        own = {self._listen, self.advertise}
        seen: dict[str, None] = {}
        for address in (*self._seeds, *(p.address for p in self.peers.known_peers())):
            if address not in own:
                seen[address] = None
        return list(seen)

    def _all_targets(self) -> list[Address]:
        targets: dict[Address, None] = {}
        for address in self._addresses():
            resolved = self.transport.resolve_cached(address)
            if resolved is not None:
                targets[resolved] = None
        return list(targets)

    def _targets_of(self, node_ids: Iterable[str]) -> list[Address]:
        targets: dict[Address, None] = {}
        for node_id in node_ids:
            address = self.peers.address_of(node_id)
            resolved = self.transport.resolve_cached(address) if address is not None else None
            # Fall back to where its authenticated messages come from (e.g. before gossip).
            if resolved is None:
                resolved = self._sources.get(node_id)
            if resolved is not None:
                targets[resolved] = None
        return list(targets)

    def _live_ids(self) -> Iterable[str]:
        return (p.node_id for p in self.peers.live_peers(self._monotonic()))

    def _send_heartbeat(self, targets: list[Address]) -> None:
        if not targets:
            return
        while True:
            heartbeat = Heartbeat(
                role=self.election.role,
                priority=self.priority,
                term=self.election.term,
                intro_digest=self._own_digest,
                last_publish=self._last_publish,
                publisher_eligible=self._eligible,
                known_peers=self.peers.gossip(self._gossip_limit),
                believed_publisher=self.election.report(self._monotonic()),
            )
            try:
                datagram = self.transport.seal(heartbeat)
                break
            except CoordinationError:
                # Too many known peers for max_datagram_bytes: gossip fewer (ourselves and
                # the freshest first), never skip the heartbeat itself.
                if self._gossip_limit <= 1:
                    self.counters.oversized_outgoing += 1
                    return
                self._gossip_limit //= 2
        self.counters.heartbeats_sent += self.transport.send_datagram(datagram, targets)

    def _send_intro_points(self, targets: list[Address], node_ids: list[str]) -> None:
        if not targets:
            return
        points = self._own_encoded
        while True:
            try:
                datagram = self.transport.seal(IntroPoints(points))
                break
            except CoordinationError:
                # More than fits in one datagram: share the first ones rather than none.
                self.counters.oversized_outgoing += 1
                if not points:
                    return
                points = points[:-1]
        self.counters.intro_points_sent += self.transport.send_datagram(datagram, targets)
        for node_id in node_ids:
            self._sent_digest[node_id] = self._own_digest

    def _broadcast(self, payload: Payload) -> int:
        try:
            return self.transport.send(payload, self._all_targets())
        except CoordinationError:
            self.counters.oversized_outgoing += 1
            return 0

    def _apply(self, actions: list[Action]) -> None:
        broadcast = False  # a heartbeat to everyone went out for these actions
        for action in actions:
            if isinstance(action, BecomePublisher):
                log.info("%s becomes the publisher (term %d)", self.node_id, action.term)
                self.counters.role_changes += 1
                self._notify(ChangeKind.ROLE)
            elif isinstance(action, StepDown):
                log.info("%s steps down: %s", self.node_id, action.reason)
                self.counters.role_changes += 1
                self._notify(ChangeKind.ROLE)
            elif isinstance(action, SendLeaseClaim):
                claim = LeaseClaim(action.term, action.priority)
                self.counters.lease_claims_sent += self._broadcast(claim)
            elif isinstance(action, SendLeaseRelease):
                for _ in range(_RELEASE_COPIES):
                    release = LeaseRelease(action.term)
                    self.counters.lease_releases_sent += self._broadcast(release)
            elif isinstance(action, RelayBelief):
                broadcast = self._relay_belief() or broadcast
            elif isinstance(action, InformPeer) and not broadcast:
                self._inform_peer(action.node_id)

    def _inform_peer(self, node_id: str) -> None:
        """Send ``node_id`` alone our heartbeat now (it does not know our believed publisher).

        At most once per half interval per peer, so a peer that keeps disagreeing (e.g. it heard
        later news of the publisher than we did) costs at most two extra datagrams per interval.
        """
        if self._stopped or not self._running:
            return
        now = self._monotonic()
        last = self._answered.get(node_id)
        if last is not None and now - last < self.timings.heartbeat_interval / 2:
            return
        targets = self._targets_of([node_id])
        if not targets:
            return
        self._answered[node_id] = now
        self.counters.inform_heartbeats_sent += 1
        self._send_heartbeat(targets)

    def _relay_belief(self) -> bool:
        """Send our heartbeat now so a newer sign of our believed publisher travels on at once.

        At most once per half interval (so a burst of news costs at most two heartbeats per
        interval); the periodic timer restarts from here, so in steady state every node still
        sends one heartbeat per interval, just in a wave behind the publisher's. True if sent.
        """
        if self._stopped or not self._running:
            return False
        now = self._monotonic()
        last = self._last_heartbeat
        if last is not None and now - last < self.timings.heartbeat_interval / 2:
            return False
        self.counters.early_heartbeats_sent += 1
        self._broadcast_heartbeat(now)
        return True

    def _notify(self, kind: ChangeKind) -> None:
        self.changed.set()
        if self._on_change is not None:
            try:
                self._on_change(kind)
            except Exception:
                log.exception("coordination change callback failed")

    # -- the peers file -----------------------------------------------------------------------

    async def _load_peers_file(self) -> None:
        path = self.peers_file
        if path is None:
            return
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read %s: %s; starting from the seed peers", path, exc)
            return
        try:
            restored = load_known_peers(text)
        except CoordinationError as exc:
            log.warning("ignoring %s: %s", path, exc)
            return
        self.peers.restore(restored, self._monotonic())
        self._saved_peers_json = text
        log.info("restored %d known peers from %s", len(restored), path)

    async def _save_peers_file(self) -> None:
        path = self.peers_file
        if path is None:
            return
        text = self.peers.to_json()
        if text == self._saved_peers_json:
            return
        try:
            await asyncio.to_thread(_save, path, text)
        except OSError as exc:
            self.transport.warn("peers-file", "cannot save %s: %s", path, exc)
            return
        self._saved_peers_json = text
        self.counters.peers_file_writes += 1


def _highest_term(payload: Payload) -> int:
    """The largest election term a payload carries (0 if none)."""
    if isinstance(payload, Heartbeat):
        report = payload.believed_publisher
        return max(payload.term, report.term if report is not None else 0)
    if isinstance(payload, LeaseClaim | LeaseRelease):
        return payload.term
    return 0


def _save(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(path, text, 0o600)
