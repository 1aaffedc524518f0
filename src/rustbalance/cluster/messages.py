"""The versioned, authenticated coordination message codec (pure: no sockets, no clock reads).

Protocol v3 (issue 16): every node speaks with its own key, never with a shared one.

- A **sealed** datagram goes from one member to one member: its body is sealed with libsodium's
  ``crypto_box`` (X25519 + XSalsa20-Poly1305) between the sender's and the recipient's static
  keys (the X25519 forms of their Ed25519 node keys, :mod:`identity`). Only the two can compute
  that key, so the datagram is authenticated as the sender's and readable only by the
  recipient. The body names the recipient: a datagram reflected back to its sender, or
  re-addressed to a third node, is refused (``misdirected`` / ``forged``).
- A **hello** datagram carries the sender's admission record (signed with the master key,
  :mod:`authority`) and is signed with the sender's node key: it introduces a node to a member
  that does not know its key yet (a seed address, a restarted peer). It is not encrypted; it
  changes nothing but the membership (the record is master-signed anyway).
- A message can only speak for its sender. The one relayed fact, the believed publisher, is the
  publisher's own signed :class:`PublisherStatement`, relayed unchanged.

Wire format (all integers big-endian, strings ``len(u8) ‖ UTF-8``)::

    datagram  = version(1) ‖ kind(1) ‖ id_len(1) ‖ sender_id ‖ rest
    kind 1    = sealed: rest = nonce(24) ‖ crypto_box(body)          (16-byte MAC inside)
    kind 2    = hello:  rest = body ‖ Ed25519(node key, HELLO_DOMAIN ‖ header ‖ body)
    body      = seq(u64) ‖ timestamp_ms(u64) ‖ recipient_id (empty in a hello) ‖ type(u8)
                ‖ payload
    heartbeat = role(u8) ‖ term(u64) ‖ intro_digest(32) ‖ flag ‖ [last_publish(u64)]
                ‖ eligible(flag) ‖ members_digest(32) ‖ flag ‖ [report]
    report    = statement ‖ age_ms(u32) ‖ hops(u8 ≤ 16)
    statement = node_id ‖ term(u64) ‖ seq(u64) ‖ timestamp_ms(u64) ‖ signature(64)
                signed by the publisher: STATEMENT_DOMAIN ‖ node_id ‖ term ‖ seq ‖ timestamp_ms
    intro_points = count(u16) ‖ count × (len(u16) ‖ bytes)
    lease_claim  = statement (the claimer's, with the claim's term and the datagram's seq)
    lease_release = term(u64)
    members   = count(u16 ≤ 64) ‖ count × (len(u16) ‖ master-signed statement)
    hello     = len(u16) ‖ the sender's admission record

Version 3 shares nothing with version 2 (a token-sealed datagram): each rejects the other's
datagrams as ``unknown_version``, counted and never acted on, so mixed versions do not
interoperate (docs/security.md, "Upgrading from protocol v2").

Bounds: term and sequence numbers come from wall-clock milliseconds (a claim takes
``max(term + 1, now_ms)``, :mod:`election`), so a receiver refuses any term or sequence number
more than the clock-skew tolerance (plus :data:`MAX_SEQ_AHEAD_MS` for sequence numbers) ahead
of its own clock: no message can push a node's term towards the 64-bit limit.

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

from nacl.bindings import crypto_box_BOXZEROBYTES, crypto_box_ZEROBYTES
from nacl.exceptions import CryptoError
from nacl.public import Box

from rustbalance.cluster.authority import (
    MAX_STATEMENT_BYTES,
    AdmissionRecord,
    Statement,
    decode_statement,
)
from rustbalance.cluster.identity import (
    SIGNATURE_BYTES,
    NodeKey,
    box_public_key,
    verify_signature,
)
from rustbalance.cluster.wire import (
    MAX_U8,
    MAX_U32,
    MAX_U64,
    CoordinationError,
    Reader,
    RejectReason,
    Writer,
    check_node_id,
    check_peer_address,
    check_uint,
)
from rustbalance.errors import InvalidKeyError

__all__ = [
    "DEFAULT_CLOCK_SKEW_SECS",
    "DEFAULT_MAX_DATAGRAM_BYTES",
    "MAX_INTRO_POINTS",
    "MAX_INTRO_POINT_BYTES",
    "MAX_REPORT_HOPS",
    "MAX_SEQ_AHEAD_MS",
    "MAX_STATEMENTS_PER_MESSAGE",
    "MAX_U8",
    "MAX_U32",
    "MAX_U64",
    "PROTOCOL_VERSION",
    "CoordinationError",
    "Envelope",
    "Heartbeat",
    "Hello",
    "IntroPoints",
    "LeaseClaim",
    "LeaseRelease",
    "Members",
    "MessageType",
    "Payload",
    "PublisherReport",
    "PublisherStatement",
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

PROTOCOL_VERSION = 3
DEFAULT_CLOCK_SKEW_SECS = 5.0
DEFAULT_MAX_DATAGRAM_BYTES = 65000
# Tor puts at most 20 intro points in a descriptor; a node offers at most that many. The bound
# is generous so a future tor limit does not need a protocol change, yet keeps parsing bounded.
MAX_INTRO_POINTS = 64
MAX_INTRO_POINT_BYTES = 8192
# A believed-publisher report is relayed through at most this many nodes: every relay may make the
# report look fresher by one datagram's transit time (transit is not measured), so the hop limit
# bounds that error even around cycles. 16 is far beyond any real cluster's diameter.
MAX_REPORT_HOPS = 16
# A sender's sequence number is max(last + 1, now_ms): it runs ahead of its clock only when it
# sends more than 1000 messages a second. Ten minutes ahead is far beyond that, and bounded.
MAX_SEQ_AHEAD_MS = 600_000
MAX_STATEMENTS_PER_MESSAGE = 64

_KIND_SEALED = 1
_KIND_HELLO = 2
_NONCE_LEN = Box.NONCE_SIZE  # 24
# The Poly1305 tag crypto_box adds (libsodium crypto_box_MACBYTES = ZEROBYTES - BOXZEROBYTES).
_MAC_LEN = crypto_box_ZEROBYTES - crypto_box_BOXZEROBYTES  # 16
_DIGEST_LEN = 32
HELLO_DOMAIN = b"rustbalance hello v3\x00"
STATEMENT_DOMAIN = b"rustbalance publisher statement v3\x00"
_BODY_HEADER = struct.Struct(">QQ")
_STATEMENT_NUMBERS = struct.Struct(">QQQ")


class MessageType(IntEnum):
    HEARTBEAT = 1
    INTRO_POINTS = 2
    LEASE_CLAIM = 3
    LEASE_RELEASE = 4
    MEMBERS = 5
    HELLO = 6


class Role(StrEnum):
    PUBLISHER = "publisher"
    STANDBY = "standby"


_ROLE_CODES: dict[Role, int] = {Role.STANDBY: 0, Role.PUBLISHER: 1}
_ROLES_BY_CODE = {code: role for role, code in _ROLE_CODES.items()}


# ---------------------------------------------------------------------------------------------
# Payloads


@dataclass(frozen=True)
class PublisherStatement:
    """A publisher's signed sign of life: "I, ``node_id``, publish in ``term``", sent in its
    heartbeats and claims and relayed unchanged by others (the relays cannot forge it).

    ``seq`` is the sequence number of the datagram that first carried it, ``timestamp_ms`` its
    wall-clock time: receivers order statements by ``seq`` and bound their age by the
    timestamp, so a relay can never make a dead publisher look more than the clock-skew
    tolerance fresher than it is.
    """

    node_id: str
    term: int
    seq: int
    timestamp_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        check_uint(self.term, MAX_U64, "publisher term")
        check_uint(self.seq, MAX_U64, "publisher sequence number")
        check_uint(self.timestamp_ms, MAX_U64, "publisher timestamp")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise CoordinationError("publisher statement signature must be 64 bytes")

    @staticmethod
    def signed_message(node_id: str, term: int, seq: int, timestamp_ms: int) -> bytes:
        w = Writer().raw(STATEMENT_DOMAIN).text(node_id)
        return w.raw(_STATEMENT_NUMBERS.pack(term, seq, timestamp_ms)).bytes()

    @classmethod
    def sign(
        cls, key: NodeKey, node_id: str, term: int, seq: int, timestamp_ms: int
    ) -> PublisherStatement:
        message = cls.signed_message(node_id, term, seq, timestamp_ms)
        return cls(node_id, term, seq, timestamp_ms, key.sign(message))

    def verify(self, public: bytes) -> bool:
        message = self.signed_message(self.node_id, self.term, self.seq, self.timestamp_ms)
        return verify_signature(public, message, self.signature)

    def _encode(self, w: Writer) -> None:
        w.text(self.node_id).raw(_STATEMENT_NUMBERS.pack(self.term, self.seq, self.timestamp_ms))
        w.raw(self.signature)

    @classmethod
    def _decode(cls, r: Reader) -> PublisherStatement:
        node_id = r.text()
        term, seq, timestamp = r.unpack(_STATEMENT_NUMBERS.format)
        return cls(node_id, term, seq, timestamp, r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class PublisherReport:
    """The publisher a heartbeat's sender believes in: the publisher's own statement, how long
    before this heartbeat the sender got it (``age_ms``, summed over the relays) and how many
    nodes relayed it before the sender (``hops``; 0 = heard directly, or the sender itself)."""

    statement: PublisherStatement
    age_ms: int
    hops: int

    def __post_init__(self) -> None:
        if not isinstance(self.statement, PublisherStatement):
            raise CoordinationError("a report carries a PublisherStatement")
        check_uint(self.age_ms, MAX_U32, "publisher report age")
        check_uint(self.hops, MAX_U8, "publisher report hops")
        if self.hops > MAX_REPORT_HOPS:
            raise CoordinationError(
                f"publisher report relayed through {self.hops} nodes (at most {MAX_REPORT_HOPS})"
            )

    @property
    def node_id(self) -> str:
        return self.statement.node_id


@dataclass(frozen=True)
class Heartbeat:
    """What a node says about itself. Priority and eligibility to publish come from its
    admission record; ``publisher_eligible`` here can only *lower* it (tor down, say)."""

    role: Role
    term: int
    intro_digest: bytes
    last_publish: int | None  # unix seconds of the last successful publish, None if never
    publisher_eligible: bool
    members_digest: bytes  # Membership.digest(): a peer holding another one gets ours
    believed_publisher: PublisherReport | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise CoordinationError("invalid role")
        check_uint(self.term, MAX_U64, "term")
        for name in ("intro_digest", "members_digest"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != _DIGEST_LEN:
                raise CoordinationError(f"{name} must be 32 bytes")
        if self.last_publish is not None:
            check_uint(self.last_publish, MAX_U64, "last publish time")
        if not isinstance(self.publisher_eligible, bool):
            raise CoordinationError("publisher_eligible must be a bool")
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
    """ "I publish from now on": the claimer's statement (its term, this datagram's seq)."""

    statement: PublisherStatement

    def __post_init__(self) -> None:
        if not isinstance(self.statement, PublisherStatement):
            raise CoordinationError("a lease claim carries a PublisherStatement")

    @property
    def term(self) -> int:
        return self.statement.term


@dataclass(frozen=True)
class LeaseRelease:
    term: int

    def __post_init__(self) -> None:
        check_uint(self.term, MAX_U64, "term")


@dataclass(frozen=True)
class Members:
    """Master-signed statements (records, revocations, the join policy), verified on receipt."""

    statements: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.statements) > MAX_STATEMENTS_PER_MESSAGE:
            raise CoordinationError(f"more than {MAX_STATEMENTS_PER_MESSAGE} statements")
        for data in self.statements:
            if not isinstance(data, bytes) or not 0 < len(data) <= MAX_STATEMENT_BYTES:
                raise CoordinationError(f"a statement must be 1-{MAX_STATEMENT_BYTES} bytes")


@dataclass(frozen=True)
class Hello:
    """The sender's admission record (checked against the master key by the receiver)."""

    record: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.record, bytes) or not 0 < len(self.record) <= MAX_STATEMENT_BYTES:
            raise CoordinationError(f"a record must be 1-{MAX_STATEMENT_BYTES} bytes")


