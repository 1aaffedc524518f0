"""The coordination codec: round trips, every rejection reason, fuzzing, size limits."""

from __future__ import annotations

import os
import random
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.messages import (
    DEFAULT_MAX_DATAGRAM_BYTES,
    MAX_KNOWN_PEERS,
    MAX_REPORT_HOPS,
    PROTOCOL_VERSION,
    ClusterKey,
    CoordinationError,
    Envelope,
    Heartbeat,
    IntroPoints,
    LeaseClaim,
    LeaseRelease,
    MessageType,
    Payload,
    PeerAnnounce,
    PublisherReport,
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

TOKEN = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"
KEY = ClusterKey(TOKEN)
V = bytes([PROTOCOL_VERSION])
NOW = 1_700_000_000.0


def make_sender(node_id: str = "node-a", boot: float = NOW - 100, seed: int = 1) -> Sender:
    return Sender(node_id, KEY, boot_time=boot, randbytes=random.Random(seed).randbytes)


def heartbeat(**changes: object) -> Heartbeat:
    fields: dict[str, object] = {
        "role": Role.PUBLISHER,
        "priority": 10,
        "term": 3,
        "intro_digest": intro_points_digest([b"ip1", b"ip2"]),
        "last_publish": 1_699_999_000,
        "publisher_eligible": True,
        "known_peers": (("node-a", "10.0.0.1:51821"), ("node-b", "[fd00::2]:51821")),
    }
    fields.update(changes)
    return Heartbeat(**fields)  # type: ignore[arg-type]


REPORT = PublisherReport("node-c", 5, 9, 2**64 - 1, 2**32 - 1, MAX_REPORT_HOPS)

ALL_PAYLOADS: list[Payload] = [
    heartbeat(),
    heartbeat(believed_publisher=REPORT),
    heartbeat(role=Role.STANDBY, believed_publisher=PublisherReport("node-a", 0, 0, 0, 0, 0)),
    heartbeat(role=Role.STANDBY, last_publish=None, publisher_eligible=False, known_peers=()),
    IntroPoints((b"\x01" * 300, b"\x02" * 500)),
    IntroPoints(()),
    LeaseClaim(term=7, priority=0xFFFFFFFF),
    LeaseRelease(term=2**64 - 1),
    PeerAnnounce("node-c", "example.org:51821"),
]


@pytest.mark.parametrize("payload", ALL_PAYLOADS, ids=lambda p: type(p).__name__)
def test_round_trip_through_receiver(payload: Payload) -> None:
    datagram = make_sender().seal(payload, NOW)
    result = Receiver("node-b", KEY).receive(datagram, NOW + 0.2)
    assert isinstance(result, Envelope)
    assert result.payload == payload
    assert result.sender == "node-a"
    assert result.version == PROTOCOL_VERSION
    assert result.timestamp_ms == int(NOW * 1000)
    assert (
        result.type
        is {
            Heartbeat: MessageType.HEARTBEAT,
            IntroPoints: MessageType.INTRO_POINTS,
            LeaseClaim: MessageType.LEASE_CLAIM,
            LeaseRelease: MessageType.LEASE_RELEASE,
            PeerAnnounce: MessageType.PEER_ANNOUNCE,
        }[type(payload)]
    )


def test_body_round_trip_and_layout() -> None:
    body = encode_body(42, 1234, LeaseRelease(9))
    assert body == struct.pack(">QQBQ", 42, 1234, 4, 9)
    assert decode_body(body) == (42, 1234, LeaseRelease(9))


def test_key_ignores_surrounding_whitespace_and_rejects_short_tokens() -> None:
    datagram = make_sender().seal(LeaseRelease(1), NOW)
    same_key = ClusterKey(TOKEN.strip())
    assert isinstance(Receiver("node-b", same_key).receive(datagram, NOW), Envelope)
    with pytest.raises(CoordinationError):
        ClusterKey(b"short token\n")


def test_key_and_sender_reprs_do_not_leak_the_token() -> None:
    text = repr(KEY) + repr(make_sender()) + repr(Receiver("node-b", KEY))
    assert "0123456789abcdef" not in text
    assert "redacted" in repr(KEY)


def test_sequence_numbers_increase_and_survive_restart() -> None:
    sender = make_sender(boot=NOW)
    receiver = Receiver("node-b", KEY)
    seqs = []
    for i in range(5):
        env = receiver.receive(sender.seal(LeaseRelease(1), NOW), NOW)  # same ms: still unique
        assert isinstance(env, Envelope), i
        seqs.append(env.seq)
    assert seqs == sorted(set(seqs))
    assert seqs[0] == int(NOW * 1000)
    # The node restarts 2 s later: its new sequence starts from its new boot time in ms.
    restarted = make_sender(boot=NOW + 2, seed=2)
    env = receiver.receive(restarted.seal(LeaseRelease(1), NOW + 2), NOW + 2)
    assert isinstance(env, Envelope)
    assert env.seq > seqs[-1]


# -- every rejection reason ---------------------------------------------------------------------


def test_rejects_forged_with_other_key() -> None:
    other = ClusterKey(b"another-cluster-token-that-is-long-enough")
    datagram = Sender("node-a", other, boot_time=NOW, randbytes=os.urandom).seal(
        LeaseRelease(1), NOW
    )
    assert Receiver("node-b", KEY).receive(datagram, NOW) is RejectReason.FORGED


def test_rejects_spoofed_sender_id() -> None:
    # The sender id is in the AAD: renaming node-a to node-x breaks authentication.
    datagram = bytearray(make_sender().seal(LeaseRelease(1), NOW))
    datagram[2 : 2 + 6] = b"node-x"
    assert Receiver("node-b", KEY).receive(bytes(datagram), NOW) is RejectReason.FORGED


def test_rejects_replay_and_keeps_state_unchanged() -> None:
    sender = make_sender()
    receiver = Receiver("node-b", KEY)
    first = sender.seal(LeaseRelease(1), NOW)
    second = sender.seal(LeaseRelease(2), NOW + 1)
    assert isinstance(receiver.receive(second, NOW + 1), Envelope)
    last = receiver.last_seq("node-a")
    assert receiver.receive(second, NOW + 1.5) is RejectReason.REPLAYED
    assert receiver.last_seq("node-a") == last
    # A datagram that was merely reordered is accepted, but only once.
    assert isinstance(receiver.receive(first, NOW + 1.5), Envelope)
    assert receiver.receive(first, NOW + 1.6) is RejectReason.REPLAYED
    assert receiver.last_seq("node-a") == last


def test_replay_window_is_bounded() -> None:
    sender = make_sender()
    receiver = Receiver("node-b", KEY, replay_window=2)
    oldest, middle, newest = (sender.seal(LeaseRelease(i), NOW) for i in range(3))
    for datagram in (middle, newest):
        assert isinstance(receiver.receive(datagram, NOW), Envelope)
    # Older than the whole (full) window: cannot tell whether it was seen, so it is refused.
    assert receiver.receive(oldest, NOW) is RejectReason.REPLAYED


def test_replays_after_the_window_are_stale() -> None:
    sender = make_sender()
    receiver = Receiver("node-b", KEY)
    datagram = sender.seal(LeaseRelease(1), NOW)
    assert isinstance(receiver.receive(datagram, NOW), Envelope)
    # Much later the sender's record may be forgotten, but the old timestamp gives it away.
    assert receiver.receive(datagram, NOW + 60) is RejectReason.STALE


@pytest.mark.parametrize(
    ("offset", "reason"), [(-5.001, RejectReason.STALE), (5.001, RejectReason.FUTURE)]
)
def test_rejects_timestamps_outside_skew(offset: float, reason: RejectReason) -> None:
    receiver = Receiver("node-b", KEY)
    datagram = make_sender().seal(LeaseRelease(1), NOW + offset)
    assert receiver.receive(datagram, NOW) is reason
    assert receiver.last_seq("node-a") is None
    # At the edge of the tolerance the message is still fresh.
    edge = make_sender(seed=3).seal(LeaseRelease(1), NOW + 5.0)
    assert isinstance(receiver.receive(edge, NOW), Envelope)


def test_rejects_oversized() -> None:
    receiver = Receiver("node-b", KEY, max_datagram_bytes=1000)
    datagram = make_sender().seal(IntroPoints((b"x" * 2000,)), NOW)
    assert receiver.receive(datagram, NOW) is RejectReason.OVERSIZED
    small = Sender("node-a", KEY, boot_time=NOW, randbytes=os.urandom, max_datagram_bytes=1000)
    with pytest.raises(CoordinationError) as info:
        small.seal(IntroPoints((b"x" * 2000,)), NOW)
    assert info.value.reason is RejectReason.OVERSIZED


def test_rejects_unknown_version() -> None:
    datagram = bytearray(make_sender().seal(LeaseRelease(1), NOW))
    datagram[0] = PROTOCOL_VERSION + 1
    assert Receiver("node-b", KEY).receive(bytes(datagram), NOW) is RejectReason.UNKNOWN_VERSION


def _seal_body(body: bytes, sender: str = "node-a") -> bytes:
    return KEY.seal(sender, body, b"\x00" * 12)


def test_rejects_unknown_type_even_when_authentic() -> None:
    body = struct.pack(">QQB", int(NOW * 1000), int(NOW * 1000), 99)
    assert Receiver("node-b", KEY).receive(_seal_body(body), NOW) is RejectReason.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # heartbeat with no fields
        bytes([7]) + bytes(12 + 32 + 2 + 2),  # unknown role
        bytes([1]) + bytes(12) + bytes(32) + b"\x02",  # last_publish flag of 2
        bytes([1]) + bytes(12) + bytes(32) + b"\x00\x01\x00\x00\x00\x00",  # trailing byte
        bytes([1]) + bytes(12) + bytes(32) + b"\x00\x01\x00\x01\x02\xff\xfe\x01x",  # bad UTF-8
        bytes([1]) + bytes(12) + bytes(32) + b"\x00\x01\x00\x01\x01a\x03bad",  # bad address
        bytes([1]) + bytes(12) + bytes(32) + b"\x00\x01\xff\xff",  # too many peers
    ],
)
def test_rejects_malformed_heartbeats(payload: bytes) -> None:
    body = struct.pack(">QQB", int(NOW * 1000), int(NOW * 1000), MessageType.HEARTBEAT) + payload
    assert Receiver("node-b", KEY).receive(_seal_body(body), NOW) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        V,
        V + b"\x06node-a",
        V + b"\x00" + bytes(40),
        V + b"\x02\xff\xfe" + bytes(40),
    ],
)
def test_rejects_malformed_envelopes(datagram: bytes) -> None:
    assert Receiver("node-b", KEY).receive(datagram, NOW) is RejectReason.MALFORMED


