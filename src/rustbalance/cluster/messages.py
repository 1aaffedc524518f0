"""The versioned, authenticated coordination message codec (pure: no sockets, no clock reads).

Fixes W4 and W17 of the original: every datagram is sealed with an AEAD keyed from the cluster
token, carries a per-sender sequence number (replays are rejected, also within the clock-skew
window), and is bounded by a configurable datagram size (64 KB by default instead of a 4 KB
receive buffer that silently truncated heartbeats with many peers).

Wire format (all integers big-endian)::

    datagram  = version(1) ‖ id_len(1) ‖ sender_id ‖ nonce(12) ‖ AEAD(body) ‖ tag(16)
    AAD       = version(1) ‖ id_len(1) ‖ sender_id        (sender and version are authenticated)
    body      = seq(u64) ‖ timestamp_ms(u64) ‖ type(u8) ‖ payload

Payloads are a compact binary encoding; every count and length is bounded, trailing bytes are
an error. The heartbeat (strings are len(u8) ‖ UTF-8, flags are 0 or 1)::

    heartbeat = role(u8) ‖ priority(u32) ‖ term(u64) ‖ intro_digest(32)
                ‖ flag ‖ [last_publish(u64)] ‖ eligible(flag) ‖ count(u16) ‖ count × (id ‖ address)
                ‖ flag ‖ [believed publisher]                                   (version 2)
    believed publisher = id ‖ priority(u32) ‖ term(u64) ‖ seq(u64) ‖ age_ms(u32) ‖ hops(u8 ≤ 16)

Version 2 (this one) added the heartbeat's *believed publisher* (:class:`PublisherReport`, see
:mod:`rustbalance.cluster.election`), which ends the heartbeat payload. Version 1 decoders reject
any trailing bytes, so the field could not be added compatibly: the version byte went to 2, and
with it the HKDF info, so the two versions never share a key. A version 1 datagram is rejected as
``unknown_version`` (counted, never acted on); every node of a cluster must run the same version.

The AEAD is ChaCha20-Poly1305 with a key derived by HKDF-SHA256 from the token; the
HKDF info names the protocol and its version, so a future version never shares a key.

Everything that parses untrusted bytes raises only :class:`CoordinationError` (with a typed
:class:`RejectReason`); the :class:`Receiver` turns that into a returned reason and never raises.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.rules import is_node_id, parse_endpoint

__all__ = [
    "DEFAULT_CLOCK_SKEW_SECS",
    "DEFAULT_MAX_DATAGRAM_BYTES",
    "MAX_INTRO_POINTS",
    "MAX_INTRO_POINT_BYTES",
    "MAX_KNOWN_PEERS",
    "MAX_REPORT_HOPS",
    "PROTOCOL_VERSION",
    "ClusterKey",
    "CoordinationError",
    "Envelope",
    "Heartbeat",
    "IntroPoints",
    "LeaseClaim",
    "LeaseRelease",
    "MessageType",
    "Payload",
    "PeerAnnounce",
    "PublisherReport",
    "Receiver",
    "RejectReason",
    "Role",
    "Sender",
    "check_node_id",
    "check_peer_address",
    "decode_body",
    "encode_body",
    "intro_points_digest",
    "open_datagram",
]

PROTOCOL_VERSION = 2
DEFAULT_CLOCK_SKEW_SECS = 5.0
DEFAULT_MAX_DATAGRAM_BYTES = 65000
# Tor puts at most 20 intro points in a descriptor; a node offers at most that many. The bound
# is generous so a future tor limit does not need a protocol change, yet keeps parsing bounded.
MAX_INTRO_POINTS = 64
MAX_INTRO_POINT_BYTES = 8192
# Bounds the gossip list (W17: unbounded lists overflowed the datagram).
MAX_KNOWN_PEERS = 256
# A believed-publisher report is relayed through at most this many nodes: every relay may make the
# report look fresher by one datagram's transit time (transit is not measured), so the hop limit
# bounds that error even around cycles. 16 is far beyond any real cluster's diameter.
MAX_REPORT_HOPS = 16
MAX_ADDRESS_CHARS = 255
MAX_U8 = 0xFF
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF

_NONCE_LEN = 12
_TAG_LEN = 16
_KEY_LEN = 32
_DIGEST_LEN = 32
_MIN_TOKEN_BYTES = 16
_HKDF_INFO = b"rustbalance cluster coordination v%d" % PROTOCOL_VERSION
_BODY_HEADER = struct.Struct(">QQB")
# PublisherReport after its node id: priority u32, term u64, seq u64, age_ms u32 (then hops u8).
_REPORT = struct.Struct(">IQQI")


class CoordinationError(RustBalanceError):
    """A coordination message is malformed, forged, replayed or cannot be built within limits."""

    def __init__(self, message: str, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else RejectReason.MALFORMED


class RejectReason(StrEnum):
    """Why a datagram was dropped; the values are metric label values."""

    FORGED = "forged"
    REPLAYED = "replayed"
    STALE = "stale"
    FUTURE = "future"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"
    LOOPBACK = "loopback"


class MessageType(IntEnum):
    HEARTBEAT = 1
    INTRO_POINTS = 2
    LEASE_CLAIM = 3
    LEASE_RELEASE = 4
    PEER_ANNOUNCE = 5


class Role(StrEnum):
    PUBLISHER = "publisher"
    STANDBY = "standby"


_ROLE_CODES: dict[Role, int] = {Role.STANDBY: 0, Role.PUBLISHER: 1}
_ROLES_BY_CODE = {code: role for role, code in _ROLE_CODES.items()}


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it follows the node-id rule of :mod:`rustbalance.rules`."""
    if not is_node_id(node_id):
        raise CoordinationError(f"invalid node id {node_id!r}")
    return node_id


