"""Microdesc consensus and microdescriptor parsing.

Test data: tests/data/consensus_microdesc.txt and consensus_microdescs.txt are synthetic
documents in the format of dir-spec §3.4.1 / §3.3 as tor 0.4.9 writes them on a 20 s test network
(3 authorities + 4 relays), generated once with real RSA-1024 onion keys; their "m" lines
are the SHA-256 of the microdescriptor bodies. stem 1.8 is used as an independent decoder: it
accepts both documents with validation on, and its microdescriptor digests must equal ours and
the consensus "m" lines.
"""

from __future__ import annotations

import base64
import calendar
import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import stem.descriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.time_period import TimeParams, descriptor_targets
from rustbalance.errors import ConsensusError
from rustbalance.tor.consensus import (
    Consensus,
    HSDirParams,
    get_param,
    hsdir_params,
    hsdir_relays,
    parse_consensus,
    parse_microdescriptors,
    time_params,
)
from tests.budget import budget

DATA = Path(__file__).parent.parent / "data"
CONSENSUS_TEXT = (DATA / "consensus_microdesc.txt").read_text()
MDS_TEXT = (DATA / "consensus_microdescs.txt").read_text()


def utc(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def with_params(params: dict[str, int], voting: int = 20) -> Consensus:
    return Consensus(
        valid_after=utc("2025-06-01 12:00:00"),
        fresh_until=utc("2025-06-01 12:00:00") + voting,
        valid_until=utc("2025-06-01 12:00:00") + 2 * voting,
        params=params,
        srv_current=None,
        srv_previous=None,
        relays=(),
    )


# --------------------------------------------------------------------------- consensus


def test_header_fields() -> None:
    consensus = parse_consensus(CONSENSUS_TEXT)
    assert consensus.valid_after == utc("2025-06-01 12:04:00")
    assert consensus.fresh_until == utc("2025-06-01 12:04:20")
    assert consensus.valid_until == utc("2025-06-01 12:04:40")
    assert consensus.voting_interval == 20
    assert consensus.params == {"AuthDirMaxServersPerAddr": 0, "hsdir_spread_store": 3}


def test_agrees_with_stem() -> None:
    consensus = parse_consensus(CONSENSUS_TEXT)
    doc = next(
        stem.descriptor.parse_file(
            io.BytesIO(CONSENSUS_TEXT.encode()),
            "network-status-microdesc-consensus-3 1.0",
            validate=True,
            document_handler="DOCUMENT",
        )
    )
    assert consensus.srv_current == base64.b64decode(doc.shared_randomness_current_value)
    assert consensus.srv_previous == base64.b64decode(doc.shared_randomness_previous_value)
    assert len(consensus.relays) == len(doc.routers) == 7
    for relay in consensus.relays:
        theirs = doc.routers[relay.fingerprint]
        assert relay.nickname == theirs.nickname
        assert (relay.address, relay.or_port, relay.dir_port) == (
            theirs.address,
            theirs.or_port,
            theirs.dir_port or 0,
        )
        assert relay.flags == frozenset(theirs.flags)
        assert relay.microdesc_digest == base64.b64decode(theirs.microdescriptor_digest + "=")
        assert {k: sorted(v) for k, v in relay.protocols.items()} == {
            k: sorted(v) for k, v in theirs.protocols.items()
        }


def test_relay_entry_details() -> None:
    relay = parse_consensus(CONSENSUS_TEXT).relays[3]
    assert relay.nickname == "relay003"
    assert len(relay.identity) == 20
    assert relay.fingerprint == relay.identity.hex().upper()
    assert relay.ipv6_addresses == ("[::1]:5004",)
    assert relay.supports("HSDir", 2)
    assert relay.supports("LinkAuth", 3)
    assert not relay.supports("LinkAuth", 2)
    assert not relay.supports("Unknown", 1)


def test_accepts_crlf_and_bytes() -> None:
    expected = parse_consensus(CONSENSUS_TEXT)
    assert parse_consensus(CONSENSUS_TEXT.replace("\n", "\r\n")) == expected
    assert parse_consensus(CONSENSUS_TEXT.encode()) == expected


def test_missing_srvs_are_none() -> None:
    text = "\n".join(
        line for line in CONSENSUS_TEXT.split("\n") if not line.startswith("shared-rand-")
    )
    consensus = parse_consensus(text)
    assert consensus.srv_current is None
    assert consensus.srv_previous is None


def replace_line(prefix: str, new: str) -> str:
    lines = CONSENSUS_TEXT.split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines[index] = new
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("prefix", "new", "message"),
    [
        ("network-status-version", "network-status-version 3", "microdesc"),
        ("network-status-version", "network-status-version 2 microdesc", "version 3"),
        ("vote-status", "vote-status vote", "vote-status"),
        ("valid-after", "valid-after 2025-06-01", "valid-after"),
        ("valid-after", "valid-after 2025-13-01 12:04:00", "valid-after"),
        ("fresh-until", "fresh-until 2025-06-01 12:03:00", "fresh-until"),
        ("valid-until", "valid-until 2025-06-01 12:04:10", "valid-until"),
        ("params", "params hsdir_spread_store", "Keyword=Value"),
        ("params", "params hsdir_spread_store=3000000000", "out of range"),
        ("params", "params hsdir_spread_store=x", "not an integer"),
        ("params", "params hsdir_spread_store=\u0661\u0662", "not an integer"),
        ("shared-rand-current-value", "shared-rand-current-value 3", "NumReveals"),
        ("shared-rand-current-value", "shared-rand-current-value 3 AAAA", "32 bytes"),
        ("shared-rand-previous-value", "shared-rand-previous-value x " + "A" * 43 + "=", "integer"),
        ("r auth000", "r auth000 xRBk 2038-01-01 00:00:00 127.0.0.1 5001 7001", "identity"),
        ("r auth000", "r auth000 only three", "r line"),
        (
            "r auth001",
            "r bad-nick AAAAAAAAAAAAAAAAAAAAAAAAAAA 2038-01-01 00:00:00 1.2.3.4 1 0",
            "nickname",
        ),
        ("r auth001", "r n AAAAAAAAAAAAAAAAAAAAAAAAAAA 2038-01-01 00:00:00 1.2.3 1 0", "IPv4"),
        (
            "r auth001",
            "r n AAAAAAAAAAAAAAAAAAAAAAAAAAA 2038-01-01 00:00:00 1.2.3.4 70000 0",
            "ORPort",
        ),
        ("m ", "m !!!", "base64"),
        ("m ", "m", "digest"),
        ("pr ", "pr HSDir=2-1", "reversed"),
        ("pr ", "pr HSDir=64", "out of range"),
        ("pr ", "pr HSDir", "Name=versions"),
        ("s ", "s Fast\ns Valid", "duplicate s"),
    ],
)
def test_malformed_consensus(prefix: str, new: str, message: str) -> None:
    with pytest.raises(ConsensusError, match=message) as info:
        parse_consensus(replace_line(prefix, new))
    if "line" not in message:
        assert "line" in str(info.value)