Payload = Heartbeat | IntroPoints | LeaseClaim | LeaseRelease | Members | Hello

_TYPE_OF: dict[type[Payload], MessageType] = {
    Heartbeat: MessageType.HEARTBEAT,
    IntroPoints: MessageType.INTRO_POINTS,
    LeaseClaim: MessageType.LEASE_CLAIM,
    LeaseRelease: MessageType.LEASE_RELEASE,
    Members: MessageType.MEMBERS,
    Hello: MessageType.HELLO,
}


@dataclass(frozen=True)
class Envelope:
    """An authenticated, fresh, non-replayed message as returned by :class:`Receiver`.

    ``record`` is set for a hello: the sender's admission record, verified against the master
    key, whose node key signed the hello (the membership decides whether it is still valid).
    """

    sender: str
    seq: int
    timestamp_ms: int
    payload: Payload
    version: int = PROTOCOL_VERSION
    record: Statement | None = None

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


def _encode_payload(payload: Payload) -> bytes:
    w = Writer()
    if isinstance(payload, Heartbeat):
        w.u8(_ROLE_CODES[payload.role]).pack(">Q", payload.term).raw(payload.intro_digest)
        w.flag(payload.last_publish is not None)
        if payload.last_publish is not None:
            w.pack(">Q", payload.last_publish)
        w.flag(payload.publisher_eligible).raw(payload.members_digest)
        report = payload.believed_publisher
        w.flag(report is not None)
        if report is not None:
            report.statement._encode(w)
            w.pack(">I", report.age_ms).u8(report.hops)
    elif isinstance(payload, IntroPoints):
        w.pack(">H", len(payload.intro_points))
        for point in payload.intro_points:
            w.pack(">H", len(point)).raw(point)
    elif isinstance(payload, LeaseClaim):
        payload.statement._encode(w)
    elif isinstance(payload, LeaseRelease):
        w.pack(">Q", payload.term)
    elif isinstance(payload, Members):
        w.pack(">H", len(payload.statements))
        for data in payload.statements:
            w.pack(">H", len(data)).raw(data)
    else:
        w.pack(">H", len(payload.record)).raw(payload.record)
    return w.bytes()


