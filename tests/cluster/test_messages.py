"""The coordination codec (protocol v3): round trips, every rejection reason, fuzzing, limits.

Each node speaks with its own key (issue 16): a datagram is sealed between two members' keys, so
a node that is not a member, or a member that claims another's id, or an old v2 cluster token,
gets nothing accepted.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.authority import MAX_STATEMENT_BYTES
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.messages import (
    DEFAULT_MAX_DATAGRAM_BYTES,
    MAX_REPORT_HOPS,
    MAX_SEQ_AHEAD_MS,
    MAX_STATEMENTS_PER_MESSAGE,
    PROTOCOL_VERSION,
    CoordinationError,
    Envelope,
    Heartbeat,
    Hello,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    Members,
    MessageType,
    Payload,
    PublisherReport,
    PublisherStatement,
    Receiver,
    RejectReason,
    Role,
    Sender,
    check_peer_address,
    decode_body,
    encode_body,
    intro_points_digest,
)
from tests.budget import budget
from tests.cluster.legacy_v2 import v2_datagram, v2_receiver_verdict
from tests.trust import MASTER, OTHER_MASTER, node_key, record, revocation, signed

NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)
KEYS = {name: node_key(name) for name in ("node-a", "node-b", "node-c")}
MEMBERS = {name: key.public for name, key in KEYS.items()}
DIGEST = intro_points_digest([b"ip1", b"ip2"])


def make_sender(
    node_id: str = "node-a", boot: float = NOW - 100, seed: int = 1, key: NodeKey | None = None
) -> Sender:
    return Sender(
        node_id, key or KEYS[node_id], boot_time=boot, randbytes=random.Random(seed).randbytes
    )


def make_receiver(node_id: str = "node-b", **kwargs: object) -> Receiver:
    return Receiver(node_id, KEYS[node_id], MEMBERS.get, MASTER.public_key, **kwargs)  # type: ignore[arg-type]


def seal(
    payload: Payload, sender: Sender | None = None, to: str = "node-b", now: float = NOW
) -> bytes:
    sender = sender or make_sender()
    return sender.seal(payload, sender.reserve(now), to, MEMBERS[to])


def statement(node_id: str = "node-c", term: int = 9, seq: int = NOW_MS) -> PublisherStatement:
    return PublisherStatement.sign(KEYS[node_id], node_id, term, seq, seq)


def heartbeat(**changes: object) -> Heartbeat:
    fields: dict[str, object] = {
        "role": Role.PUBLISHER,
        "term": 3,
        "intro_digest": DIGEST,
        "last_publish": 1_699_999_000,
        "publisher_eligible": True,
        "members_digest": b"\x01" * 32,
    }
    fields.update(changes)
    return Heartbeat(**fields)  # type: ignore[arg-type]


REPORT = PublisherReport(statement(), 2**32 - 1, MAX_REPORT_HOPS)
RECORD_A = signed(record("node-a", key=KEYS["node-a"])).data

ALL_PAYLOADS: list[Payload] = [
    heartbeat(),
    heartbeat(believed_publisher=REPORT),
    heartbeat(role=Role.STANDBY, last_publish=None, publisher_eligible=False),
    IntroPoints((b"\x01" * 300, b"\x02" * 500)),
    IntroPoints(()),
    LeaseClaim(statement("node-a", term=7)),
    LeaseRelease(term=2**64 - 1),
    Members((RECORD_A, revocation("node-x").data)),
    Members(()),
]


@pytest.mark.parametrize("payload", ALL_PAYLOADS, ids=lambda p: type(p).__name__)
def test_round_trip_through_receiver(payload: Payload) -> None:
    result = make_receiver().receive(seal(payload), NOW + 0.2)
    assert isinstance(result, Envelope)
    assert result.payload == payload
    assert result.sender == "node-a"
    assert result.version == PROTOCOL_VERSION == 3
    assert result.timestamp_ms == NOW_MS
    assert result.record is None
    assert (
        result.type
        is {
            Heartbeat: MessageType.HEARTBEAT,
            IntroPoints: MessageType.INTRO_POINTS,
            LeaseClaim: MessageType.LEASE_CLAIM,
            LeaseRelease: MessageType.LEASE_RELEASE,
            Members: MessageType.MEMBERS,
        }[type(payload)]
    )


def test_hello_round_trip_introduces_a_node_nobody_knows_yet() -> None:
    key = node_key("node-new")
    sender = make_sender("node-new", key=key)
    own = signed(record("node-new", key=key))
    receiver = make_receiver()
    result = receiver.receive(sender.hello(own, NOW), NOW)
    assert isinstance(result, Envelope) and result.payload == Hello(own.data)
    assert result.record is not None and result.record.data == own.data
    assert result.type is MessageType.HELLO
    # A sealed message of the same node is still refused: it is not a member here yet (the
    # coordinator decides whether the record makes it one).
    sealed = sender.seal(LeaseRelease(1), sender.reserve(NOW), "node-b", MEMBERS["node-b"])
    assert receiver.receive(sealed, NOW) is RejectReason.UNKNOWN_SENDER


def test_hello_must_be_signed_by_its_records_key_and_carry_a_master_signed_record() -> None:
    key = node_key("node-new")
    # Signed by another key than the record's: forged.
    impostor = make_sender("node-new", key=node_key("mallory"))
    own = signed(record("node-new", key=key))
    assert make_receiver().receive(impostor.hello(own, NOW), NOW) is RejectReason.FORGED
    # A record signed by another master key: forged.
    foreign = signed(record("node-new", key=key), OTHER_MASTER)
    assert make_receiver().receive(make_sender("node-new", key=key).hello(foreign, NOW), NOW) is (
        RejectReason.FORGED
    )
    # Another node's record: malformed (a hello speaks only for its sender).
    other = signed(record("node-c", key=KEYS["node-c"]))
    assert make_receiver().receive(make_sender("node-new", key=key).hello(other, NOW), NOW) is (
        RejectReason.MALFORMED
    )


def test_body_layout() -> None:
    body = encode_body(42, 1234, "node-b", LeaseRelease(9))
    assert body == struct.pack(">QQ", 42, 1234) + b"\x06node-b" + struct.pack(">BQ", 4, 9)
    assert decode_body(body) == (42, 1234, "node-b", LeaseRelease(9))


def test_reprs_do_not_leak_the_node_key() -> None:
    key = KEYS["node-a"]
    text = repr(key) + repr(make_sender()) + repr(make_receiver())
    assert key.seed_bytes().hex() not in text and "SHA256:" in repr(key)


def test_sequence_numbers_increase_and_survive_restart() -> None:
    sender = make_sender(boot=NOW)
    receiver = make_receiver()
    seqs = []
    for i in range(5):
        env = receiver.receive(seal(LeaseRelease(1), sender), NOW)  # same ms: still unique
        assert isinstance(env, Envelope), i
        seqs.append(env.seq)
    assert seqs == sorted(set(seqs))
    assert seqs[0] == NOW_MS
    restarted = make_sender(boot=NOW + 2, seed=2)
    env = receiver.receive(seal(LeaseRelease(1), restarted, now=NOW + 2), NOW + 2)
    assert isinstance(env, Envelope) and env.seq > seqs[-1]


def test_one_message_to_several_members_shares_its_sequence_number() -> None:
    sender = make_sender()
    stamp = sender.reserve(NOW)
    to_b = sender.seal(LeaseRelease(1), stamp, "node-b", MEMBERS["node-b"])
    to_c = sender.seal(LeaseRelease(1), stamp, "node-c", MEMBERS["node-c"])
    env_b = make_receiver("node-b").receive(to_b, NOW)
    env_c = make_receiver("node-c").receive(to_c, NOW)
    assert isinstance(env_b, Envelope) and isinstance(env_c, Envelope)
    assert env_b.seq == env_c.seq == stamp[0]
    assert to_b != to_c  # sealed for each recipient


# -- every rejection reason ---------------------------------------------------------------------


def test_a_non_member_is_unknown() -> None:
    outsider = make_sender("node-x", key=node_key("node-x"))
    datagram = outsider.seal(LeaseRelease(1), outsider.reserve(NOW), "node-b", MEMBERS["node-b"])
    assert make_receiver().receive(datagram, NOW) is RejectReason.UNKNOWN_SENDER


def test_a_member_cannot_speak_for_another() -> None:
    """node-c (a member, or anyone with some key) names itself node-a: the box does not open
    with node-a's key. This is finding 1 of issue 16 at the codec level."""
    impostor = make_sender("node-a", key=KEYS["node-c"])
    assert make_receiver().receive(seal(LeaseRelease(1), impostor), NOW) is RejectReason.FORGED
    # Renaming the sender in a real datagram breaks it the same way.
    datagram = bytearray(seal(LeaseRelease(1)))
    datagram[3 : 3 + 6] = b"node-c"
    assert make_receiver().receive(bytes(datagram), NOW) is RejectReason.FORGED