def test_rejects_loopback() -> None:
    datagram = make_sender("node-b").seal(LeaseRelease(1), NOW)
    receiver = Receiver("node-b", KEY)
    assert receiver.receive(datagram, NOW) is RejectReason.LOOPBACK
    assert receiver.last_seq("node-b") is None


def test_payload_validation_on_construction() -> None:
    with pytest.raises(CoordinationError):
        heartbeat(intro_digest=b"short")
    with pytest.raises(CoordinationError):
        heartbeat(priority=-1)
    with pytest.raises(CoordinationError):
        heartbeat(priority=True)
    with pytest.raises(CoordinationError):
        heartbeat(known_peers=(("bad id!", "1.2.3.4:5"),))
    with pytest.raises(CoordinationError):
        heartbeat(known_peers=tuple((f"n{i}", "1.2.3.4:5") for i in range(MAX_KNOWN_PEERS + 1)))
    with pytest.raises(CoordinationError):
        PeerAnnounce("node-c", "[::1]:0")
    with pytest.raises(CoordinationError):
        IntroPoints((b"",))
    assert check_peer_address("[FD00::1]:51821") == "[fd00::1]:51821"


def test_receiver_state_is_bounded() -> None:
    receiver = Receiver("me", KEY, max_senders=3)
    for i in range(6):
        env = receiver.receive(make_sender(f"n{i}").seal(LeaseRelease(1), NOW), NOW)
        assert isinstance(env, Envelope)
    assert [receiver.last_seq(f"n{i}") is not None for i in range(6)] == [False] * 3 + [True] * 3