def _decode_payload(kind: MessageType, r: Reader) -> Payload:
    payload: Payload
    if kind is MessageType.HEARTBEAT:
        role = _ROLES_BY_CODE.get(r.u8())
        if role is None:
            raise CoordinationError("unknown role")
        (term,) = r.unpack(">Q")
        digest = r.take(_DIGEST_LEN)
        last_publish = r.unpack(">Q")[0] if r.flag() else None
        eligible = r.flag()
        members_digest = r.take(_DIGEST_LEN)
        report = None
        if r.flag():
            statement = PublisherStatement._decode(r)
            (age_ms,) = r.unpack(">I")
            report = PublisherReport(statement, age_ms, r.u8())
        payload = Heartbeat(role, term, digest, last_publish, eligible, members_digest, report)
    elif kind is MessageType.INTRO_POINTS:
        (count,) = r.unpack(">H")
        if count > MAX_INTRO_POINTS:
            raise CoordinationError("too many intro points")
        payload = IntroPoints(tuple(r.take(r.unpack(">H")[0]) for _ in range(count)))
    elif kind is MessageType.LEASE_CLAIM:
        payload = LeaseClaim(PublisherStatement._decode(r))
    elif kind is MessageType.LEASE_RELEASE:
        payload = LeaseRelease(r.unpack(">Q")[0])
    elif kind is MessageType.MEMBERS:
        (count,) = r.unpack(">H")
        if count > MAX_STATEMENTS_PER_MESSAGE:
            raise CoordinationError("too many statements")
        payload = Members(tuple(r.take(r.unpack(">H")[0]) for _ in range(count)))
    else:
        payload = Hello(r.take(r.unpack(">H")[0]))
    r.end()
    return payload