def test_reflected_and_redirected_datagrams_are_refused() -> None:
    datagram = seal(LeaseRelease(1))  # node-a -> node-b
    # Reflected back to node-a as if from node-b: same pair key, but the body names node-b.
    reflected = bytearray(datagram)
    reflected[3 : 3 + 6] = b"node-b"
    assert make_receiver("node-a").receive(bytes(reflected), NOW) is RejectReason.MISDIRECTED
    # Sent on to node-c: another pair key.
    assert make_receiver("node-c").receive(datagram, NOW) is RejectReason.FORGED


def test_a_v2_cluster_token_datagram_is_an_unknown_version_and_vice_versa() -> None:
    """Mixed versions do not interoperate: each side drops the other's datagrams, counted as
    unknown_version, before any key is tried (docs/security.md, upgrading)."""
    token = b"0123456789abcdef0123456789abcdef"
    old = v2_datagram(token, "node-a", NOW_MS, NOW_MS, b"\x00" * 12)
    assert v2_receiver_verdict(token, old) == "accepted"  # a genuine v2 datagram
    receiver = make_receiver()
    assert receiver.receive(old, NOW) is RejectReason.UNKNOWN_VERSION
    assert receiver.last_seq("node-a") is None
    assert v2_receiver_verdict(token, seal(LeaseRelease(1))) == "unknown_version"
    hello = make_sender().hello(signed(record("node-a", key=KEYS["node-a"])), NOW)
    assert v2_receiver_verdict(token, hello) == "unknown_version"