def check_peer_address(address: str) -> str:
    """Validate ``host:port`` / ``[v6]:port`` and return its canonical form."""
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_CHARS:
        raise CoordinationError("invalid peer address")
    try:
        return str(parse_endpoint(address))
    except ConfigError as exc:
        raise CoordinationError(f"invalid peer address: {exc}") from None


def _check_uint(value: int, limit: int, name: str) -> None:
    # bool is an int subclass; a True priority is a programming error, not a value.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise CoordinationError(f"{name} out of range")


# ---------------------------------------------------------------------------------------------
# Payloads


@dataclass(frozen=True)
class PublisherReport:
    """The publisher a heartbeat's sender believes in, and how fresh that belief is.

    ``seq`` is the publisher's own sequence number (of the message that was its latest sign of
    life): it orders reports of one publisher, so an old report echoed back through a cycle never
    counts as news. ``age_ms`` is how long before this heartbeat that sign of life reached the
    sender (measured on the sender's own clock and summed over the relays, so it never restarts
    at a hop). ``hops`` counts the nodes that relayed it before the sender (0: the sender heard
    the publisher itself, or is the publisher: then ``seq`` is 0 and receivers ignore the report,
    the heartbeat's role already says it).
    """

    node_id: str
    priority: int
    term: int
    seq: int
    age_ms: int
    hops: int

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        _check_uint(self.priority, MAX_U32, "publisher priority")
        _check_uint(self.term, MAX_U64, "publisher term")
        _check_uint(self.seq, MAX_U64, "publisher sequence number")
        _check_uint(self.age_ms, MAX_U32, "publisher report age")
        _check_uint(self.hops, MAX_U8, "publisher report hops")
        if self.hops > MAX_REPORT_HOPS:
            raise CoordinationError(
                f"publisher report relayed through {self.hops} nodes (at most {MAX_REPORT_HOPS})"
            )