def encode_body(seq: int, timestamp_ms: int, recipient: str, payload: Payload) -> bytes:
    """The plaintext body: seq, timestamp, recipient ('' in a hello), type, payload."""
    check_uint(seq, MAX_U64, "sequence number")
    check_uint(timestamp_ms, MAX_U64, "timestamp")
    if recipient:
        check_node_id(recipient)
    w = Writer().raw(_BODY_HEADER.pack(seq, timestamp_ms)).text(recipient)
    return w.u8(_TYPE_OF[type(payload)]).raw(_encode_payload(payload)).bytes()


def decode_body(body: bytes) -> tuple[int, int, str, Payload]:
    """Parse a plaintext body into ``(seq, timestamp_ms, recipient, payload)``."""
    r = Reader(body)
    seq, timestamp_ms = r.unpack(_BODY_HEADER.format)
    recipient = r.text()
    if recipient:
        check_node_id(recipient)
    type_code = r.u8()
    try:
        kind = MessageType(type_code)
    except ValueError:
        raise CoordinationError(
            f"unknown message type {type_code}", RejectReason.UNKNOWN_TYPE
        ) from None
    return seq, timestamp_ms, recipient, _decode_payload(kind, r)


# ---------------------------------------------------------------------------------------------
# Sealing


def _header(kind: int, sender: str) -> bytes:
    raw = sender.encode("ascii")
    return bytes([PROTOCOL_VERSION, kind, len(raw)]) + raw


