"""The etcd backend's pure core: key layout, member records, lease timing and the election.

No I/O, no clock of its own: the shell (:mod:`rustbalance.cluster.etcd_backend`) feeds it what
etcd said (a listing, watch batches, lease grants and keep-alive answers, the outcome of its own
writes) together with ``now`` on its monotonic clock, and asks :meth:`EtcdMembership.decide`
what holds now and what to write next.

Keys, under the configured prefix ``P`` (default ``/rustbalance/``); a node may write only its
own two (etcd RBAC, docs/etcd.md) and read the whole prefix:

- ``P nodes/<id>``: the member record (JSON, :func:`encode_record`): priority, eligibility,
  last successful publish and the node's intro points (tor's encoding, base64). Attached to the
  node's lease, so a dead node's record disappears when its lease expires.
- ``P election/<id>``: the node's candidacy, created only if absent (a ``create_revision == 0``
  transaction) and attached to the same lease. The candidate with the lowest create revision
  is the publisher: that is etcd's own election recipe (``concurrency.Election``), written with
  per-node keys so that RBAC can keep every node to its own keys. A key created later always
  has a higher create revision, so once a candidacy is the oldest it stays the oldest until it
  is deleted: leadership moves only when the publisher's lease ends (expiry, revoke on
  SIGTERM) or it resigns (no longer eligible), and then at once to the next oldest candidate,
  which learns it from its watch. ``node.priority`` does not order this election: the first
  eligible node to campaign publishes (docs/etcd.md says why).

Lease timing (:class:`LeaseTimings`). etcd expires a lease ``TTL`` after the last keep-alive
it received; we cannot see the server's clock, but a keep-alive the server answered was
received after we *sent* it, so the lease is alive at least until ``sent + TTL`` on our clock.
We count it valid only until ``sent + TTL - margin``: a publisher cut off from etcd steps down
``margin`` before any standby can see its candidacy vanish, and every upload is fenced anyway
by a transaction on the candidacy's create revision (:meth:`EtcdBackend.may_publish`).
Keep-alives go out every ``TTL / 3``, so two lost in a row do not end the lease.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from rustbalance.cluster.etcd_client import KeyValue, WatchBatch
from rustbalance.cluster.messages import (
    MAX_INTRO_POINT_BYTES,
    MAX_INTRO_POINTS,
    CoordinationError,
    check_node_id,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "EtcdDecision",
    "EtcdKeys",
    "EtcdMembership",
    "LeaseTimings",
    "NodeRecord",
    "decode_record",
    "encode_record",
]

PointT = TypeVar("PointT")

RECORD_VERSION = 1
# 64 intro points of at most 8 KiB each, base64: far below etcd's 1.5 MiB request limit.
MAX_RECORD_BYTES = 1024 + MAX_INTRO_POINTS * (MAX_INTRO_POINT_BYTES * 4 // 3 + 8)
_MAX_U32 = 2**32 - 1
_MAX_UNIX_TIME = 2**63 - 1


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdKeys:
    """The key layout under ``prefix`` (which ends with ``/``)."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise CoordinationError(f"etcd prefix {self.prefix!r} must start and end with '/'")

    @property
    def prefix_bytes(self) -> bytes:
        return self.prefix.encode()

    def node(self, node_id: str) -> bytes:
        return f"{self.prefix}nodes/{node_id}".encode()

    def election(self, node_id: str) -> bytes:
        return f"{self.prefix}election/{node_id}".encode()

    def parse(self, key: bytes) -> tuple[Literal["node", "election"], str] | None:
        """``("node", id)`` or ``("election", id)``; None for any other key."""
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        if not text.startswith(self.prefix):
            return None
        rest = text[len(self.prefix) :]
        for kind, head in (("node", "nodes/"), ("election", "election/")):
            if rest.startswith(head):
                node_id = rest[len(head) :]
                try:
                    check_node_id(node_id)
                except CoordinationError:
                    return None
                return ("node" if kind == "node" else "election"), node_id
        return None


# -- member records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRecord(Generic[PointT]):
    node_id: str
    priority: int
    eligible: bool
    last_publish: int | None
    intro_points: tuple[PointT, ...]
    invalid_points: int = 0