@dataclass(frozen=True)
class Heartbeat:
    role: Role
    priority: int
    term: int
    intro_digest: bytes
    last_publish: int | None  # unix seconds of the last successful publish, None if never
    publisher_eligible: bool
    known_peers: tuple[tuple[str, str], ...] = ()  # (node_id, "host:port")
    # Who the sender believes publishes (None: it knows of no live publisher). Protocol v2.
    believed_publisher: PublisherReport | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise CoordinationError("invalid role")
        _check_uint(self.priority, MAX_U32, "priority")
        _check_uint(self.term, MAX_U64, "term")
        if not isinstance(self.intro_digest, bytes) or len(self.intro_digest) != _DIGEST_LEN:
            raise CoordinationError("intro point digest must be 32 bytes")
        if self.last_publish is not None:
            _check_uint(self.last_publish, MAX_U64, "last publish time")
        if not isinstance(self.publisher_eligible, bool):
            raise CoordinationError("publisher_eligible must be a bool")
        if len(self.known_peers) > MAX_KNOWN_PEERS:
            raise CoordinationError(f"more than {MAX_KNOWN_PEERS} known peers")
        for node_id, address in self.known_peers:
            check_node_id(node_id)
            if check_peer_address(address) != address:
                raise CoordinationError("peer address is not in canonical form")
        if self.believed_publisher is not None and not isinstance(
            self.believed_publisher, PublisherReport
        ):
            raise CoordinationError("believed publisher must be a PublisherReport")


@dataclass(frozen=True)
class IntroPoints:
    """The sender's full current set of intro points, each opaque (descriptor layer encoding)."""

    intro_points: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.intro_points) > MAX_INTRO_POINTS:
            raise CoordinationError(f"more than {MAX_INTRO_POINTS} intro points")
        for point in self.intro_points:
            if not isinstance(point, bytes) or not 0 < len(point) <= MAX_INTRO_POINT_BYTES:
                raise CoordinationError("intro point must be 1-8192 bytes")


@dataclass(frozen=True)
class LeaseClaim:
    term: int
    priority: int

    def __post_init__(self) -> None:
        _check_uint(self.term, MAX_U64, "term")
        _check_uint(self.priority, MAX_U32, "priority")


@dataclass(frozen=True)
class LeaseRelease:
    term: int

    def __post_init__(self) -> None:
        _check_uint(self.term, MAX_U64, "term")


@dataclass(frozen=True)
class PeerAnnounce:
    node_id: str
    address: str

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if check_peer_address(self.address) != self.address:
            raise CoordinationError("peer address is not in canonical form")


Payload = Heartbeat | IntroPoints | LeaseClaim | LeaseRelease | PeerAnnounce

_TYPE_OF: dict[type[Payload], MessageType] = {
    Heartbeat: MessageType.HEARTBEAT,
    IntroPoints: MessageType.INTRO_POINTS,
    LeaseClaim: MessageType.LEASE_CLAIM,
    LeaseRelease: MessageType.LEASE_RELEASE,
    PeerAnnounce: MessageType.PEER_ANNOUNCE,
}


@dataclass(frozen=True)
class Envelope:
    """An authenticated, fresh, non-replayed message as returned by :class:`Receiver`."""

    sender: str
    seq: int
    timestamp_ms: int
    payload: Payload
    version: int = PROTOCOL_VERSION

    @property
    def type(self) -> MessageType:
        return _TYPE_OF[type(self.payload)]


def intro_points_digest(intro_points: Sequence[bytes]) -> bytes:
    """SHA-256 over the *set* of intro points: equal content gives an equal digest in any order."""
    h = hashlib.sha256(b"rustbalance intro points v1")
    for point in sorted(set(intro_points)):
        h.update(struct.pack(">I", len(point)))
        h.update(point)
    return h.digest()


# ---------------------------------------------------------------------------------------------
# Body encoding