class _Boxes:
    """``crypto_box`` objects per (peer, peer key) and verified hello records, both bounded."""

    def __init__(self, own: NodeKey, limit: int = 1024) -> None:
        self._own = own
        self._limit = limit
        self._boxes: OrderedDict[tuple[str, bytes], Box] = OrderedDict()
        # Records hellos carried, already checked against the master key (same bound).
        self._records: OrderedDict[bytes, Statement] = OrderedDict()

    def verified_record(self, data: bytes, master_public: bytes) -> Statement:
        """``data`` decoded and verified (once: hellos repeat the same record)."""
        statement = self._records.get(data)
        if statement is None:
            statement = decode_statement(data, master_public)
            self._records[data] = statement
            while len(self._records) > self._limit:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(data)
        return statement

    def get(self, node_id: str, public: bytes) -> Box:
        """Raises CoordinationError for an unusable key (it is master-signed, so a bug)."""
        cache_key = (node_id, public)
        box = self._boxes.get(cache_key)
        if box is None:
            try:
                box = Box(self._own.box_private, box_public_key(public))
            except InvalidKeyError as exc:
                raise CoordinationError(str(exc), RejectReason.FORGED) from None
            self._boxes[cache_key] = box
            while len(self._boxes) > self._limit:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(cache_key)
        return box


# Who a node is, as far as a receiver can tell: its node key (from its effective admission
# record), None when it is not a member.
KeyLookup = Callable[[str], bytes | None]


@dataclass(frozen=True)
class _Opened:
    """A datagram parsed far enough for the cheap checks (freshness, replay).

    ``key`` is the node key the datagram is (to be) authenticated with; ``verify`` finishes the
    authentication of a hello (signatures cost far more than the checks before them)."""

    envelope: Envelope
    key: bytes
    verify: Callable[[], None] | None = None


def _open(
    datagram: bytes,
    own_id: str,
    boxes: _Boxes,
    key_of: KeyLookup,
    master_public: bytes,
    max_datagram_bytes: int,
) -> _Opened:
    if len(datagram) > max_datagram_bytes:
        raise CoordinationError("datagram too large", RejectReason.OVERSIZED)
    if len(datagram) < 3:
        raise CoordinationError("datagram too short")
    version, kind, id_len = datagram[0], datagram[1], datagram[2]
    if version != PROTOCOL_VERSION:
        raise CoordinationError(f"unknown version {version}", RejectReason.UNKNOWN_VERSION)
    id_end = 3 + id_len
    if len(datagram) < id_end:
        raise CoordinationError("datagram too short")
    try:
        sender = check_node_id(datagram[3:id_end].decode("ascii"))
    except UnicodeDecodeError:
        raise CoordinationError("sender id is not ASCII") from None
    if sender == own_id:
        raise CoordinationError("our own datagram", RejectReason.LOOPBACK)
    if kind == _KIND_SEALED:
        public = key_of(sender)
        if public is None:
            raise CoordinationError("sender is not a member", RejectReason.UNKNOWN_SENDER)
        if len(datagram) < id_end + _NONCE_LEN + _MAC_LEN:
            raise CoordinationError("datagram too short")
        try:
            body = boxes.get(sender, public).decrypt(datagram[id_end:])
        except CryptoError:
            raise CoordinationError("authentication failed", RejectReason.FORGED) from None
        seq, timestamp_ms, recipient, payload = decode_body(body)
        if recipient != own_id or isinstance(payload, Hello):
            raise CoordinationError("sealed for another node", RejectReason.MISDIRECTED)
        return _Opened(Envelope(sender, seq, timestamp_ms, payload, version), public)
    if kind == _KIND_HELLO:
        if len(datagram) < id_end + SIGNATURE_BYTES:
            raise CoordinationError("datagram too short")
        seq, timestamp_ms, recipient, payload = decode_body(datagram[id_end:-SIGNATURE_BYTES])
        if recipient or not isinstance(payload, Hello):
            raise CoordinationError("a hello carries only the sender's record")
        record = boxes.verified_record(payload.record, master_public)
        content = record.content
        if not isinstance(content, AdmissionRecord) or content.node_id != sender:
            raise CoordinationError("a hello must carry the sender's own record")

        def verify() -> None:
            signed = HELLO_DOMAIN + datagram[:-SIGNATURE_BYTES]
            if not verify_signature(content.node_key, signed, datagram[-SIGNATURE_BYTES:]):
                raise CoordinationError("hello not signed by its record's key", RejectReason.FORGED)

        envelope = Envelope(sender, seq, timestamp_ms, payload, version, record)
        return _Opened(envelope, content.node_key, verify)
    raise CoordinationError(f"unknown datagram kind {kind}")