def test_intro_points_digest_is_by_content() -> None:
    assert intro_points_digest([b"a", b"b"]) == intro_points_digest([b"b", b"a", b"a"])
    assert intro_points_digest([b"a", b"b"]) != intro_points_digest([b"a", b"c"])
    assert intro_points_digest([b"ab"]) != intro_points_digest([b"a", b"b"])


def test_twenty_intro_points_and_many_peers_fit_in_a_datagram() -> None:
    # A real encoded intro point (link specifiers, two keys, two ed25519 certs) is ~400-500 B;
    # 1.5 KB each leaves ample room for future link specifier types.
    points = tuple(os.urandom(1500) for _ in range(20))
    datagram = make_sender().seal(IntroPoints(points), NOW)
    assert len(datagram) < DEFAULT_MAX_DATAGRAM_BYTES
    assert len(datagram) > 4096  # the original's buffer would have cut this
    env = Receiver("b", KEY).receive(datagram, NOW)
    assert isinstance(env, Envelope) and env.payload == IntroPoints(points)
    # A heartbeat with the maximum gossip list of long addresses fits too.
    peers = tuple(
        (f"node-{i:03d}-{'x' * 50}", check_peer_address(f"[fd00:abcd::{i + 1:x}]:51821"))
        for i in range(MAX_KNOWN_PEERS)
    )
    hb = make_sender(seed=5).seal(heartbeat(known_peers=peers), NOW)
    assert len(hb) < DEFAULT_MAX_DATAGRAM_BYTES