def test_rejects_replay_and_keeps_state_unchanged() -> None:
    sender = make_sender()
    receiver = make_receiver()
    first = seal(LeaseRelease(1), sender)
    second = seal(LeaseRelease(2), sender, now=NOW + 1)
    assert isinstance(receiver.receive(second, NOW + 1), Envelope)
    last = receiver.last_seq("node-a")
    assert receiver.receive(second, NOW + 1.5) is RejectReason.REPLAYED
    assert receiver.last_seq("node-a") == last
    assert isinstance(receiver.receive(first, NOW + 1.5), Envelope)  # merely reordered: once
    assert receiver.receive(first, NOW + 1.6) is RejectReason.REPLAYED


def test_replay_window_is_bounded() -> None:
    sender = make_sender()
    receiver = make_receiver(replay_window=2)
    oldest, middle, newest = (seal(LeaseRelease(i), sender) for i in range(3))
    for datagram in (middle, newest):
        assert isinstance(receiver.receive(datagram, NOW), Envelope)
    assert receiver.receive(oldest, NOW) is RejectReason.REPLAYED


def test_replays_after_the_window_are_stale() -> None:
    datagram = seal(LeaseRelease(1))
    receiver = make_receiver()
    assert isinstance(receiver.receive(datagram, NOW), Envelope)
    assert receiver.receive(datagram, NOW + 60) is RejectReason.STALE


@pytest.mark.parametrize(
    ("offset", "reason"), [(-5.001, RejectReason.STALE), (5.001, RejectReason.FUTURE)]
)
def test_rejects_timestamps_outside_skew(offset: float, reason: RejectReason) -> None:
    receiver = make_receiver()
    assert receiver.receive(seal(LeaseRelease(1), now=NOW + offset), NOW) is reason
    assert receiver.last_seq("node-a") is None
    edge = seal(LeaseRelease(1), make_sender(seed=3), now=NOW + 5.0)
    assert isinstance(receiver.receive(edge, NOW), Envelope)


def test_a_sequence_number_far_ahead_of_its_clock_is_refused() -> None:
    """Finding 1 of issue 16: huge sequence numbers once silenced a node. A sender's numbers
    may run ahead of its clock only by MAX_SEQ_AHEAD_MS."""
    sender = make_sender()
    receiver = make_receiver()
    too_far = sender.seal(LeaseRelease(1), (NOW_MS + MAX_SEQ_AHEAD_MS + 1, NOW_MS), "node-b",
                          MEMBERS["node-b"])  # fmt: skip
    assert receiver.receive(too_far, NOW) is RejectReason.MALFORMED
    at_edge = sender.seal(LeaseRelease(1), (NOW_MS + MAX_SEQ_AHEAD_MS, NOW_MS), "node-b",
                          MEMBERS["node-b"])  # fmt: skip
    assert isinstance(receiver.receive(at_edge, NOW), Envelope)