def encode_record(
    node_id: str,
    priority: int,
    eligible: bool,
    last_publish: int | None,
    intro_points: Sequence[bytes],
) -> bytes:
    """The value of ``P nodes/<id>``: canonical JSON (sorted keys), so equal states are equal
    bytes and the shell writes only when something changed."""
    if len(intro_points) > MAX_INTRO_POINTS:
        raise CoordinationError(f"{len(intro_points)} intro points, at most {MAX_INTRO_POINTS}")
    document = {
        "version": RECORD_VERSION,
        "node_id": check_node_id(node_id),
        "priority": priority,
        "eligible": eligible,
        "last_publish": last_publish,
        "intro_points": [base64.b64encode(p).decode("ascii") for p in intro_points],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _int_field(document: Mapping[str, object], name: str, upper: int) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise CoordinationError(f"record field {name!r} must be an integer 0..{upper}")
    return value


def decode_record(
    node_id: str, value: bytes, decode_point: Callable[[bytes], PointT]
) -> NodeRecord[PointT]:
    """Parse and check a member record found under ``P nodes/<node_id>``.

    Raises :class:`CoordinationError` for anything malformed (never another exception type).
    An intro point that does not decode is dropped and counted, not fatal: the others of the
    node are still worth merging.
    """
    if len(value) > MAX_RECORD_BYTES:
        raise CoordinationError(f"record of {len(value)} bytes, at most {MAX_RECORD_BYTES}")
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CoordinationError(f"record is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CoordinationError("record is not a JSON object")
    if document.get("version") != RECORD_VERSION:
        raise CoordinationError(f"record version {document.get('version')!r} is not supported")
    if document.get("node_id") != node_id:
        raise CoordinationError(f"record names node {document.get('node_id')!r}, key {node_id!r}")
    priority = _int_field(document, "priority", _MAX_U32)
    eligible = document.get("eligible")
    if not isinstance(eligible, bool):
        raise CoordinationError("record field 'eligible' must be a boolean")
    last_publish: int | None = None
    if document.get("last_publish") is not None:
        last_publish = _int_field(document, "last_publish", _MAX_UNIX_TIME)
    raw_points = document.get("intro_points")
    if not isinstance(raw_points, list) or len(raw_points) > MAX_INTRO_POINTS:
        raise CoordinationError(
            f"record field 'intro_points' must be a list of <= {MAX_INTRO_POINTS}"
        )
    points: list[PointT] = []
    invalid = 0
    for item in raw_points:
        try:
            if not isinstance(item, str):
                raise CoordinationError("not a string")
            raw = base64.b64decode(item, validate=True)
            if len(raw) > MAX_INTRO_POINT_BYTES:
                raise CoordinationError("too long")
            points.append(decode_point(raw))
        except (CoordinationError, binascii.Error, ValueError):
            invalid += 1
        except Exception:  # the injected decoder's own error type (DescriptorError, ...)
            invalid += 1
    return NodeRecord(node_id, priority, eligible, last_publish, tuple(points), invalid)


# -- lease timing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseTimings:
    """Derived from the lease TTL (seconds, an integer as etcd takes it)."""

    ttl: int

    def __post_init__(self) -> None:
        if not 2 <= self.ttl <= 3600:
            raise CoordinationError(f"lease TTL {self.ttl} s must be 2..3600")

    @property
    def keepalive_interval(self) -> float:
        return self.ttl / 3

    @property
    def margin(self) -> float:
        """How long before the earliest possible server-side expiry we stop trusting it."""
        return max(1.0, self.ttl / 4)

    @property
    def rpc_timeout(self) -> float:
        """Deadline of one etcd call: short enough for a retry on another member within a
        keep-alive interval, long enough for a loaded machine."""
        return max(0.5, min(2.0, self.ttl / 4))

    def valid_until(self, sent_at: float, granted_ttl: int) -> float:
        return sent_at + min(granted_ttl, self.ttl) - self.margin


# -- the membership view and the election ------------------------------------------------------


@dataclass(frozen=True)
class EtcdDecision:
    """What holds at ``now`` and what the shell should write next (at most one step each)."""

    lease_valid: bool
    holds_lease: bool  # we are the publisher (our candidacy is the oldest, lease valid)
    publisher: str | None  # the oldest candidacy in our view, if any
    register: bool  # write our member record (missing, changed, or on a new lease)
    campaign: bool  # create our candidacy
    clear_stale: bool  # our candidacy exists on a lease we no longer hold: delete it
    resign: bool  # we are no longer eligible: delete our candidacy


@dataclass
class _Candidate:
    create_revision: int
    lease: int


@dataclass
class EtcdMembership(Generic[PointT]):
    """Our view of the prefix plus our own lease, candidacy and record; see the module doc."""

    keys: EtcdKeys
    node_id: str
    timings: LeaseTimings
    decode_point: Callable[[bytes], PointT]
    revision: int = 0  # store revision our view is at (0 = never listed)
    nodes: dict[str, NodeRecord[PointT]] = field(default_factory=dict)
    candidates: dict[str, _Candidate] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    lease_id: int | None = None
    lease_deadline: float = -math.inf
    campaign_revision: int | None = None
    desired_record: bytes | None = None
    written_record: bytes | None = None
    written_revision: int = 0

    # -- the view ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self.revision > 0

    def reset(self, revision: int, kvs: Iterable[KeyValue]) -> None:
        """A full listing of the prefix at ``revision`` replaces the view."""
        self.nodes.clear()
        self.candidates.clear()
        self.revision = revision
        for kv in kvs:
            self._put(kv)
        self._check_own_candidacy()

    def apply(self, batch: WatchBatch) -> bool:
        """Apply one watch batch; True if the view changed. Events at or below the view's
        revision (seen already, e.g. replayed after a re-watch) are skipped; the batch's own
        header revision is not used (see below)."""
        changed = False
        # One revision's events (a lease's keys deleting together) come in one batch, all with
        # that revision: compare with the view's revision before this batch.
        seen = self.revision
        for event in batch.events:
            if event.kv.mod_revision <= seen:
                continue
            if event.kind == "put":
                changed |= self._put(event.kv)
            else:
                changed |= self._delete(event.kv.key)
            self.revision = event.kv.mod_revision
        # Only events move the view's revision: a watch's "created" or progress answer
        # carries the store's *current* revision, and the events between our listing and it
        # are still on their way (taking that revision would skip them).
        self._check_own_candidacy()
        return changed

    def _put(self, kv: KeyValue) -> bool:
        parsed = self.keys.parse(kv.key)
        if parsed is None:
            self.rejected["unknown_key"] += 1
            return False
        kind, node_id = parsed
        if kind == "election":
            self.candidates[node_id] = _Candidate(kv.create_revision, kv.lease)
            return True
        try:
            record = decode_record(node_id, kv.value, self.decode_point)
        except CoordinationError:
            self.rejected["bad_record"] += 1
            return self.nodes.pop(node_id, None) is not None
        if record.invalid_points:
            self.rejected["invalid_intro_point"] += record.invalid_points
        previous = self.nodes.get(node_id)
        self.nodes[node_id] = record
        return previous != record

    def _delete(self, key: bytes) -> bool:
        parsed = self.keys.parse(key)
        if parsed is None:
            return False
        kind, node_id = parsed
        if kind == "election":
            return self.candidates.pop(node_id, None) is not None
        return self.nodes.pop(node_id, None) is not None

    def _check_own_candidacy(self) -> None:
        """Forget our campaign once the view shows our candidacy gone (or replaced); adopt a
        candidacy on our current lease that we did not hear the answer for (a create txn
        whose reply was lost, then retried and refused because the key existed)."""
        own = self.candidates.get(self.node_id)
        if self.campaign_revision is None:
            if own is not None and self.lease_id is not None and own.lease == self.lease_id:
                self.campaign_revision = own.create_revision
            return
        if self.revision < self.campaign_revision:
            return
        if own is None or own.create_revision != self.campaign_revision:
            self.campaign_revision = None

    # -- our lease, candidacy and record ---------------------------------------------------

    def lease_granted(self, lease_id: int, granted_ttl: int, sent_at: float) -> None:
        self.lease_id = lease_id
        self.lease_deadline = self.timings.valid_until(sent_at, granted_ttl)
        self.campaign_revision = None
        self.written_record = None

    def lease_renewed(self, granted_ttl: int, sent_at: float) -> None:
        if self.lease_id is not None:
            self.lease_deadline = max(
                self.lease_deadline, self.timings.valid_until(sent_at, granted_ttl)
            )

    def lease_lost(self) -> None:
        """etcd says the lease is gone (expired, revoked): everything on it is gone too."""
        self.lease_id = None
        self.lease_deadline = -math.inf
        self.campaign_revision = None
        self.written_record = None

    def record_written(self, value: bytes, revision: int) -> None:
        self.written_record = value
        self.written_revision = revision

    def campaigned(self, create_revision: int | None) -> None:
        """Our create-if-absent txn ran: the candidacy's create revision, or None if a
        candidacy of ours already existed (on an older lease: :attr:`EtcdDecision.clear_stale`
        removes it once the view shows it)."""
        if create_revision is None:
            self._check_own_candidacy()
            return
        self.campaign_revision = create_revision
        if self.lease_id is not None:
            self.candidates[self.node_id] = _Candidate(create_revision, self.lease_id)

    def resigned(self) -> None:
        self.campaign_revision = None
        self.candidates.pop(self.node_id, None)

    def stale_cleared(self) -> None:
        self.candidates.pop(self.node_id, None)

    # -- decisions -------------------------------------------------------------------------

    def publisher(self) -> str | None:
        if not self.candidates:
            return None
        return min(self.candidates.items(), key=lambda item: item[1].create_revision)[0]

    def lease_valid(self, now: float) -> bool:
        return self.lease_id is not None and now < self.lease_deadline

    def decide(self, now: float, eligible: bool) -> EtcdDecision:
        valid = self.lease_valid(now)
        publisher = self.publisher()
        own = self.candidates.get(self.node_id)
        stale = own is not None and own.lease != self.lease_id
        holds = (
            eligible
            and valid
            and self.campaign_revision is not None
            and own is not None
            and own.create_revision == self.campaign_revision
            # Every candidacy older than ours is in the view only once the view has caught up
            # with our own creation (etcd's recipe waits for the same).
            and self.revision >= self.campaign_revision
            and publisher == self.node_id
        )
        record_missing = (
            self.synced and self.node_id not in self.nodes and self.revision > self.written_revision
        )
        register = (
            valid
            and self.desired_record is not None
            and (self.written_record != self.desired_record or record_missing)
        )
        return EtcdDecision(
            lease_valid=valid,
            holds_lease=holds,
            publisher=publisher,
            register=register,
            campaign=eligible and valid and self.synced and own is None,
            clear_stale=valid and self.synced and stale,
            resign=valid and not eligible and own is not None and not stale,
        )

    def live_peers(self) -> dict[str, NodeRecord[PointT]]:
        return {node_id: r for node_id, r in self.nodes.items() if node_id != self.node_id}