def open_datagram(
    datagram: bytes,
    own_id: str,
    own_key: NodeKey,
    key_of: KeyLookup,
    master_public: bytes,
    max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
) -> Envelope:
    """Authenticate and decode one datagram (no freshness or replay checks: see Receiver)."""
    opened = _open(datagram, own_id, _Boxes(own_key), key_of, master_public, max_datagram_bytes)
    if opened.verify is not None:
        opened.verify()
    return opened.envelope


class Sender:
    """Seals outgoing messages for one node.

    The sequence number starts at the boot time in unix ms and is ``max(last + 1, now_ms)``
    afterwards, so it keeps increasing across restarts (receivers remember the last value per
    sender) as long as the clock does not jump back; it cannot run ahead of the clock unless a
    node sends more than 1000 messages a second. One message to several recipients keeps one
    sequence number (:meth:`reserve`, then :meth:`seal` per recipient).
    """

    def __init__(
        self,
        node_id: str,
        key: NodeKey,
        *,
        boot_time: float,
        randbytes: Callable[[int], bytes],
        max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
    ) -> None:
        self.node_id = check_node_id(node_id)
        self.key = key
        self._boxes = _Boxes(key)
        self._randbytes = randbytes
        self._max = max_datagram_bytes
        self._seq = int(boot_time * 1000) - 1

    def __repr__(self) -> str:
        return f"Sender(node_id={self.node_id!r}, seq={self._seq})"

    def reserve(self, now: float) -> tuple[int, int]:
        """The next ``(seq, timestamp_ms)``; every datagram of one message shares them."""
        now_ms = int(now * 1000)
        self._seq = max(self._seq + 1, now_ms)
        return self._seq, now_ms

    def seal(
        self,
        payload: Payload,
        stamp: tuple[int, int],
        recipient: str,
        recipient_key: bytes,
    ) -> bytes:
        """The datagram of ``payload`` for one member; CoordinationError if it exceeds the limit
        (or the recipient's key is unusable)."""
        seq, timestamp_ms = stamp
        body = encode_body(seq, timestamp_ms, recipient, payload)
        # Size first: a datagram that cannot be sent needs no nonce.
        size = 3 + len(self.node_id) + _NONCE_LEN + _MAC_LEN + len(body)
        self._check_size(size)
        nonce = self._randbytes(_NONCE_LEN)
        if len(nonce) != _NONCE_LEN:
            raise CoordinationError("randbytes returned a short nonce")
        sealed = self._boxes.get(recipient, recipient_key).encrypt(body, nonce)
        return _header(_KIND_SEALED, self.node_id) + bytes(sealed)

    def fits(self, payload: Payload, recipient: str) -> bool:
        """Whether ``payload`` sealed for ``recipient`` stays within the datagram limit."""
        body = encode_body(0, 0, recipient, payload)
        return 3 + len(self.node_id) + _NONCE_LEN + _MAC_LEN + len(body) <= self._max

    def hello(self, record: Statement, now: float) -> bytes:
        """A hello carrying our admission record, signed with our node key."""
        seq, timestamp_ms = self.reserve(now)
        body = encode_body(seq, timestamp_ms, "", Hello(record.data))
        unsigned = _header(_KIND_HELLO, self.node_id) + body
        self._check_size(len(unsigned) + SIGNATURE_BYTES)
        return unsigned + self.key.sign(HELLO_DOMAIN + unsigned)

    def _check_size(self, size: int) -> None:
        if size > self._max:
            raise CoordinationError(
                f"message of {size} bytes exceeds {self._max}", RejectReason.OVERSIZED
            )