def test_hellos_with_an_old_key_cannot_fill_the_current_keys_replay_window() -> None:
    """A captured (or stolen) old key of node-a signs hellos with huge sequence numbers: they
    use the replay window of that key only, so node-a's real messages still get through."""
    old_key = node_key("node-a", generation=7)
    old_record = signed(record("node-a", key=old_key, issued_at_ms=1))
    receiver = make_receiver()
    old = make_sender("node-a", key=old_key)
    old._seq = NOW_MS + MAX_SEQ_AHEAD_MS - 200  # as far ahead as a receiver accepts
    for _ in range(80):
        assert isinstance(receiver.receive(old.hello(old_record, NOW), NOW), Envelope)
    assert isinstance(receiver.receive(seal(LeaseRelease(1)), NOW), Envelope)


def test_rejects_oversized() -> None:
    receiver = make_receiver(max_datagram_bytes=1000)
    assert receiver.receive(seal(IntroPoints((b"x" * 2000,))), NOW) is RejectReason.OVERSIZED
    small = Sender("node-a", KEYS["node-a"], boot_time=NOW, randbytes=random.randbytes,
                   max_datagram_bytes=1000)  # fmt: skip
    assert not small.fits(IntroPoints((b"x" * 2000,)), "node-b")
    with pytest.raises(CoordinationError) as info:
        small.seal(IntroPoints((b"x" * 2000,)), small.reserve(NOW), "node-b", MEMBERS["node-b"])
    assert info.value.reason is RejectReason.OVERSIZED


def test_rejects_unknown_version_and_kind() -> None:
    datagram = bytearray(seal(LeaseRelease(1)))
    datagram[0] = PROTOCOL_VERSION + 1
    assert make_receiver().receive(bytes(datagram), NOW) is RejectReason.UNKNOWN_VERSION
    datagram[0], datagram[1] = PROTOCOL_VERSION, 9
    assert make_receiver().receive(bytes(datagram), NOW) is RejectReason.MALFORMED


def _sealed_body(body: bytes, sender: str = "node-a", to: str = "node-b") -> bytes:
    """A correctly sealed datagram around an arbitrary plaintext ``body``."""
    from nacl.public import Box

    from rustbalance.cluster.identity import box_public_key

    box = Box(KEYS[sender].box_private, box_public_key(MEMBERS[to]))
    raw = sender.encode()
    return bytes([PROTOCOL_VERSION, 1, len(raw)]) + raw + bytes(box.encrypt(body, b"\x00" * 24))


def _body(kind: int, payload: bytes, to: str = "node-b") -> bytes:
    return (
        struct.pack(">QQ", NOW_MS, NOW_MS)
        + bytes([len(to)])
        + to.encode()
        + bytes([kind])
        + (payload)
    )


def test_rejects_unknown_type_even_when_authentic() -> None:
    assert make_receiver().receive(_sealed_body(_body(99, b"")), NOW) is RejectReason.UNKNOWN_TYPE


def test_a_sealed_hello_is_misdirected() -> None:
    """Hellos are signed, never sealed: a sealed one is refused."""
    datagram = _sealed_body(_body(MessageType.HELLO, b"\x00\x01x"))
    assert make_receiver().receive(datagram, NOW) is RejectReason.MISDIRECTED


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes([7]) + bytes(8 + 32 + 1 + 1 + 32 + 1),  # unknown role
        bytes([1]) + bytes(8) + bytes(32) + b"\x02",  # last_publish flag of 2
        bytes([1]) + bytes(8 + 32) + b"\x00\x01" + bytes(32) + b"\x00\x00",  # trailing byte
        bytes([1]) + bytes(8 + 32) + b"\x00\x01" + bytes(32) + b"\x01",  # report flag, no report
        bytes([1]) + bytes(8 + 32) + b"\x00\x01" + bytes(31),  # short members digest
    ],
)
def test_rejects_malformed_heartbeats(payload: bytes) -> None:
    receiver = make_receiver()
    datagram = _sealed_body(_body(MessageType.HEARTBEAT, payload))
    assert receiver.receive(datagram, NOW) is RejectReason.MALFORMED
    assert receiver.last_seq("node-a") is None


