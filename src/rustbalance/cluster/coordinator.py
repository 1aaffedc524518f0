"""The coordination shell: drives :class:`PeerTable`, :class:`Election` and :class:`Membership`
over a UDP transport.

One coroutine, :meth:`Coordinator.run`, runs inside the daemon's TaskGroup until cancelled. Every
tick (about 1 s, at most half a heartbeat interval) it expires silent peers, lets the election
evaluate, sends a heartbeat when one is due, applies statements the ``rustbalance cluster``
commands left in the inbox and saves the membership. Incoming authenticated messages are handled
as they arrive (see :mod:`rustbalance.cluster.transport`).

Trust (issue 16). Every datagram is sealed between two members' own keys
(:mod:`rustbalance.cluster.messages`), so a message comes from its sender and speaks only for
it: its role, term, intro points, and the publisher statement it relays (signed by that
publisher, checked here against the publisher's record). Who is a member, where it is reached,
its priority and whether it may publish come from the master-signed admission records of the
:class:`~rustbalance.cluster.membership.Membership`, never from a message. Members exchange
the statements they hold when the digests in their heartbeats differ, so an admission or a
revocation made on one node reaches every node within a heartbeat or two; a revoked node's
datagrams are refused from then on, its intro points are dropped at once and it is told.
The apply step never raises on authenticated input: a message that would push the term or a
sequence number beyond the clock is dropped with a rate-limited warning.

What the daemon gets:

- :attr:`Coordinator.role` / :attr:`is_publisher`, :attr:`is_multi` (at least one live peer),
  :meth:`live_peers` (with their decoded intro points), :meth:`peer_intro_points`,
  :attr:`revoked` (this node was revoked: it must not publish);
- :attr:`changed` (an :class:`asyncio.Event`) and the optional ``on_change`` callback, fired on
  anything that affects publishing: our role changed, a peer appeared or died, a peer's intro
  points changed; ``on_members`` fires when the membership changed (the mesh follows it);
- :attr:`counters`, :attr:`rejected` and :meth:`members_status` for metrics and status.

What the daemon tells it: :meth:`set_intro_points` (sent to every peer at once when the *set*
changes), :meth:`set_last_publish`, :meth:`set_eligible`, :meth:`admit` (a joiner the mesh
admitted, or this node's own re-signed record) and :meth:`shutdown` from its SIGTERM hook (a
publisher sends ``lease_release`` so the next node takes over in about a second).

Intro points go out at once when our set changes, to a peer when it appears (right after a
heartbeat, because a node ignores intro points from a sender it has no heartbeat from), to a
peer whose last copy from us is not our current set, and to every peer every
``intro_refresh_heartbeats`` heartbeats. The protocol has no "please resend": the refresh is what
repairs a lost datagram or a peer that restarted within the heartbeat timeout.

Every heartbeat carries the election's believed publisher (``Election.report``) as that
publisher's signed statement. When the election says a newer sign of life of that publisher
arrived, or the belief changed (:class:`~rustbalance.cluster.election.RelayBelief`), the
heartbeat goes out at once instead of at its time (at most once per half interval, and the
periodic timer restarts from it), so the news crosses a non-transitive partition hop by hop
without an interval of delay per hop. When a peer's heartbeat names no publisher or a worse one
than ours, or a worse peer claims (:class:`~rustbalance.cluster.election.InformPeer`), that peer
alone gets our heartbeat at once (at most once per half interval per peer).

A member we do not hear from (it may not know our key yet: it just started, or it was
admitted elsewhere), and every seed address no member's record names, gets a *hello* with our
admission record along with our heartbeats; a hello from a member that is not live here is
answered at once (rate-limited), so two members learn each other within a round trip.

The membership is saved as JSON (``cluster_members.json`` in the state dir, mode 0600, written
atomically) and loaded at start. Two clocks are injected: ``clock`` (wall time: message
timestamps, terms, statements) and ``monotonic`` (liveness, election timers), so a wall clock
step never expires peers or triggers a takeover.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from rustbalance.atomic_file import write_file_atomic
from rustbalance.cluster.authority import AdmissionRecord, Statement
from rustbalance.cluster.election import (
    Action,
    BecomePublisher,
    Election,
    ElectionTimings,
    InformPeer,
    PublisherReport,
    RelayBelief,
    SendLeaseClaim,
    SendLeaseRelease,
    StepDown,
)
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.membership import Applied, Membership, Outcome
from rustbalance.cluster.messages import (
    MAX_INTRO_POINTS,
    MAX_STATEMENTS_PER_MESSAGE,
    MAX_U32,
    CoordinationError,
    Envelope,
    Heartbeat,
    Hello,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    Members,
    Payload,
    PublisherStatement,
    Receiver,
    RejectReason,
    Role,
    Sender,
    intro_points_digest,
)
from rustbalance.cluster.messages import PublisherReport as WireReport
from rustbalance.cluster.peers import PeerTable
from rustbalance.cluster.transport import DEFAULT_WARN_INTERVAL_SECS, Address, ClusterTransport
from rustbalance.config.schema import CoordinationConfig
from rustbalance.errors import RustBalanceError

__all__ = [
    "INBOX_DIR_NAME",
    "MEMBERS_FILE_NAME",
    "ChangeKind",
    "Coordinator",
    "CoordinatorCounters",
    "LivePeer",
    "load_membership_file",
]

log = logging.getLogger(__name__)

MEMBERS_FILE_NAME = "cluster_members.json"
# Statements (a revocation, a join policy) the `rustbalance cluster` commands leave for the
# daemon: one file each, applied and deleted at the next tick.
INBOX_DIR_NAME = "cluster-inbox"
_INBOX_SUFFIX = ".statement"
_MAX_INBOX_FILES = 64
_MAX_INBOX_FILE_BYTES = 4096
# The members file is bounded by what Membership.load_json accepts (4 000 000 characters,
# up to 4 bytes each in UTF-8).
_MAX_MEMBERS_FILE_BYTES = 16_000_000
_MAX_TICK_SECS = 1.0
_DEFAULT_INTRO_REFRESH_HEARTBEATS = 6
# lease_release is sent twice: it is what makes a graceful failover fast, and one lost UDP
# datagram would turn it into a timeout failover.
_RELEASE_COPIES = 2
# Publisher statements kept for relaying: one per eligible member, bounded like the membership.
_MAX_STATEMENTS_KEPT = 256

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
    hellos_sent: int = 0
    hellos_received: int = 0
    intro_points_sent: int = 0
    intro_points_received: int = 0
    lease_claims_sent: int = 0
    lease_claims_received: int = 0
    lease_releases_sent: int = 0
    lease_releases_received: int = 0
    members_sent: int = 0
    members_received: int = 0
    statements_applied: int = 0
    statements_refused: int = 0
    refused_messages: int = 0  # authenticated, but claiming what the sender may not
    invalid_intro_points: int = 0
    oversized_outgoing: int = 0
    members_file_writes: int = 0
    role_changes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_membership_file(
    path: Path, master_public: bytes, now_ms: int
) -> tuple[Membership, list[str]]:
    """A :class:`Membership` from ``path`` (empty if it does not exist) and the problems found.

    A missing file is no problem; an unreadable or foreign one is reported and ignored (the
    statements come back from the other members); damaged entries are skipped one by one.
    """
    membership = Membership(master_public)
    try:
        text = _read_members_text(path)
    except FileNotFoundError:
        return membership, []
    except (OSError, UnicodeDecodeError) as exc:
        return membership, [f"cannot read {path}: {exc}"]
    try:
        problems = membership.load_json(text, now_ms)
    except CoordinationError as exc:
        return membership, [f"{path}: {exc}"]
    return membership, [f"{path}: {problem}" for problem in problems]


def _read_members_text(path: Path) -> str:
    """The file's text, read without following a symlink, only from a regular file and
    bounded: ``rustbalance prepare`` reads it as root in a folder the service user owns."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        data = file.read(_MAX_MEMBERS_FILE_BYTES + 1)
    if len(data) > _MAX_MEMBERS_FILE_BYTES:
        raise OSError(f"larger than {_MAX_MEMBERS_FILE_BYTES} bytes")
    return data.decode("utf-8")