def _put_str(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise CoordinationError("string longer than 255 bytes")
    out.append(len(raw))
    out += raw


def _encode_payload(payload: Payload) -> bytes:
    out = bytearray()
    if isinstance(payload, Heartbeat):
        out.append(_ROLE_CODES[payload.role])
        out += struct.pack(">IQ", payload.priority, payload.term)
        out += payload.intro_digest
        if payload.last_publish is None:
            out.append(0)
        else:
            out.append(1)
            out += struct.pack(">Q", payload.last_publish)
        out.append(1 if payload.publisher_eligible else 0)
        out += struct.pack(">H", len(payload.known_peers))
        for node_id, address in payload.known_peers:
            _put_str(out, node_id)
            _put_str(out, address)
        report = payload.believed_publisher
        if report is None:
            out.append(0)
        else:
            out.append(1)
            _put_str(out, report.node_id)
            out += _REPORT.pack(report.priority, report.term, report.seq, report.age_ms)
            out.append(report.hops)
    elif isinstance(payload, IntroPoints):
        out += struct.pack(">H", len(payload.intro_points))
        for point in payload.intro_points:
            out += struct.pack(">H", len(point))
            out += point
    elif isinstance(payload, LeaseClaim):
        out += struct.pack(">QI", payload.term, payload.priority)
    elif isinstance(payload, LeaseRelease):
        out += struct.pack(">Q", payload.term)
    else:
        _put_str(out, payload.node_id)
        _put_str(out, payload.address)
    return bytes(out)


class _Reader:
    """Bounds-checked cursor: every short read is a MALFORMED CoordinationError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise CoordinationError("truncated message")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def text(self) -> str:
        raw = self.take(self.u8())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CoordinationError("string is not UTF-8") from None

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise CoordinationError("boolean flag must be 0 or 1")
        return value == 1

    def end(self) -> None:
        if self._pos != len(self._data):
            raise CoordinationError("trailing bytes after message")


def _decode_payload(kind: MessageType, r: _Reader) -> Payload:
    payload: Payload
    if kind is MessageType.HEARTBEAT:
        role = _ROLES_BY_CODE.get(r.u8())
        if role is None:
            raise CoordinationError("unknown role")
        priority, term = r.unpack(">IQ")
        digest = r.take(_DIGEST_LEN)
        last_publish = r.unpack(">Q")[0] if r.flag() else None
        eligible = r.flag()
        (count,) = r.unpack(">H")
        if count > MAX_KNOWN_PEERS:
            raise CoordinationError("too many known peers")
        peers = tuple((r.text(), r.text()) for _ in range(count))
        report = None
        if r.flag():
            report_id = r.text()
            report_priority, report_term, report_seq, age_ms = r.unpack(_REPORT.format)
            report = PublisherReport(
                report_id, report_priority, report_term, report_seq, age_ms, r.u8()
            )
        payload = Heartbeat(role, priority, term, digest, last_publish, eligible, peers, report)
    elif kind is MessageType.INTRO_POINTS:
        (count,) = r.unpack(">H")
        if count > MAX_INTRO_POINTS:
            raise CoordinationError("too many intro points")
        payload = IntroPoints(tuple(r.take(r.unpack(">H")[0]) for _ in range(count)))
    elif kind is MessageType.LEASE_CLAIM:
        term, priority = r.unpack(">QI")
        payload = LeaseClaim(term, priority)
    elif kind is MessageType.LEASE_RELEASE:
        payload = LeaseRelease(r.unpack(">Q")[0])
    else:
        payload = PeerAnnounce(r.text(), r.text())
    r.end()
    return payload


def encode_body(seq: int, timestamp_ms: int, payload: Payload) -> bytes:
    """The plaintext body: seq, timestamp, type, payload."""
    _check_uint(seq, MAX_U64, "sequence number")
    _check_uint(timestamp_ms, MAX_U64, "timestamp")
    return _BODY_HEADER.pack(seq, timestamp_ms, _TYPE_OF[type(payload)]) + _encode_payload(payload)


def decode_body(body: bytes) -> tuple[int, int, Payload]:
    """Parse a plaintext body into ``(seq, timestamp_ms, payload)``; raises CoordinationError."""
    r = _Reader(body)
    seq, timestamp_ms, type_code = r.unpack(_BODY_HEADER.format)
    try:
        kind = MessageType(type_code)
    except ValueError:
        raise CoordinationError(
            f"unknown message type {type_code}", RejectReason.UNKNOWN_TYPE
        ) from None
    return seq, timestamp_ms, _decode_payload(kind, r)


# ---------------------------------------------------------------------------------------------
# Keys and sealing


class ClusterKey:
    """The AEAD key derived from the cluster token; never shown in reprs or logs."""

    __slots__ = ("_aead",)

    def __init__(self, token: bytes) -> None:
        # Token files usually end in a newline; the key must not depend on how it was saved.
        secret = token.strip()
        if len(secret) < _MIN_TOKEN_BYTES:
            raise CoordinationError(f"cluster token must be at least {_MIN_TOKEN_BYTES} bytes")
        hkdf = HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=None, info=_HKDF_INFO)
        self._aead = ChaCha20Poly1305(hkdf.derive(secret))

    def __repr__(self) -> str:
        return "ClusterKey(<redacted>)"

    def seal(self, sender: str, body: bytes, nonce: bytes) -> bytes:
        """Build a datagram from a plaintext body (version and sender go into the AAD)."""
        if len(nonce) != _NONCE_LEN:
            raise CoordinationError("nonce must be 12 bytes")
        header = _header(PROTOCOL_VERSION, check_node_id(sender))
        return header + nonce + self._aead.encrypt(nonce, body, header)

    def open(self, header: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, header)
        except InvalidTag:
            raise CoordinationError("authentication failed", RejectReason.FORGED) from None


def _header(version: int, sender: str) -> bytes:
    raw = sender.encode("ascii")
    return bytes([version, len(raw)]) + raw


def open_datagram(
    datagram: bytes, key: ClusterKey, max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES
) -> Envelope:
    """Authenticate and decode one datagram (no freshness or replay checks: see Receiver)."""
    if len(datagram) > max_datagram_bytes:
        raise CoordinationError("datagram too large", RejectReason.OVERSIZED)
    if len(datagram) < 2:
        raise CoordinationError("datagram too short")
    version, id_len = datagram[0], datagram[1]
    if version != PROTOCOL_VERSION:
        raise CoordinationError(f"unknown version {version}", RejectReason.UNKNOWN_VERSION)
    id_end = 2 + id_len
    if len(datagram) < id_end + _NONCE_LEN + _TAG_LEN:
        raise CoordinationError("datagram too short")
    try:
        sender = check_node_id(datagram[2:id_end].decode("ascii"))
    except UnicodeDecodeError:
        raise CoordinationError("sender id is not ASCII") from None
    nonce = datagram[id_end : id_end + _NONCE_LEN]
    body = key.open(datagram[:id_end], nonce, datagram[id_end + _NONCE_LEN :])
    seq, timestamp_ms, payload = decode_body(body)
    return Envelope(sender, seq, timestamp_ms, payload, version)


class Sender:
    """Seals outgoing messages for one node.

    The sequence number starts at the boot time in unix ms and is ``max(last + 1, now_ms)``
    afterwards, so it keeps increasing across restarts (receivers remember the last value per
    sender) as long as the clock does not jump back; it cannot run ahead of the clock unless a
    node sends more than 1000 messages a second.
    """

    def __init__(
        self,
        node_id: str,
        key: ClusterKey,
        *,
        boot_time: float,
        randbytes: Callable[[int], bytes],
        max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
    ) -> None:
        self.node_id = check_node_id(node_id)
        self._key = key
        self._randbytes = randbytes
        self._max = max_datagram_bytes
        self._seq = int(boot_time * 1000) - 1

    def __repr__(self) -> str:
        return f"Sender(node_id={self.node_id!r}, seq={self._seq})"

    def seal(self, payload: Payload, now: float) -> bytes:
        """Return the datagram for ``payload``; raises CoordinationError if it exceeds the limit."""
        now_ms = int(now * 1000)
        seq = max(self._seq + 1, now_ms)
        datagram = self._key.seal(
            self.node_id, encode_body(seq, now_ms, payload), self._randbytes(_NONCE_LEN)
        )
        if len(datagram) > self._max:
            raise CoordinationError(
                f"message of {len(datagram)} bytes exceeds {self._max}", RejectReason.OVERSIZED
            )
        self._seq = seq
        return datagram


@dataclass
class _SenderRecord:
    # The most recently accepted sequence numbers, ascending, at most ``window`` of them.
    seqs: list[int]
    accepted_at: float


class Receiver:
    """Validates incoming datagrams; pure (the caller passes ``now``), never raises on input.

    ``receive`` returns the :class:`Envelope` or the :class:`RejectReason`; only an accepted
    message changes state (the sender's replay window).

    Replays: each sender's last ``replay_window`` accepted sequence numbers are remembered; a
    number already seen, or older than the whole (full) window, is REPLAYED. A strict
    "greater than the last one" rule would also drop datagrams that UDP merely reordered (a
    heartbeat and the intro points sent right after it); the window accepts those exactly once.

    Replay state is bounded: a sender's record is forgotten once it has been silent for twice
    the skew tolerance, because any replay of its messages is then rejected as stale anyway
    (accepted timestamps are at most ``skew`` ahead of the time of acceptance). When more than
    ``max_senders`` are active the least recently heard one is evicted.
    """

    def __init__(
        self,
        own_id: str,
        key: ClusterKey,
        *,
        clock_skew_tolerance: float = DEFAULT_CLOCK_SKEW_SECS,
        max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
        max_senders: int = 1024,
        replay_window: int = 64,
    ) -> None:
        self.own_id = check_node_id(own_id)
        self._key = key
        self._skew_ms = int(clock_skew_tolerance * 1000)
        self._forget_after = 2 * clock_skew_tolerance + 1.0
        self._max_bytes = max_datagram_bytes
        self._max_senders = max_senders
        self._window = replay_window
        self._senders: OrderedDict[str, _SenderRecord] = OrderedDict()

    def __repr__(self) -> str:
        return f"Receiver(own_id={self.own_id!r}, senders={len(self._senders)})"

    def last_seq(self, sender: str) -> int | None:
        """The highest sequence number accepted from ``sender`` that is still remembered."""
        record = self._senders.get(sender)
        return record.seqs[-1] if record is not None else None

    def receive(self, datagram: bytes, now: float) -> Envelope | RejectReason:
        try:
            envelope = open_datagram(datagram, self._key, self._max_bytes)
        except CoordinationError as exc:
            return exc.reason
        if envelope.sender == self.own_id:
            return RejectReason.LOOPBACK
        now_ms = int(now * 1000)
        if envelope.timestamp_ms < now_ms - self._skew_ms:
            return RejectReason.STALE
        if envelope.timestamp_ms > now_ms + self._skew_ms:
            return RejectReason.FUTURE
        record = self._senders.get(envelope.sender)
        if record is not None and now - record.accepted_at > self._forget_after:
            record = None  # forgotten: anything it could replay is stale by now
        if record is not None and (
            envelope.seq in record.seqs
            or (len(record.seqs) >= self._window and envelope.seq < record.seqs[0])
        ):
            return RejectReason.REPLAYED
        self._accept(envelope.sender, record, envelope.seq, now)
        return envelope

    def _accept(self, sender: str, record: _SenderRecord | None, seq: int, now: float) -> None:
        seqs = record.seqs if record is not None else []
        bisect.insort(seqs, seq)
        del seqs[: max(0, len(seqs) - self._window)]
        self._senders.pop(sender, None)
        self._senders[sender] = _SenderRecord(seqs, now)
        # Oldest first (insertion order == order of last acceptance): prune the expired ones.
        while self._senders:
            oldest = next(iter(self._senders.values()))
            if now - oldest.accepted_at <= self._forget_after:
                break
            self._senders.popitem(last=False)
        while len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