@pytest.mark.parametrize(
    "datagram",
    [b"", bytes([PROTOCOL_VERSION]), bytes([PROTOCOL_VERSION, 1, 6]) + b"node",
     bytes([PROTOCOL_VERSION, 1, 0]) + bytes(60), bytes([PROTOCOL_VERSION, 2, 2]) + b"\xff\xfe",
     bytes([PROTOCOL_VERSION, 2, 6]) + b"node-a" + bytes(10)],
)  # fmt: skip
def test_rejects_malformed_envelopes(datagram: bytes) -> None:
    assert make_receiver().receive(datagram, NOW) is RejectReason.MALFORMED


def test_rejects_loopback() -> None:
    datagram = seal(LeaseRelease(1), make_sender("node-b"), to="node-c")
    assert make_receiver("node-b").receive(datagram, NOW) is RejectReason.LOOPBACK


def test_payload_validation_on_construction() -> None:
    with pytest.raises(CoordinationError):
        heartbeat(intro_digest=b"short")
    with pytest.raises(CoordinationError):
        heartbeat(members_digest=b"short")
    with pytest.raises(CoordinationError):
        heartbeat(term=-1)
    with pytest.raises(CoordinationError):
        heartbeat(term=True)
    with pytest.raises(CoordinationError):
        IntroPoints((b"",))
    with pytest.raises(CoordinationError):
        Members((b"x",) * (MAX_STATEMENTS_PER_MESSAGE + 1))
    with pytest.raises(CoordinationError):
        Members((b"x" * (MAX_STATEMENT_BYTES + 1),))
    with pytest.raises(CoordinationError):
        Hello(b"")
    with pytest.raises(CoordinationError, match="at most 16"):
        PublisherReport(statement(), 0, MAX_REPORT_HOPS + 1)
    with pytest.raises(CoordinationError):
        PublisherStatement("node-c", 1, 1, 1, b"short")
    assert check_peer_address("[FD00::1]:51821") == "[fd00::1]:51821"


def test_publisher_statements_verify_only_under_their_node_key() -> None:
    s = statement("node-c")
    assert s.verify(MEMBERS["node-c"])
    assert not s.verify(MEMBERS["node-a"])
    forged = PublisherStatement("node-c", s.term + 1, s.seq, s.timestamp_ms, s.signature)
    assert not forged.verify(MEMBERS["node-c"])
    renamed = PublisherStatement("node-a", s.term, s.seq, s.timestamp_ms, s.signature)
    assert not renamed.verify(MEMBERS["node-c"])


def test_receiver_state_is_bounded() -> None:
    keys = {f"n{i}": node_key(f"n{i}") for i in range(6)}
    members = {n: k.public for n, k in keys.items()} | MEMBERS
    receiver = Receiver("node-b", KEYS["node-b"], members.get, MASTER.public_key, max_senders=3)
    for name, key in keys.items():
        sender = make_sender(name, key=key)
        datagram = sender.seal(LeaseRelease(1), sender.reserve(NOW), "node-b", MEMBERS["node-b"])
        assert isinstance(receiver.receive(datagram, NOW), Envelope)
    assert [receiver.last_seq(n) is not None for n in keys] == [False] * 3 + [True] * 3


def test_intro_points_digest_is_by_content() -> None:
    assert intro_points_digest([b"a", b"b"]) == intro_points_digest([b"b", b"a", b"a"])
    assert intro_points_digest([b"a", b"b"]) != intro_points_digest([b"a", b"c"])
    assert intro_points_digest([b"ab"]) != intro_points_digest([b"a", b"b"])


def test_twenty_intro_points_and_a_full_members_message_fit_in_a_datagram() -> None:
    points = tuple(random.randbytes(1500) for _ in range(20))
    datagram = seal(IntroPoints(points))
    assert 4096 < len(datagram) < DEFAULT_MAX_DATAGRAM_BYTES
    env = make_receiver().receive(datagram, NOW)
    assert isinstance(env, Envelope) and env.payload == IntroPoints(points)
    statements = tuple(
        signed(record(f"node-{i:03d}-{'x' * 50}", coordination=f"[fd00::{i + 1:x}]:51821",
                      tunnel=f"10.99.{i // 200}.{i % 200 + 1}", endpoint="[2001:db8::1]:51820",
                      issuer="i" * 64)).data
        for i in range(MAX_STATEMENTS_PER_MESSAGE)
    )  # fmt: skip
    assert len(seal(Members(statements))) < DEFAULT_MAX_DATAGRAM_BYTES