class Coordinator(Generic[PointT]):
    """The cluster member of one node. See the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        node_key: NodeKey,
        membership: Membership,
        config: CoordinationConfig,
        state_dir: Path | None,
        encode_intro_point: Callable[[PointT], bytes],
        decode_intro_point: Callable[[bytes], PointT],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        randbytes: Callable[[int], bytes] = os.urandom,
        tick_interval: float | None = None,
        intro_refresh_heartbeats: int = _DEFAULT_INTRO_REFRESH_HEARTBEATS,
        on_change: Callable[[ChangeKind], None] | None = None,
        on_members: Callable[[], None] | None = None,
        warn_interval: float = DEFAULT_WARN_INTERVAL_SECS,
    ) -> None:
        # ElectionTimings runs validate_timings: a bad combination fails here, at start-up.
        self.timings = ElectionTimings(
            config.heartbeat_interval_secs,
            config.heartbeat_timeout_secs,
            config.takeover_grace_secs,
        )
        self.node_id = node_id
        self.node_key = node_key
        self.membership = membership
        own = membership.member(node_id)
        if own is None or own.node_key != node_key.public:
            raise CoordinationError(
                f"node {node_id} is not admitted with its node key {node_key.fingerprint} "
                "(no valid admission record for it in the membership)"
            )
        self.config = config
        self._encode = encode_intro_point
        self._decode = decode_intro_point
        self._clock = clock
        self._monotonic = monotonic
        self._runtime_eligible = True
        self._listen = str(config.listen)
        self.tick_interval = (
            tick_interval
            if tick_interval is not None
            else min(_MAX_TICK_SECS, config.heartbeat_interval_secs / 2)
        )
        if intro_refresh_heartbeats < 1:
            raise CoordinationError("intro_refresh_heartbeats must be at least 1")
        self._refresh_every = intro_refresh_heartbeats
        self._on_change = on_change
        # Called when the membership changed (node/mesh.py subscribes its WireGuard peers).
        self.on_members = on_members
        self.revoked = False
        self.members_file = state_dir / MEMBERS_FILE_NAME if state_dir is not None else None
        self.inbox = state_dir / INBOX_DIR_NAME if state_dir is not None else None
        self.peers = PeerTable(node_id, heartbeat_timeout=config.heartbeat_timeout_secs)
        self.election = self._new_election()
        self.sender = Sender(
            node_id,
            node_key,
            boot_time=clock(),
            randbytes=randbytes,
            max_datagram_bytes=config.max_datagram_bytes,
        )
        self.receiver = Receiver(
            node_id,
            node_key,
            self._key_of,
            membership.master_public,
            clock_skew_tolerance=config.clock_skew_tolerance_secs,
            max_datagram_bytes=config.max_datagram_bytes,
        )
        self.transport = ClusterTransport(
            self._listen,
            self.receiver,
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
        # The newest verified statement of each publisher we heard of, for relaying.
        self._statements: dict[str, PublisherStatement] = {}
        self._last_publish: int | None = None
        self._next_heartbeat = 0.0
        self._last_heartbeat: float | None = None  # when the last broadcast heartbeat went out
        # When each peer last got a heartbeat of its own (on appearing, or InformPeer).
        self._answered: dict[str, float] = {}
        # When each peer last got our statements (its members digest differed from ours).
        self._members_sent: dict[str, float] = {}
        self._heartbeats = 0
        self._saved_members_json: str | None = None
        self._running = False
        self._stopped = False

    def __repr__(self) -> str:
        return (
            f"Coordinator(node_id={self.node_id!r}, role={self.role.value}, "
            f"live_peers={len(self.peers.live_peers(self._monotonic()))})"
        )

    def _new_election(self) -> Election:
        # The coordinator is only run in multi-node mode (peers configured or remembered), so
        # never single_node: a lone member listens for the discovery window and then claims.
        own = self._own_record()
        return Election(
            self.node_id,
            own.priority if own is not None else MAX_U32,
            boot_time=self._monotonic(),
            eligible=self._eligible(),
            timings=self.timings,
            wall_ms=self._now_ms,
        )

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _own_record(self) -> AdmissionRecord | None:
        own = self.membership.member(self.node_id)
        return own if own is not None and own.node_key == self.node_key.public else None

    def _eligible(self) -> bool:
        own = self._own_record()
        return (
            not self.revoked
            and own is not None
            and own.publisher_eligible
            and self._runtime_eligible
        )

    @property
    def priority(self) -> int:
        return self.election.priority

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
                address=self._address_of(p.node_id),
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

    def members_status(self) -> list[dict[str, Any]]:
        """Every admitted node for ``rustbalance status`` / ``cluster members`` (no secrets)."""
        now = self._monotonic()
        out: list[dict[str, Any]] = []
        for record in self.membership.members():
            peer = self.peers.get(record.node_id)
            own = record.node_id == self.node_id
            wg = record.wireguard
            out.append(
                {
                    "node_id": record.node_id,
                    "self": own,
                    "fingerprint": record.fingerprint,
                    "priority": record.priority,
                    "publisher_eligible": record.publisher_eligible,
                    "holds_master_key": record.holds_master_key,
                    "coordination": record.coordination,
                    "wireguard_key": wg.public_key_b64 if wg is not None else None,
                    "wireguard_endpoint": wg.endpoint if wg is not None else None,
                    "tunnel_address": wg.tunnel_address if wg is not None else None,
                    "admitted_at_ms": record.issued_at_ms,
                    "admitted_by": record.issuer,
                    "live": own or self.peers.is_live(record.node_id, now),
                    "last_seen_secs_ago": (
                        0.0
                        if own
                        else round(now - peer.last_heard, 1)
                        if peer is not None
                        else None
                    ),
                    "role": (
                        self.role.value if own else peer.role.value if peer is not None else None
                    ),
                }
            )
        return out

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
            live = list(self._live_ids())
            self._send_intro_points(live)
        return True

    def admit(self, statement: Statement) -> Applied:
        """A statement made on this node (a joiner's record, our own re-signed record): applied,
        saved at the next tick and sent to every member at once. Raises CoordinationError if
        the membership refused it (the join is then undone)."""
        applied = self._apply_statements([statement.data], source=None)
        outcome = applied[0] if applied else Applied(Outcome.KNOWN)
        if outcome.outcome not in (Outcome.ADDED, Outcome.UPDATED, Outcome.KNOWN):
            raise CoordinationError(f"the membership refused the statement: {outcome.outcome}")
        if outcome.changed and self._running and not self._stopped:
            self._send_members(self._member_ids(), [statement.data])
        return outcome

    def set_last_publish(self, unix_time: int) -> None:
        """Record a successful publish (advertised in our heartbeats)."""
        self._last_publish = int(unix_time)

    def set_eligible(self, eligible: bool) -> None:
        """Publisher eligibility changed (e.g. tor down): an ineligible publisher steps down."""
        self._runtime_eligible = eligible
        self._apply(self.election.set_eligible(self._eligible(), self._monotonic()))

    # -- the long-running coroutine -----------------------------------------------------------

    async def run(self) -> None:
        """Bind, then tick until cancelled."""
        if self._running:
            raise CoordinationError("coordinator is already running")
        await self.transport.open()
        self._running = True
        self.election = self._new_election()
        self._next_heartbeat = self._monotonic()
        self.ready.set()
        log.info(
            "coordination listening on %s as %s (key %s, priority %d, eligible %s, "
            "%d members, %d seed peers)",
            self._listen,
            self.node_id,
            self.node_key.fingerprint,
            self.election.priority,
            self._eligible(),
            len(self.membership.members()),
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
            self._peer_gone(node_id)
            log.info("peer %s is down (silent for %.1f s)", node_id, self.timings.heartbeat_timeout)
            self._apply(self.election.on_peer_expired(node_id, now))
        self._apply(self.election.tick(now))
        # Bounded: only the entries that can still hold an answer back.
        limit = self.timings.heartbeat_interval / 2
        self._answered = {k: t for k, t in self._answered.items() if now - t < limit}
        interval = self.timings.heartbeat_interval
        self._members_sent = {k: t for k, t in self._members_sent.items() if now - t < interval}
        self.membership.prune(int(self._clock()))
        await self._read_inbox()
        if not self._stopped and now >= self._next_heartbeat:
            self._broadcast_heartbeat(now)
        await self._save_members_file()

    def _broadcast_heartbeat(self, now: float) -> None:
        """The periodic heartbeat (also sent early to relay our believed publisher)."""
        self._next_heartbeat = now + self.timings.heartbeat_interval
        self._last_heartbeat = now
        members = self._member_ids()
        unheard = [m for m in members if not self.peers.is_live(m, now)]
        self._send_hello(unheard, self._orphan_seeds())
        self._send_heartbeat(members)
        self._heartbeats += 1
        if self._heartbeats % self._refresh_every == 0:
            self._send_intro_points(list(self._live_ids()))

    # -- receiving ----------------------------------------------------------------------------

    def _key_of(self, node_id: str) -> bytes | None:
        record = self.membership.member(node_id)
        return record.node_key if record is not None else None

    def _refuse(self, sender: str, what: str, *args: object) -> None:
        self.counters.refused_messages += 1
        self.transport.warn(f"refuse:{sender}", "dropped a message from %s: " + what, sender, *args)

    def _on_message(self, envelope: Envelope, source: Address) -> None:
        payload = envelope.payload
        if isinstance(payload, Hello):
            self._on_hello(envelope, source)
            return
        sender = envelope.sender
        record = self.membership.member(sender)
        if record is None:  # revoked between the receiver's check and now: nothing to do
            return
        now = self._monotonic()
        bound = self._now_ms() + self.receiver.skew_ms
        if isinstance(payload, Heartbeat | LeaseRelease) and payload.term > bound:
            # Terms follow the clock (election.py): one this far ahead could only push ours
            # towards the 64-bit limit.
            self._refuse(sender, "its term is ahead of the clock")
            return
        self._sources[sender] = source
        if isinstance(payload, Heartbeat):
            self._on_heartbeat(envelope, payload, record, now)
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
            statement = payload.statement
            if not record.publisher_eligible:
                self._refuse(sender, "it claims the publisher lease but may not publish")
                return
            if (
                statement.node_id != sender
                or statement.seq != envelope.seq
                or not self._statement_ok(statement, record)
            ):
                self._refuse(sender, "its lease claim does not carry its own valid statement")
                return
            self._keep_statement(statement)
            log.info("peer %s claims the publisher lease (term %d)", sender, statement.term)
            self._apply(
                self.election.on_lease_claim(
                    sender, statement.term, record.priority, now, seq=envelope.seq
                )
            )
        elif isinstance(payload, LeaseRelease):
            self.counters.lease_releases_received += 1
            log.info("peer %s released the publisher lease (term %d)", sender, payload.term)
            self._apply(self.election.on_lease_release(sender, payload.term, now, seq=envelope.seq))
            # Its publishing stopped: the daemon's view of who publishes changed.
            self._notify(ChangeKind.ROLE)
        elif isinstance(payload, Members):
            self.counters.members_received += 1
            self._apply_statements(payload.statements, source=sender)

    def _on_heartbeat(
        self, envelope: Envelope, heartbeat: Heartbeat, record: AdmissionRecord, now: float
    ) -> None:
        sender = envelope.sender
        if heartbeat.role is Role.PUBLISHER and not record.publisher_eligible:
            self._refuse(sender, "it says it publishes but may not publish")
            return
        self.counters.heartbeats_received += 1
        report = self._checked_report(sender, heartbeat.believed_publisher)
        appeared = self.peers.on_heartbeat(
            sender,
            heartbeat,
            now,
            priority=record.priority,
            eligible=record.publisher_eligible,
        )
        actions = self.election.on_heartbeat(
            sender,
            heartbeat.role,
            record.priority,
            heartbeat.term,
            record.publisher_eligible and heartbeat.publisher_eligible,
            now,
            seq=envelope.seq,
            report=report,
        )
        if appeared:
            log.info(
                "peer %s is up (%s, priority %d, key %s)",
                sender,
                heartbeat.role,
                record.priority,
                record.fingerprint,
            )
            self._notify(ChangeKind.PEER_UP)
            if not self._stopped and self._running:
                # It may not know us yet and would drop our intro points: heartbeat first.
                self._send_heartbeat([sender])
                self._answered[sender] = now  # it has our belief: no InformPeer on top
        if heartbeat.members_digest != self.membership.digest():
            self._share_members(sender, now)
        if (
            not self._stopped
            and self._running
            and self.peers.get(sender) is not None
            and self._sent_digest.get(sender) != self._own_digest
        ):
            self._send_intro_points([sender])
        self._apply(actions)

    def _statement_ok(self, statement: PublisherStatement, record: AdmissionRecord) -> bool:
        """A publisher statement by ``record``'s node: signed by its key, within the clock."""
        bound = self._now_ms() + self.receiver.skew_ms
        return (
            statement.node_id == record.node_id
            and statement.term <= bound
            and statement.timestamp_ms <= bound
            and statement.verify(record.node_key)
        )

    def _keep_statement(self, statement: PublisherStatement) -> None:
        old = self._statements.get(statement.node_id)
        if old is None and len(self._statements) >= _MAX_STATEMENTS_KEPT:
            return
        if old is None or statement.seq > old.seq:
            self._statements[statement.node_id] = statement

    def _checked_report(self, sender: str, report: WireReport | None) -> PublisherReport | None:
        """The election's view of a relayed report, or None if it does not hold up: the named
        publisher must be an admitted, eligible member and the statement its own (signed)."""
        if report is None:
            return None
        statement = report.statement
        subject = self.membership.member(statement.node_id)
        if subject is None or not subject.publisher_eligible:
            self._refuse(sender, "its believed publisher %s may not publish", statement.node_id)
            return None
        if not self._statement_ok(statement, subject):
            self._refuse(sender, "its report of %s is not that node's statement", statement.node_id)
            return None
        self._keep_statement(statement)
        # A relay cannot make the statement fresher than its signed time allows (give or take
        # the clock-skew tolerance): age at least now - timestamp - skew.
        floor = self._now_ms() - statement.timestamp_ms - self.receiver.skew_ms
        age_ms = min(MAX_U32, max(report.age_ms, floor))
        return PublisherReport(
            statement.node_id,
            subject.priority,
            statement.term,
            statement.seq,
            age_ms,
            report.hops,
        )

    def _on_hello(self, envelope: Envelope, source: Address) -> None:
        self.counters.hellos_received += 1
        record = envelope.record
        if record is None:
            return
        self._apply_statements([record.data], source=envelope.sender)
        sender = envelope.sender
        member = self.membership.member(sender)
        content = record.content
        if (
            member is None
            or not isinstance(content, AdmissionRecord)
            or member.node_key != content.node_key
        ):
            return  # an old or revoked record: nothing to answer
        now = self._monotonic()
        if self.peers.is_live(sender, now) or not self._running or self._stopped:
            return
        last = self._answered.get(sender)
        if last is not None and now - last < self.timings.heartbeat_interval / 2:
            return
        # It does not hear us (else we would hear it): introduce ourselves now.
        self._answered[sender] = now
        self._sources.setdefault(sender, source)
        self._send_hello([sender], [])
        self._send_heartbeat([sender])

    def _apply_statements(
        self, statements: Iterable[bytes], *, source: str | None
    ) -> list[Applied]:
        """Apply master-signed statements; saves, notifies and drops revoked peers."""
        now_ms = self._now_ms()
        before = {r.node_id: r for r in self.membership.members()}
        results: list[Applied] = []
        for data in statements:
            try:
                applied = self.membership.apply_bytes(data, now_ms)
            except CoordinationError as exc:
                self.counters.statements_refused += 1
                origin = source or "this node"
                self.transport.warn(
                    f"statement:{origin}", "refused a statement from %s: %s", origin, exc
                )
                continue
            results.append(applied)
            if not applied.changed:
                continue
            self.counters.statements_applied += 1
            log.info(
                "membership: %s %s%s",
                applied.outcome.value,
                applied.node_id or "join policy",
                f" (from {source})" if source else "",
            )
            if applied.outcome is Outcome.REVOKED and applied.node_id is not None:
                self._revoked_member(applied.node_id, data, before.get(applied.node_id))
        if any(r.changed for r in results):
            self._membership_changed()
        return results

    def _revoked_member(
        self, node_id: str, revocation: bytes, record: AdmissionRecord | None
    ) -> None:
        if node_id == self.node_id:
            self.revoked = True
            log.error(
                "this node (%s) was revoked: it stops coordinating and never publishes again "
                "with this node key",
                node_id,
            )
            self._apply(self.election.set_eligible(False, self._monotonic()))
            self._notify(ChangeKind.ROLE)
            return
        if record is not None:
            self._tell_revoked(record, revocation)
        self.receiver.forget(node_id)
        if self.peers.remove(node_id):
            self._peer_gone(node_id)
            log.info("peer %s was revoked: its intro points are dropped", node_id)
        self._apply(self.election.forget(node_id, self._monotonic()))

    def _tell_revoked(self, record: AdmissionRecord, revocation: bytes) -> None:
        """Send a revoked node its revocation (sealed to its old key), so that it stops
        publishing; its own messages are refused from now on anyway."""
        if self._stopped or not self._running or self.revoked:
            return
        target = self.transport.resolve_cached(record.coordination) or self._sources.get(
            record.node_id
        )
        if target is None:
            return
        stamp = self.sender.reserve(self._clock())
        try:
            datagram = self.sender.seal(
                Members((revocation,)), stamp, record.node_id, record.node_key
            )
        except CoordinationError:
            return
        self.counters.members_sent += self.transport.send_datagram(datagram, [target])

    def _peer_gone(self, node_id: str) -> None:
        self._decoded.pop(node_id, None)
        self._sent_digest.pop(node_id, None)
        self._notify(ChangeKind.PEER_DOWN)

    def _membership_changed(self) -> None:
        own = self._own_record()
        if own is None and not self.revoked:
            log.warning("this node's own admission record is missing or superseded")
        elif own is not None and own.priority != self.election.priority:
            self.election.priority = own.priority
        self._apply(self.election.set_eligible(self._eligible(), self._monotonic()))
        # A node revoked, superseded or made ineligible stops counting at once (no grace);
        # one still admitted comes back with its next heartbeat.
        members = {r.node_id: r for r in self.membership.members()}
        for node_id in sorted(self.election.known()):
            record = members.get(node_id)
            if record is None or not record.publisher_eligible:
                self._apply(self.election.forget(node_id, self._monotonic()))
        if self.on_members is not None:
            try:
                self.on_members()
            except Exception:
                log.exception("membership change callback failed")

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

    # -- addresses ----------------------------------------------------------------------------

    def _member_ids(self) -> list[str]:
        return [r.node_id for r in self.membership.members() if r.node_id != self.node_id]

    def _address_of(self, node_id: str) -> str | None:
        record = self.membership.member(node_id)
        return record.coordination if record is not None else None

    def _own_addresses(self) -> set[str]:
        own = {self._listen}
        record = self._own_record()
        if record is not None:
            own.add(record.coordination)
        return own

    def _orphan_seeds(self) -> list[str]:
        """Seed addresses no member's record names (we learn who is there from its hello)."""
        named = {r.coordination for r in self.membership.members()} | self._own_addresses()
        return [s for s in self._seeds if s not in named]

    def _addresses(self) -> list[str]:
        """Every address we talk to: members and seeds, without ourselves."""
        own = self._own_addresses()
        seen: dict[str, None] = {}
        for address in (*self._seeds, *(r.coordination for r in self.membership.members())):
            if address not in own:
                seen[address] = None
        return list(seen)

    def _target_of(self, node_id: str) -> Address | None:
        address = self._address_of(node_id)
        resolved = self.transport.resolve_cached(address) if address is not None else None
        if resolved is None:
            # Fall back to where its authenticated messages come from.
            resolved = self._sources.get(node_id)
        return resolved

    def _live_ids(self) -> Iterable[str]:
        return (p.node_id for p in self.peers.live_peers(self._monotonic()))

    # -- sending ------------------------------------------------------------------------------

    def _send_to(self, payload: Payload, node_ids: Iterable[str], stamp: tuple[int, int]) -> int:
        """Seal ``payload`` for each member and send it; how many datagrams went out."""
        sent = 0
        for node_id in node_ids:
            key = self._key_of(node_id)
            target = self._target_of(node_id)
            if key is None or target is None:
                continue
            try:
                datagram = self.sender.seal(payload, stamp, node_id, key)
            except CoordinationError:
                self.counters.oversized_outgoing += 1
                return sent
            sent += self.transport.send_datagram(datagram, [target])
        return sent

    def _send_hello(self, node_ids: Iterable[str], seeds: Iterable[str]) -> None:
        own = self.membership.statement_of(self.node_id)
        if own is None or self._stopped or not self._running:
            return
        targets: dict[Address, None] = {}
        for node_id in node_ids:
            target = self._target_of(node_id)
            if target is not None:
                targets[target] = None
        for seed in seeds:
            resolved = self.transport.resolve_cached(seed)
            if resolved is not None:
                targets[resolved] = None
        if not targets:
            return
        try:
            datagram = self.sender.hello(own, self._clock())
        except CoordinationError:
            self.counters.oversized_outgoing += 1
            return
        self.counters.hellos_sent += self.transport.send_datagram(datagram, list(targets))

    def _heartbeat(self, stamp: tuple[int, int]) -> Heartbeat:
        return Heartbeat(
            role=self.election.role,
            term=self.election.term,
            intro_digest=self._own_digest,
            last_publish=self._last_publish,
            publisher_eligible=self._eligible(),
            members_digest=self.membership.digest(),
            believed_publisher=self._wire_report(stamp),
        )

    def _wire_report(self, stamp: tuple[int, int]) -> WireReport | None:
        """Our believed publisher as it travels: its own signed statement."""
        report = self.election.report(self._monotonic())
        if report is None:
            return None
        if report.node_id == self.node_id:
            seq, timestamp_ms = stamp
            own = PublisherStatement.sign(
                self.node_key, self.node_id, self.election.term, seq, timestamp_ms
            )
            return WireReport(own, 0, 0)
        relayed = self._statements.get(report.node_id)
        if relayed is None:
            return None
        return WireReport(relayed, report.age_ms, report.hops)

    def _send_heartbeat(self, node_ids: Iterable[str]) -> None:
        if self.revoked:
            return
        targets = list(node_ids)
        if not targets:
            return
        stamp = self.sender.reserve(self._clock())
        heartbeat = self._heartbeat(stamp)
        self.counters.heartbeats_sent += self._send_to(heartbeat, targets, stamp)

    def _send_intro_points(self, node_ids: list[str]) -> None:
        if not node_ids or self.revoked:
            return
        points = self._own_encoded
        longest = max(node_ids, key=len)
        while points and not self.sender.fits(IntroPoints(points), longest):
            # More than fits in one datagram: share the first ones rather than none.
            self.counters.oversized_outgoing += 1
            points = points[:-1]
        stamp = self.sender.reserve(self._clock())
        self.counters.intro_points_sent += self._send_to(IntroPoints(points), node_ids, stamp)
        for node_id in node_ids:
            self._sent_digest[node_id] = self._own_digest

    def _share_members(self, node_id: str, now: float) -> None:
        """Send ``node_id`` every statement we hold (at most once per interval per peer)."""
        last = self._members_sent.get(node_id)
        if last is not None and now - last < self.timings.heartbeat_interval:
            return
        if self._stopped or not self._running:
            return
        self._members_sent[node_id] = now
        self._send_members([node_id], [s.data for s in self.membership.statements()])

    def _send_members(self, node_ids: list[str], statements: list[bytes]) -> None:
        """Send ``statements`` in as few datagrams as fit (at most 64 statements each)."""
        if self.revoked or not node_ids:
            return
        longest = max(node_ids, key=len)
        chunk: list[bytes] = []
        for data in statements:
            candidate = [*chunk, data]
            if chunk and (
                len(candidate) > MAX_STATEMENTS_PER_MESSAGE
                or not self.sender.fits(Members(tuple(candidate)), longest)
            ):
                self._send_chunk(node_ids, chunk)
                candidate = [data]
            chunk = candidate
        if chunk:
            self._send_chunk(node_ids, chunk)

    def _send_chunk(self, node_ids: list[str], chunk: list[bytes]) -> None:
        stamp = self.sender.reserve(self._clock())
        self.counters.members_sent += self._send_to(Members(tuple(chunk)), node_ids, stamp)

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
                stamp = self.sender.reserve(self._clock())
                statement = PublisherStatement.sign(
                    self.node_key, self.node_id, action.term, *stamp
                )
                sent = self._send_to(LeaseClaim(statement), self._member_ids(), stamp)
                self.counters.lease_claims_sent += sent
            elif isinstance(action, SendLeaseRelease):
                for _ in range(_RELEASE_COPIES):
                    stamp = self.sender.reserve(self._clock())
                    release = LeaseRelease(action.term)
                    sent = self._send_to(release, self._member_ids(), stamp)
                    self.counters.lease_releases_sent += sent
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
        if self._target_of(node_id) is None:
            return
        self._answered[node_id] = now
        self.counters.inform_heartbeats_sent += 1
        self._send_heartbeat([node_id])

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

    # -- the inbox and the members file -------------------------------------------------------

    async def _read_inbox(self) -> None:
        inbox = self.inbox
        if inbox is None:
            return
        try:
            found = await asyncio.to_thread(_take_inbox, inbox)
        except OSError as exc:
            self.transport.warn("inbox", "cannot read %s: %s", inbox, exc)
            return
        if found:
            applied = self._apply_statements(found, source="rustbalance cluster")
            changed = [data for data, a in zip(found, applied, strict=False) if a.changed]
            if changed and self._running and not self._stopped:
                self._send_members(self._member_ids(), changed)

    async def save_members(self) -> None:
        """Save the membership now (an admission is on disk before the joiner is answered)."""
        await self._save_members_file()

    async def _save_members_file(self) -> None:
        path = self.members_file
        if path is None:
            return
        text = self.membership.to_json()
        if text == self._saved_members_json:
            return
        try:
            await asyncio.to_thread(_save, path, text)
        except OSError as exc:
            self.transport.warn("members-file", "cannot save %s: %s", path, exc)
            return
        self._saved_members_json = text
        self.counters.members_file_writes += 1


def _take_inbox(inbox: Path) -> list[bytes]:
    """Read and delete the statement files in ``inbox`` (bounded; symlinks are not followed).
    Each holds one statement in base64 (``rustbalance cluster`` writes them)."""
    try:
        entries = sorted(
            (
                e
                for e in os.scandir(inbox)
                if e.name.endswith(_INBOX_SUFFIX) and e.is_file(follow_symlinks=False)
            ),
            key=lambda e: e.name,
        )
    except FileNotFoundError:
        return []
    found: list[bytes] = []
    for entry in entries[:_MAX_INBOX_FILES]:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = os.read(fd, _MAX_INBOX_FILE_BYTES + 1)
            finally:
                os.close(fd)
            if len(data) <= _MAX_INBOX_FILE_BYTES:
                with contextlib.suppress(binascii.Error, ValueError):
                    found.append(base64.b64decode(data.strip(), validate=True))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    return found


def _save(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(path, text, 0o600)