# -- fuzzing ------------------------------------------------------------------------------------

VALID_DATAGRAMS = [make_sender(seed=i).seal(p, NOW) for i, p in enumerate(ALL_PAYLOADS)]


@settings(max_examples=budget(400), deadline=None)
@given(st.binary(max_size=2000), st.floats(NOW - 100, NOW + 100))
def test_fuzz_random_bytes_always_rejected(data: bytes, now: float) -> None:
    result = Receiver("node-b", KEY).receive(data, now)
    assert isinstance(result, RejectReason)


@settings(max_examples=budget(400), deadline=None)
@given(st.sampled_from(VALID_DATAGRAMS), st.data())
def test_fuzz_bit_flips_always_rejected(datagram: bytes, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.integers(0, len(datagram) * 8 - 1), min_size=1, max_size=4))
    mutated = bytearray(datagram)
    for bit in set(flips):
        mutated[bit // 8] ^= 1 << (bit % 8)
    receiver = Receiver("node-b", KEY)
    result = receiver.receive(bytes(mutated), NOW)
    assert isinstance(result, RejectReason)
    assert receiver.last_seq("node-a") is None


@settings(max_examples=budget(300), deadline=None)
@given(st.sampled_from(VALID_DATAGRAMS), st.integers(0, 200), st.binary(max_size=40))
def test_fuzz_truncation_and_extension_rejected(datagram: bytes, cut: int, tail: bytes) -> None:
    mutated = datagram[: max(0, len(datagram) - cut)] + tail
    if mutated == datagram:
        return
    assert isinstance(Receiver("node-b", KEY).receive(mutated, NOW), RejectReason)


@settings(max_examples=budget(400), deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_authentic_garbage_bodies(body: bytes) -> None:
    # Correctly sealed but arbitrary plaintext: the body parser must never raise.
    result = Receiver("node-b", KEY).receive(_seal_body(body), NOW)
    if isinstance(result, Envelope):
        assert encode_body(result.seq, result.timestamp_ms, result.payload) == body
    else:
        assert result in RejectReason


def _address(ip: IPv4Address | IPv6Address) -> str:
    return f"[{ip}]:51821" if ip.version == 6 else f"{ip}:51821"


@settings(max_examples=budget(200), deadline=None)
@given(
    st.sampled_from([Role.PUBLISHER, Role.STANDBY]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=32, max_size=32),
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    st.booleans(),
    st.lists(
        st.tuples(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), st.ip_addresses()),
        max_size=20,
    ),
)
def test_heartbeat_round_trip_property(
    role: Role,
    priority: int,
    term: int,
    digest: bytes,
    last_publish: int | None,
    eligible: bool,
    peers: list[tuple[str, IPv4Address | IPv6Address]],
) -> None:
    known = tuple((n, check_peer_address(_address(ip))) for n, ip in peers)
    hb = Heartbeat(role, priority, term, digest, last_publish, eligible, known)
    env = Receiver("zz-receiver", KEY).receive(make_sender().seal(hb, NOW), NOW)
    assert isinstance(env, Envelope) and env.payload == hb


# -- the believed publisher (protocol version 2) -----------------------------------------------

_HB_PREFIX = bytes([1]) + bytes(12) + bytes(32) + b"\x00\x01\x00\x00"  # ... 0 known peers
_REPORT_FIELDS = struct.pack(">IQQI", 5, 9, 1234, 800)


def _heartbeat_body(tail: bytes) -> bytes:
    header = struct.pack(">QQB", int(NOW * 1000), int(NOW * 1000), MessageType.HEARTBEAT)
    return header + _HB_PREFIX + tail


def test_believed_publisher_layout() -> None:
    body = _heartbeat_body(b"\x01\x06node-c" + _REPORT_FIELDS + b"\x03")
    env = Receiver("node-b", KEY).receive(_seal_body(body), NOW)
    assert isinstance(env, Envelope) and isinstance(env.payload, Heartbeat)
    assert env.payload.believed_publisher == PublisherReport("node-c", 5, 9, 1234, 800, 3)
    assert encode_body(env.seq, env.timestamp_ms, env.payload) == body
    none = Receiver("node-b", KEY).receive(_seal_body(_heartbeat_body(b"\x00")), NOW)
    assert isinstance(none, Envelope) and isinstance(none.payload, Heartbeat)
    assert none.payload.believed_publisher is None


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # no believed-publisher flag: a version 1 heartbeat body
        b"\x02",  # flag of 2
        b"\x01",  # flag but no report
        b"\x01\x06node-c" + _REPORT_FIELDS,  # no hop count
        b"\x01\x06node-c" + _REPORT_FIELDS + bytes([MAX_REPORT_HOPS + 1]),  # too many hops
        b"\x01\x06node-c" + _REPORT_FIELDS + b"\xff",
        b"\x01\x04bad!" + _REPORT_FIELDS + b"\x00",  # invalid node id
        b"\x01\x00" + _REPORT_FIELDS + b"\x00",  # empty node id
        b"\x01\x02\xff\xfe" + _REPORT_FIELDS + b"\x00",  # not UTF-8
        b"\x01\x06node-c" + _REPORT_FIELDS + b"\x00\x00",  # trailing byte
        b"\x00\x00",  # trailing byte after "no report"
    ],
)
def test_rejects_malformed_believed_publisher(tail: bytes) -> None:
    receiver = Receiver("node-b", KEY)
    assert receiver.receive(_seal_body(_heartbeat_body(tail)), NOW) is RejectReason.MALFORMED
    assert receiver.last_seq("node-a") is None  # rejected: no state changed