def test_malformed_consensus_structure() -> None:
    with pytest.raises(ConsensusError, match="empty"):
        parse_consensus("")
    with pytest.raises(ConsensusError, match="no valid-until"):
        parse_consensus(replace_line("valid-until", "x"))
    with pytest.raises(ConsensusError, match="duplicate valid-after"):
        parse_consensus(replace_line("fresh-until", "valid-after 2025-06-01 12:04:00"))
    without_m = "\n".join(line for line in CONSENSUS_TEXT.split("\n") if not line.startswith("m "))
    with pytest.raises(ConsensusError, match="no m line"):
        parse_consensus(without_m)
    unclosed = CONSENSUS_TEXT.replace("-----END SIGNATURE-----", "")
    with pytest.raises(ConsensusError, match="never closed"):
        parse_consensus(unclosed)


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=400))
def test_fuzz_consensus_raises_only_consensus_error(text: str) -> None:
    try:
        consensus = parse_consensus("network-status-version 3 microdesc\n" + text)
    except ConsensusError as exc:
        assert str(exc)
        return
    assert consensus.voting_interval > 0


@settings(max_examples=budget(300), deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(CONSENSUS_TEXT) - 1),
    garbage=st.text(alphabet=" \n=-+/09AZaz:.@r", max_size=12),
)
def test_fuzz_mutated_consensus_raises_only_consensus_error(position: int, garbage: str) -> None:
    try:
        consensus = parse_consensus(
            CONSENSUS_TEXT[:position] + garbage + CONSENSUS_TEXT[position + 1 :]
        )
    except ConsensusError as exc:
        assert str(exc)
        return
    assert consensus.valid_after <= consensus.fresh_until <= consensus.valid_until
    assert all(len(r.microdesc_digest) == 32 and len(r.identity) == 20 for r in consensus.relays)


# --------------------------------------------------------------------------- parameters


def test_hsdir_params_defaults_and_values() -> None:
    assert hsdir_params(with_params({})) == HSDirParams(2, 4, 3)
    assert hsdir_params(parse_consensus(CONSENSUS_TEXT)) == HSDirParams(2, 3, 3)


def test_hsdir_params_are_clamped_like_tor() -> None:
    params = {"hsdir_n_replicas": 0, "hsdir_spread_store": 500, "hsdir_spread_fetch": -4}
    assert hsdir_params(with_params(params)) == HSDirParams(1, 128, 1)
    assert hsdir_params(with_params({"hsdir_n_replicas": 17})).n_replicas == 16
    assert get_param(with_params({"x": 7}), "x", 1, 0, 10) == 7


def test_time_params_test_network() -> None:
    assert time_params(parse_consensus(CONSENSUS_TEXT)) == TimeParams(8, 4, 20)
    assert time_params(with_params({}, voting=10)) == TimeParams(4, 2, 10)


def test_time_params_live_network() -> None:
    assert time_params(with_params({}, voting=3600)) == TimeParams(1440, 720, 3600)