# -- fuzzing ------------------------------------------------------------------------------------

VALID_DATAGRAMS = [seal(p, make_sender(seed=i)) for i, p in enumerate(ALL_PAYLOADS)] + [
    make_sender().hello(signed(record("node-a", key=KEYS["node-a"])), NOW)
]


@settings(max_examples=budget(300), deadline=None)
@given(st.binary(max_size=2000), st.floats(NOW - 100, NOW + 100))
def test_fuzz_random_bytes_always_rejected(data: bytes, now: float) -> None:
    assert isinstance(make_receiver().receive(data, now), RejectReason)


@settings(max_examples=budget(300), deadline=None)
@given(st.sampled_from(VALID_DATAGRAMS), st.data())
def test_fuzz_bit_flips_always_rejected(datagram: bytes, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.integers(0, len(datagram) * 8 - 1), min_size=1, max_size=4))
    mutated = bytearray(datagram)
    for bit in set(flips):
        mutated[bit // 8] ^= 1 << (bit % 8)
    receiver = make_receiver()
    result = receiver.receive(bytes(mutated), NOW)
    if bytes(mutated) != datagram:
        assert isinstance(result, RejectReason)
        assert receiver.last_seq("node-a") is None


@settings(max_examples=budget(200), deadline=None)
@given(st.sampled_from(VALID_DATAGRAMS), st.integers(0, 200), st.binary(max_size=40))
def test_fuzz_truncation_and_extension_rejected(datagram: bytes, cut: int, tail: bytes) -> None:
    mutated = datagram[: max(0, len(datagram) - cut)] + tail
    if mutated != datagram:
        assert isinstance(make_receiver().receive(mutated, NOW), RejectReason)


@settings(max_examples=budget(300), deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_authentic_garbage_bodies(body: bytes) -> None:
    """Correctly sealed but arbitrary plaintext: the body parser never raises."""
    result = make_receiver().receive(_sealed_body(body), NOW)
    if isinstance(result, Envelope):
        assert encode_body(result.seq, result.timestamp_ms, "node-b", result.payload) == body
    else:
        assert result in RejectReason


@settings(max_examples=budget(300), deadline=None)
@given(st.sampled_from(list(MessageType)), st.binary(max_size=400))
def test_fuzz_authentic_bodies_of_every_type(kind: MessageType, payload: bytes) -> None:
    """Every message type's decoder, fed arbitrary authentic bytes, returns a reason or a
    payload that encodes back to the same bytes."""
    result = make_receiver().receive(_sealed_body(_body(kind, payload)), NOW)
    if isinstance(result, Envelope):
        assert encode_body(result.seq, result.timestamp_ms, "node-b", result.payload) == _body(
            kind, payload
        )
    else:
        assert result in RejectReason


names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
statements_strategy = st.builds(
    PublisherStatement, names, u64, u64, u64, st.binary(min_size=64, max_size=64)
)
payloads = st.one_of(
    st.builds(
        Heartbeat,
        st.sampled_from(list(Role)),
        u64,
        st.binary(min_size=32, max_size=32),
        st.none() | u64,
        st.booleans(),
        st.binary(min_size=32, max_size=32),
        st.none()
        | st.builds(PublisherReport, statements_strategy, u32, st.integers(0, MAX_REPORT_HOPS)),
    ),
    st.builds(IntroPoints, st.lists(st.binary(min_size=1, max_size=300), max_size=8).map(tuple)),
    st.builds(LeaseClaim, statements_strategy),
    st.builds(LeaseRelease, u64),
    st.builds(
        Members,
        st.lists(st.binary(min_size=1, max_size=MAX_STATEMENT_BYTES), max_size=6).map(tuple),
    ),
)


@settings(max_examples=budget(300), deadline=None)
@given(payloads)
def test_every_message_type_round_trips(payload: Payload) -> None:
    env = make_receiver().receive(seal(payload), NOW)
    assert isinstance(env, Envelope) and env.payload == payload