@dataclass
class _SenderRecord:
    # The most recently accepted sequence numbers, ascending, at most ``window`` of them.
    seqs: list[int]
    accepted_at: float


class Receiver:
    """Validates incoming datagrams; pure (the caller passes ``now``), never raises on input.

    ``receive`` returns the :class:`Envelope` or the :class:`RejectReason`; only an accepted
    message changes state (the sender's replay window). ``key_of(node_id)`` is the member's
    node key (None: not a member); ``master_public`` checks the records hellos carry.

    Replays: each sender's last ``replay_window`` accepted sequence numbers are remembered; a
    number already seen, or older than the whole (full) window, is REPLAYED. A strict
    "greater than the last one" rule would also drop datagrams that UDP merely reordered (a
    heartbeat and the intro points sent right after it); the window accepts those exactly once.
    A sequence number more than :data:`MAX_SEQ_AHEAD_MS` ahead of its timestamp is refused, so
    no authenticated message can push a sender's window beyond what its later messages reach.

    Replay state is bounded: a sender's record is forgotten once it has been silent for twice
    the skew tolerance, because any replay of its messages is then rejected as stale anyway
    (accepted timestamps are at most ``skew`` ahead of the time of acceptance). When more than
    ``max_senders`` are active the least recently heard one is evicted.
    """

    def __init__(
        self,
        own_id: str,
        key: NodeKey,
        key_of: KeyLookup,
        master_public: bytes,
        *,
        clock_skew_tolerance: float = DEFAULT_CLOCK_SKEW_SECS,
        max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
        max_senders: int = 1024,
        replay_window: int = 64,
    ) -> None:
        self.own_id = check_node_id(own_id)
        self._boxes = _Boxes(key)
        self._key_of = key_of
        self._master_public = master_public
        self.skew_ms = int(clock_skew_tolerance * 1000)
        self._forget_after = 2 * clock_skew_tolerance + 1.0
        self._max_bytes = max_datagram_bytes
        self._max_senders = max_senders
        self._window = replay_window
        self._senders: OrderedDict[tuple[str, bytes], _SenderRecord] = OrderedDict()

    def __repr__(self) -> str:
        return f"Receiver(own_id={self.own_id!r}, senders={len(self._senders)})"

    def last_seq(self, sender: str) -> int | None:
        """The highest sequence number accepted from ``sender``'s current key, if remembered."""
        key = self._key_of(sender)
        record = self._senders.get((sender, key)) if key is not None else None
        return record.seqs[-1] if record is not None else None

    def receive(self, datagram: bytes, now: float) -> Envelope | RejectReason:
        try:
            opened = _open(
                datagram,
                self.own_id,
                self._boxes,
                self._key_of,
                self._master_public,
                self._max_bytes,
            )
        except CoordinationError as exc:
            return exc.reason
        envelope = opened.envelope
        now_ms = int(now * 1000)
        if envelope.timestamp_ms < now_ms - self.skew_ms:
            return RejectReason.STALE
        if envelope.timestamp_ms > now_ms + self.skew_ms:
            return RejectReason.FUTURE
        if envelope.seq > envelope.timestamp_ms + MAX_SEQ_AHEAD_MS:
            return RejectReason.MALFORMED
        # Replay state per (sender, key): a hello signed with an old or revoked key of a node
        # can never use up the window of the node's current key.
        window_key = (envelope.sender, opened.key)
        record = self._senders.get(window_key)
        if record is not None and now - record.accepted_at > self._forget_after:
            record = None  # forgotten: anything it could replay is stale by now
        if record is not None and (
            envelope.seq in record.seqs
            or (len(record.seqs) >= self._window and envelope.seq < record.seqs[0])
        ):
            return RejectReason.REPLAYED
        if opened.verify is not None:
            try:
                opened.verify()
            except CoordinationError as exc:
                return exc.reason
        self._accept(window_key, record, envelope.seq, now)
        return envelope

    def forget(self, sender: str) -> None:
        """Drop a sender's replay state (it was revoked: nothing of it is accepted any more)."""
        for window_key in [k for k in self._senders if k[0] == sender]:
            del self._senders[window_key]

    def _accept(
        self, sender: tuple[str, bytes], record: _SenderRecord | None, seq: int, now: float
    ) -> None:
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