def test_time_params_hsdir_interval_param() -> None:
    assert time_params(with_params({"hsdir_interval": 720}, voting=3600)).period_length_minutes == (
        720
    )
    # hs_common.h HS_TIME_PERIOD_LENGTH_MIN / MAX.
    assert time_params(with_params({"hsdir_interval": 5}, voting=3600)).period_length_minutes == 30
    assert (
        time_params(with_params({"hsdir_interval": 10**6}, voting=3600)).period_length_minutes
        == 14400
    )


def test_time_params_rejects_tiny_voting_interval() -> None:
    with pytest.raises(ConsensusError, match="too short"):
        time_params(with_params({}, voting=2))


def test_consensus_drives_descriptor_targets() -> None:
    consensus = parse_consensus(CONSENSUS_TEXT)
    params = time_params(consensus)
    first, second = descriptor_targets(
        consensus.valid_after, params, consensus.srv_current, consensus.srv_previous
    )
    # 12:04:00 is the start of the second half of an 8-minute SR run (segment B).
    assert first.srv == consensus.srv_previous
    assert second.srv == consensus.srv_current
    assert second.time_period == first.time_period + 1
    assert second.srv_run_start == utc("2025-06-01 12:00:00")


# --------------------------------------------------------------------------- microdescriptors


def test_microdescriptor_digests_match_stem_and_consensus() -> None:
    mds = parse_microdescriptors(MDS_TEXT)
    theirs = list(stem.descriptor.parse_file(io.BytesIO(MDS_TEXT.encode()), "microdescriptor 1.0"))
    assert set(mds) == {
        base64.b64decode(md.digest(stem.descriptor.DigestHash.SHA256).rstrip("=") + "=")
        for md in theirs
    }
    consensus = parse_consensus(CONSENSUS_TEXT)
    assert {relay.microdesc_digest for relay in consensus.relays} == set(mds)
    for md in theirs:
        digest = base64.b64decode(md.digest(stem.descriptor.DigestHash.SHA256) + "=")
        ed = md.identifiers.get("ed25519")
        expected = base64.b64decode(ed + "=") if ed else None
        assert mds[digest].ed25519_id == expected


def test_microdescriptors_with_and_without_annotations() -> None:
    plain = "\n".join(line for line in MDS_TEXT.split("\n") if not line.startswith("@"))
    expected = parse_microdescriptors(MDS_TEXT)
    assert parse_microdescriptors(plain) == expected
    assert parse_microdescriptors(plain.replace("\n", "\r\n")) == expected
    # A data block whose last newline was eaten still hashes like tor's stored body.
    assert parse_microdescriptors(plain.rstrip("\n")) == expected
    assert parse_microdescriptors("") == {}


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda t: "garbage\n" + t, "before the first onion-key"),
        (lambda t: t.replace("id ed25519 ", "id ed25519 !", 1), "base64"),
        (lambda t: t.replace("id ed25519 ", "id ed25519\nx ", 1), "type and a value"),
        (
            lambda t: t.replace("ntor-onion-key ", "ntor-onion-key AAAA\nntor-onion-key ", 1),
            "32 bytes",
        ),
        (
            lambda t: t.replace("p accept", "ntor-onion-key " + "A" * 43 + "\np accept", 1),
            "duplicate ntor-onion-key",
        ),
        (
            lambda t: t.replace("id rsa1024", "id ed25519 " + "A" * 43 + "\nid rsa1024", 1),
            "extra ed25519",
        ),
        (lambda t: t.replace("-----END RSA PUBLIC KEY-----", "", 1), "never closed"),
    ],
)
def test_malformed_microdescriptors(mutation: Callable[[str], str], message: str) -> None:
    with pytest.raises(ConsensusError, match=message) as info:
        parse_microdescriptors(mutation(MDS_TEXT))
    assert "line" in str(info.value)


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=400))
def test_fuzz_microdescriptors_raise_only_consensus_error(text: str) -> None:
    try:
        mds = parse_microdescriptors("onion-key\n" + text)
    except ConsensusError as exc:
        assert str(exc)
        return
    assert all(md.ed25519_id is None or len(md.ed25519_id) == 32 for md in mds.values())
    assert len(mds) >= 1


# --------------------------------------------------------------------------- HSDir set


def test_hsdir_relays_filters_like_tor() -> None:
    consensus = parse_consensus(CONSENSUS_TEXT)
    mds = parse_microdescriptors(MDS_TEXT)
    relays = hsdir_relays(consensus, mds)
    # relay004 lacks the HSDir flag, relay005 only speaks HSDir=1, relay006's microdescriptor
    # has no ed25519 id.
    assert [r.nickname for r in relays] == ["auth000", "auth001", "auth002", "relay003"]
    by_nick = {r.nickname: r for r in consensus.relays}
    for relay in relays:
        status = by_nick[relay.nickname]
        assert relay.fingerprint == status.fingerprint
        assert relay.ed25519_id == mds[status.microdesc_digest].ed25519_id


def test_hsdir_relays_skips_relays_without_microdescriptor() -> None:
    consensus = parse_consensus(CONSENSUS_TEXT)
    assert hsdir_relays(consensus, {}) == []
