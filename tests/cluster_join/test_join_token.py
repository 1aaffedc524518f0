"""rustbalance.deploy.join_token (format 2: a master-signed join grant): round trips, every
damage class, fuzzing, secrecy."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.authority import decode_statement, grant_secret_hash
from rustbalance.crypto.keys import IdentityKey
from rustbalance.deploy.join_token import (
    DEFAULT_ARGON2,
    TOKEN_PREFIX,
    Argon2Params,
    JoinPayload,
    JoinTokenError,
    decode,
    encode_raw,
    encode_with_passphrase,
    token_needs_passphrase,
)
from rustbalance.errors import RustBalanceError
from tests.budget import budget

FAST = Argon2Params(memory_kib=8, time_cost=1, parallelism=1)
PASSPHRASE = "correct horse battery staple"
SEED = bytes(range(32))
MASTER = IdentityKey.from_seed(SEED)
OTHER = IdentityKey.from_seed(bytes(range(1, 33)))
NOW = 1_700_000_000


def rng(seed: int = 7) -> Callable[[int], bytes]:
    generator = random.Random(seed)
    return generator.randbytes


def payload(*, eligible: bool = True, lifetime: int = 3600, uses: int = 1) -> JoinPayload:
    return JoinPayload.issue(
        master_key=MASTER,
        issuer_node_id="node-1",
        now=NOW,
        randbytes=rng(99),
        lifetime_secs=lifetime,
        max_uses=uses,
        with_master_key=eligible,
    )


def raw_bytes(token: str) -> bytes:
    body = token[len(TOKEN_PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def reseal(data: bytes) -> str:
    """Re-encode binary token data with a fresh checksum, as a careful forger would."""
    body = data[:-4]
    body += hashlib.sha256(body).digest()[:4]
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def error_of(token: str, passphrase: str | None = PASSPHRASE, now: int = NOW + 10) -> str:
    with pytest.raises(JoinTokenError) as info:
        decode(token, passphrase, now=now)
    return str(info.value)


@pytest.fixture(scope="module")
def pass_token() -> str:
    return encode_with_passphrase(payload(), PASSPHRASE, rng(), FAST)


@pytest.fixture(scope="module")
def raw_token() -> str:
    return encode_raw(payload(), rng())


# --- round trips --------------------------------------------------------------------------------


def test_passphrase_round_trip(pass_token: str) -> None:
    assert pass_token.startswith("rbj2-")
    decoded = decode(pass_token, PASSPHRASE, now=NOW + 10)
    assert decoded == payload()
    assert decoded.master_onion == MASTER.onion_address
    grant = decoded.join_grant
    assert (grant.max_uses, grant.with_master_key, grant.issuer) == (1, True, "node-1")
    assert grant.secret_hash == grant_secret_hash(decoded.grant_secret)
    # The grant is signed with the master key: the responder checks that, not the token.
    assert decode_statement(decoded.grant, MASTER.public_key).content == grant
    assert decoded.issuer_node_id == "node-1"
    assert (decoded.created_at, decoded.expires_at) == (NOW, NOW + 3600)
    assert decoded.publisher_eligible
    assert decoded.master_key_seed == SEED
    assert token_needs_passphrase(pass_token)


def test_raw_round_trip_needs_no_passphrase(raw_token: str) -> None:
    assert not token_needs_passphrase(raw_token)
    assert decode(raw_token, None, now=NOW) == payload()
    # A passphrase given for a raw token is simply not used.
    assert decode(raw_token, "anything at all", now=NOW) == payload()


def test_raw_token_embeds_a_random_256_bit_key() -> None:
    one, two = encode_raw(payload(), rng(1)), encode_raw(payload(), rng(2))
    assert raw_bytes(one)[2:34] != raw_bytes(two)[2:34]
    assert raw_bytes(one)[1] == 2  # kind: raw


def test_tokens_are_randomised(pass_token: str) -> None:
    other = encode_with_passphrase(payload(), PASSPHRASE, rng(8), FAST)
    assert other != pass_token
    assert decode(other, PASSPHRASE, now=NOW) == decode(pass_token, PASSPHRASE, now=NOW)


def test_default_argon2_parameters_round_trip_and_are_in_the_header() -> None:
    assert (DEFAULT_ARGON2.memory_kib, DEFAULT_ARGON2.time_cost, DEFAULT_ARGON2.parallelism) == (
        64 * 1024,
        3,
        1,
    )
    token = encode_with_passphrase(payload(), PASSPHRASE, rng())
    data = raw_bytes(token)
    assert data[:2] == b"\x02\x01"
    assert struct.unpack(">III", data[18:30]) == (65536, 3, 1)
    assert decode(token, PASSPHRASE, now=NOW) == payload()


def test_raised_parameters_are_read_from_the_header() -> None:
    stronger = Argon2Params(memory_kib=64, time_cost=2, parallelism=2)
    token = encode_with_passphrase(payload(), PASSPHRASE, rng(), stronger)
    assert struct.unpack(">III", raw_bytes(token)[18:30]) == (64, 2, 2)
    assert decode(token, PASSPHRASE, now=NOW) == payload()


def test_passphrase_is_unicode_normalised() -> None:
    composed, decomposed = "caf\u00e9 au lait 1234", "cafe\u0301 au lait 1234"
    token = encode_with_passphrase(payload(), composed, rng(), FAST)
    assert decode(token, decomposed, now=NOW) == payload()


def test_whitespace_inside_a_wrapped_token_is_ignored(pass_token: str) -> None:
    wrapped = "\n".join(pass_token[i : i + 60] for i in range(0, len(pass_token), 60))
    assert decode(f"  {wrapped}\n", PASSPHRASE, now=NOW) == payload()


# --- publisher eligibility ----------------------------------------------------------------------


def test_by_default_a_token_carries_no_master_key() -> None:
    """Issue 16: the master key travels only when the operator asks for it."""
    issued = JoinPayload.issue(master_key=MASTER, issuer_node_id="n", now=NOW, randbytes=rng())
    assert issued.master_key_seed is None and not issued.join_grant.with_master_key
    assert issued.join_grant.max_uses == 1  # single-use by default


def test_master_key_absent_for_a_non_eligible_joiner() -> None:
    standby = payload(eligible=False)
    token = encode_raw(standby, rng())
    decoded = decode(token, None, now=NOW)
    assert decoded.master_key_seed is None
    assert not decoded.publisher_eligible
    # Decrypt by hand: the seed is not in the plaintext at all, not merely hidden by decode().
    data = raw_bytes(token)
    key, nonce = data[2:34], data[34:46]
    header_len = 2 + 32 + 12 + 4
    plaintext = AESGCM(key).decrypt(nonce, data[header_len:-4], data[:header_len])
    obj = json.loads(plaintext)
    assert "master_key_seed" not in obj
    assert base64.urlsafe_b64encode(SEED).rstrip(b"=") not in plaintext
    assert SEED.hex().encode() not in plaintext


def test_master_key_present_for_an_eligible_joiner(raw_token: str) -> None:
    assert decode(raw_token, None, now=NOW).master_key_seed == SEED


def test_seed_must_match_the_master_onion() -> None:
    good = payload()
    with pytest.raises(JoinTokenError, match="does not belong to master_onion"):
        JoinPayload(good.master_onion, good.grant, good.grant_secret, "node-1", bytes(32))


def test_grant_must_be_signed_by_the_master_key_and_match_its_secret() -> None:
    good = payload(eligible=False)
    foreign = JoinPayload.issue(master_key=OTHER, issuer_node_id="n", now=NOW, randbytes=rng())
    with pytest.raises(JoinTokenError, match="not signed by the master key"):
        JoinPayload(good.master_onion, foreign.grant, foreign.grant_secret, "node-1")
    with pytest.raises(JoinTokenError, match="does not belong to the grant"):
        JoinPayload(good.master_onion, good.grant, bytes(32), "node-1")
    with pytest.raises(JoinTokenError, match="exactly when the grant carries"):
        JoinPayload(good.master_onion, good.grant, good.grant_secret, "node-1", SEED)


# --- wrong passphrase and damage ----------------------------------------------------------------


def test_wrong_passphrase(pass_token: str) -> None:
    assert error_of(pass_token, "correct horse battery stapler") == (
        "wrong passphrase or damaged token"
    )


def test_missing_passphrase(pass_token: str) -> None:
    assert "protected by a passphrase" in error_of(pass_token, None)


def test_every_truncation_is_reported_as_truncated(pass_token: str) -> None:
    for cut in range(len(TOKEN_PREFIX), len(pass_token)):
        assert error_of(pass_token[:cut]) == "token is truncated", cut


def test_cut_inside_the_prefix(pass_token: str) -> None:
    for cut in range(len(TOKEN_PREFIX)):
        assert "not a RustBalance join token" in error_of(pass_token[:cut])


def test_every_single_character_change_is_detected(raw_token: str) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for index in range(len(TOKEN_PREFIX), len(raw_token)):
        replacement = alphabet[(alphabet.index(raw_token[index]) + 1) % len(alphabet)]
        damaged = raw_token[:index] + replacement + raw_token[index + 1 :]
        with pytest.raises(JoinTokenError):
            decode(damaged, None, now=NOW)


def test_checksum_mismatch(pass_token: str) -> None:
    data = bytearray(raw_bytes(pass_token))
    data[-1] ^= 0x01
    token = TOKEN_PREFIX + base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode()
    assert "checksum mismatch" in error_of(token)


def test_tampered_ciphertext_with_valid_checksum(pass_token: str) -> None:
    data = bytearray(raw_bytes(pass_token))
    data[60] ^= 0x80
    assert error_of(reseal(bytes(data))) == "wrong passphrase or damaged token"


def test_header_is_authenticated(pass_token: str) -> None:
    # Lowering the stored Argon2 cost (a downgrade) breaks the AEAD check.
    data = bytearray(raw_bytes(pass_token))
    data[18:30] = struct.pack(">III", 16, 1, 1)
    assert error_of(reseal(bytes(data))) == "wrong passphrase or damaged token"


def test_trailing_data(pass_token: str) -> None:
    assert "extra data" in error_of(pass_token + "A")
    data = raw_bytes(pass_token)
    assert "extra data" in error_of(reseal(data[:-4] + b"\x00\x00" + data[-4:]))


@pytest.mark.parametrize("version", [0, 1, 255])
def test_unsupported_header_version(pass_token: str, version: int) -> None:
    data = bytearray(raw_bytes(pass_token))
    data[0] = version
    assert error_of(reseal(bytes(data))) == f"unsupported token version {version}"


def test_unsupported_prefix_version(pass_token: str) -> None:
    assert error_of("rbj3-" + pass_token[len(TOKEN_PREFIX) :]) == "unsupported token version 3"


def test_a_protocol_v2_token_gets_a_clear_message(pass_token: str) -> None:
    message = error_of("rbj1-" + pass_token[len(TOKEN_PREFIX) :])
    assert "protocol v2 cluster" in message and "rustbalance cluster token" in message


def test_unknown_kind(pass_token: str) -> None:
    data = bytearray(raw_bytes(pass_token))
    data[1] = 9
    assert "unknown token kind 9" in error_of(reseal(bytes(data)))


@pytest.mark.parametrize(
    "fields",
    [(2**31, 3, 1), (4, 1, 1), (65536, 0, 1), (65536, 1000, 1), (65536, 3, 0), (65536, 3, 99)],
)
def test_argon2_parameters_out_of_range(pass_token: str, fields: tuple[int, int, int]) -> None:
    # Checked before any key derivation, so a hostile header cannot demand 2 TiB of memory.
    data = bytearray(raw_bytes(pass_token))
    data[18:30] = struct.pack(">III", *fields)
    assert "damaged token: Argon2" in error_of(reseal(bytes(data)))


def test_declared_length_shorter_than_tag(raw_token: str) -> None:
    data = raw_bytes(raw_token)
    header_len = 2 + 32 + 12 + 4
    forged = data[: header_len - 4] + struct.pack(">I", 3) + b"abc" + b"\x00" * 4
    assert "shorter than its tag" in error_of(reseal(forged), None)


@pytest.mark.parametrize("text", ["", "rbj2", "hello", "rbj2-!!!!", "rbj2-AAAA=", "RBJ2-AAAA"])
def test_malformed_text(text: str) -> None:
    with pytest.raises(JoinTokenError):
        decode(text, PASSPHRASE, now=NOW)


def test_non_canonical_base64() -> None:
    # Pick a payload whose encoding ends in a partial group, which has unused low bits.
    for issuer in ("n", "n1", "n12"):
        token = encode_raw(_issue(issuer_node_id=issuer), rng())
        if len(token[len(TOKEN_PREFIX) :]) % 4:
            break
    body = token[len(TOKEN_PREFIX) :]
    assert len(body) % 4 in (2, 3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # Flip a padding bit in the last character: the same bytes, spelled differently.
    forged = TOKEN_PREFIX + body[:-1] + alphabet[alphabet.index(body[-1]) ^ 1]
    assert raw_bytes(forged) == raw_bytes(token)
    assert "not canonical" in error_of(forged, None)


def test_far_too_long() -> None:
    assert "too long" in error_of("rbj2-" + "A" * 20000)


# --- expiry --------------------------------------------------------------------------------------


def test_expired(raw_token: str) -> None:
    assert decode(raw_token, None, now=NOW + 3599) == payload()
    assert error_of(raw_token, None, now=NOW + 3600).startswith("token expired")


def test_created_in_the_future(raw_token: str) -> None:
    assert "created in the future" in error_of(raw_token, None, now=NOW - 3600)
    assert decode(raw_token, None, now=NOW - 60) == payload()  # small skew is fine


# --- secrecy ------------------------------------------------------------------------------------


def test_repr_shows_no_secret() -> None:
    text = repr(payload()) + str(payload())
    assert MASTER.onion_address in text
    secret = payload().grant_secret
    for shown in (secret.hex(), repr(secret), SEED.hex(), repr(SEED)):
        assert shown not in text
    assert "publisher_eligible=True" in text
    assert "master_key_seed=None" in repr(payload(eligible=False))


def test_errors_do_not_echo_token_or_passphrase(pass_token: str) -> None:
    message = error_of(pass_token, "wrong-passphrase-1234")
    assert "wrong-passphrase-1234" not in message
    assert pass_token[10:30] not in message


def test_error_type_is_a_rustbalance_error() -> None:
    assert issubclass(JoinTokenError, RustBalanceError)


# --- payload validation -------------------------------------------------------------------------


def _issue(**overrides: object) -> JoinPayload:
    fields: dict[str, object] = {
        "master_key": MASTER,
        "issuer_node_id": "node-1",
        "now": NOW,
        "randbytes": rng(),
    }
    fields.update(overrides)
    return JoinPayload.issue(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"issuer_node_id": "node 1"}, "issuer"),
        ({"issuer_node_id": ""}, "issuer"),
        ({"lifetime_secs": 0}, "token lives"),
        ({"lifetime_secs": 31 * 86400}, "token lives"),
        ({"max_uses": 0}, "max_uses"),
        ({"max_uses": 1001}, "max_uses"),
        ({"randbytes": lambda n: b"\x00" * (n - 1)}, "randbytes"),
        ({"master_key": IdentityKey.from_expanded(MASTER.expanded), "with_master_key": True},
         "no seed"),
    ],
)  # fmt: skip
def test_payload_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(JoinTokenError, match=message):
        _issue(**overrides)


def test_short_passphrase_refused() -> None:
    with pytest.raises(JoinTokenError, match="at least 12"):
        encode_with_passphrase(payload(), "short", rng(), FAST)


def test_bad_parameters_refused_when_encoding() -> None:
    with pytest.raises(JoinTokenError, match="memory"):
        encode_with_passphrase(payload(), PASSPHRASE, rng(), Argon2Params(4, 1, 1))


def test_bad_randomness_source_refused() -> None:
    with pytest.raises(JoinTokenError, match="randbytes"):
        encode_raw(payload(), lambda n: b"\x00" * (n - 1))


# --- strict payload JSON ------------------------------------------------------------------------


def _json(**changes: object) -> bytes:
    obj = json.loads(payload().to_json())
    for key, value in changes.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


def test_json_round_trip_is_canonical() -> None:
    data = payload().to_json()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert JoinPayload.from_json(data) == payload()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"v":1,"v":1}', "duplicate"),
        (b'{"v":NaN}', "not valid JSON"),
        (_json(extra="x"), "unknown payload field 'extra'"),
        (_json(issuer=None), "lacks issuer"),
        (_json(v=1), "unsupported token version 1"),
        (_json(v=True), "unsupported token version True"),
        (_json(master_key_seed=None), "exactly when the grant carries"),
        (_json(master_key_seed="!!"), "not base64url"),
        (_json(grant="AAAA"), "grant"),
        (_json(grant_secret="AAAA"), "grant_secret"),
        (_json(issuer=7), "issuer_node_id"),
    ],
)
def test_from_json_rejects(data: bytes, message: str) -> None:
    with pytest.raises(JoinTokenError, match=message):
        JoinPayload.from_json(data)


# --- fuzzing ------------------------------------------------------------------------------------


@given(st.text(max_size=400))
@settings(max_examples=budget(400), deadline=None)
def test_fuzz_random_text_only_raises_join_token_error(text: str) -> None:
    with pytest.raises(JoinTokenError):
        decode(text, PASSPHRASE, now=NOW)


@given(st.binary(max_size=300))
@settings(max_examples=budget(400), deadline=None)
def test_fuzz_random_binary_after_prefix(data: bytes) -> None:
    text = TOKEN_PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    with pytest.raises(JoinTokenError):
        decode(text, PASSPHRASE, now=NOW)


@given(st.binary(min_size=1, max_size=300), st.sampled_from([1, 2]))
@settings(max_examples=budget(300), deadline=None)
def test_fuzz_structured_garbage_with_valid_checksum(data: bytes, kind: int) -> None:
    # Gets past the checksum, so the deeper parsing and the AEAD are exercised too.
    with pytest.raises(JoinTokenError):
        decode(reseal(bytes([2, kind]) + data + b"\x00" * 4), PASSPHRASE, now=NOW)


@given(st.data())
@settings(max_examples=budget(200), deadline=None)
def test_fuzz_mutated_valid_token(data: st.DataObject) -> None:
    token = encode_raw(payload(), rng())
    index = data.draw(st.integers(0, len(token) - 1))
    # Whitespace is excluded: it is ignored by design (wrapped tokens).
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: not c.isspace()))
    mutated = token[:index] + replacement + token[index + 1 :]
    if mutated == token:
        assert decode(mutated, None, now=NOW) == payload()
    else:
        with pytest.raises(JoinTokenError):
            decode(mutated, None, now=NOW)