def test_believed_publisher_validation_on_construction() -> None:
    with pytest.raises(CoordinationError, match="at most 16"):
        PublisherReport("node-c", 1, 1, 1, 0, MAX_REPORT_HOPS + 1)
    for bad in [
        ("bad id!", 1, 1, 1, 0, 0),
        ("node-c", -1, 1, 1, 0, 0),
        ("node-c", 1, 2**64, 1, 0, 0),
        ("node-c", 1, 1, -1, 0, 0),
        ("node-c", 1, 1, 1, 2**32, 0),
        ("node-c", 1, 1, 1, 0, True),
    ]:
        with pytest.raises(CoordinationError):
            PublisherReport(*bad)
    with pytest.raises(CoordinationError, match="PublisherReport"):
        heartbeat(believed_publisher=("node-c", 1))


def test_version_1_datagrams_are_rejected_as_unknown_version() -> None:
    # Version 2 added the believed publisher; a version 1 node's datagrams are counted, not used.
    assert PROTOCOL_VERSION == 2
    datagram = bytearray(make_sender().seal(heartbeat(), NOW))
    datagram[0] = 1
    assert Receiver("node-b", KEY).receive(bytes(datagram), NOW) is RejectReason.UNKNOWN_VERSION


@settings(max_examples=budget(200), deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, MAX_REPORT_HOPS),
)
def test_believed_publisher_round_trip_property(
    node_id: str, priority: int, term: int, seq: int, age_ms: int, hops: int
) -> None:
    report = PublisherReport(node_id, priority, term, seq, age_ms, hops)
    hb = heartbeat(believed_publisher=report)
    env = Receiver("zz-receiver", KEY).receive(make_sender().seal(hb, NOW), NOW)
    assert isinstance(env, Envelope) and env.payload == hb
