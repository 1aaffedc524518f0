"""Identity keys: expansion, signing, key files (tor's HiddenServiceDir, seed, PEM)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.keys import (
    PUBLIC_KEY_HEADER,
    SECRET_KEY_HEADER,
    IdentityKey,
    load_identity_key,
    parse_identity_key,
    sign_expanded,
    write_hidden_service_dir,
    write_seed_key_file,
)
from rustbalance.errors import InvalidKeyError
from tests.budget import budget

# tor src/test/ed25519_vectors.inc (torproject/tor commit 7ca470e13c70): seed, expanded secret
# key, public key and the Ed25519 signature of the public key by itself ("self-signature").
TOR_VECTORS = [
    (
        "26c76712d89d906e6672dafa614c42e5cb1caac8c6568e4d2493087db51f0d36",
        "c0a4de23cc64392d85aa1da82b3defddbea946d13bb053bf8489fa9296281f49"
        "5022f1f7ec0dcf52f07d4c7965c4eaed121d5d88d0a8ff546b06116a20e97755",
        "c2247870536a192d142d056abefca68d6193158e7c1a59c1654c954eccaff894",
        "d23188eac3773a316d46006fa59c095060be8b1a23582a0dd99002a82a0662bd"
        "246d8449e172e04c5f46ac0d1404cebe4aabd8a75a1457aa06cae41f3334f104",
    ),
    (
        "fba7a5366b5cb98c2667a18783f5cf8f4f8d1a2ce939ad22a6e685edde85128d",
        "18a8a69a06790dac778e882f7e868baacfa12521a5c058f5194f3a729184514a"
        "2a656fe7799c3e41f43d756da8d9cd47a061316cfe6147e23ea2f90d1ca45f30",
        "1519a3b15816a1aafab0b213892026ebf5c0dc232c58b21088d88cb90e9b940d",
        "3a785ac1201c97ee5f6f0d99323960d5f264c7825e61aa7cc81262f15bef75eb"
        "4fa5723add9b9d45b12311b6d403eb3ac79ff8e4e631fc3cd51e4ad2185b200b",
    ),
    (
        "c6bbcce615839756aed2cc78b1de13884dd3618f48367a17597a16c1cd7a290b",
        "b003077c1e52a62308eef7950b2d532e1d4a7eea50ad22d8ac11b892851f1c40"
        "ffb9c9ff8dcd0c6c233f665a2e176324d92416bfcfcd1f787424c0c667452d86",
        "95126f14d86494020665face03f2d42ee2b312a85bc729903eb17522954a1c4a",
        "815213640a643d198bd056e02bba74e1c8d2d931643e84497adf3347eb485079"
        "c9afe0afce9284cdc084946b561abbb214f1304ca11228ff82702185cf28f60d",
    ),
]

SEED = bytes(range(32))


@pytest.mark.parametrize(("seed", "expanded", "public", "self_sig"), TOR_VECTORS)
def test_tor_ed25519_vectors(seed: str, expanded: str, public: str, self_sig: str) -> None:
    key = IdentityKey.from_seed(bytes.fromhex(seed))
    assert key.expanded.hex() == expanded
    assert key.public_key.hex() == public
    assert key.sign(key.public_key).hex() == self_sig
    from_expanded = IdentityKey.from_expanded(bytes.fromhex(expanded))
    assert from_expanded.public_key.hex() == public
    assert from_expanded.seed is None
    assert from_expanded.sign(from_expanded.public_key).hex() == self_sig


def test_signatures_match_and_verify_with_cryptography() -> None:
    key = IdentityKey.from_seed(SEED)
    reference = Ed25519PrivateKey.from_private_bytes(SEED)
    for message in (b"", b"x", b"Tor onion service descriptor sig v3" + bytes(300)):
        signature = key.sign(message)
        assert signature == reference.sign(message)  # Ed25519 is deterministic
        Ed25519PublicKey.from_public_bytes(key.public_key).verify(signature, message)


def test_generate_uses_injected_randomness() -> None:
    key = IdentityKey.generate(lambda n: b"\x07" * n)
    assert key == IdentityKey.from_seed(b"\x07" * 32)
    assert key.seed == b"\x07" * 32


def test_repr_never_shows_secrets() -> None:
    key = IdentityKey.from_seed(SEED)
    text = repr(key)
    assert "public_key" in text
    for secret in (key.scalar, key.prf_secret, SEED):
        assert repr(secret) not in text
        assert secret.hex() not in text


def test_sign_expanded_refuses_public_or_empty_nonce_prefix() -> None:
    key = IdentityKey.from_seed(SEED)
    with pytest.raises(InvalidKeyError, match="PRF"):
        sign_expanded(key.scalar, bytes(32), key.public_key, b"m")
    with pytest.raises(InvalidKeyError, match="PRF"):
        sign_expanded(key.scalar, key.public_key, key.public_key, b"m")
    with pytest.raises(InvalidKeyError, match="PRF"):
        sign_expanded(key.scalar, b"", key.public_key, b"m")


def test_from_expanded_checks_public_key() -> None:
    key = IdentityKey.from_seed(SEED)
    other = IdentityKey.from_seed(b"\x01" * 32)
    assert IdentityKey.from_expanded(key.expanded, key.public_key).public_key == key.public_key
    with pytest.raises(InvalidKeyError, match="does not match"):
        IdentityKey.from_expanded(key.expanded, other.public_key)


def test_from_expanded_rejects_unclamped_scalar() -> None:
    libsodium_style = SEED + IdentityKey.from_seed(SEED).public_key
    if libsodium_style[0] & 7 == 0 and libsodium_style[31] & 0xC0 == 0x40:
        pytest.fail("test seed unexpectedly looks clamped")
    with pytest.raises(InvalidKeyError, match="not clamped"):
        IdentityKey.from_expanded(libsodium_style)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_from_seed_rejects_wrong_size(size: int) -> None:
    with pytest.raises(InvalidKeyError, match="32 bytes"):
        IdentityKey.from_seed(b"\x01" * size)


# ---------------------------------------------------------------- key files


def test_hidden_service_dir_written_like_tor(tmp_path: Path) -> None:
    key = IdentityKey.from_seed(SEED)
    hs_dir = tmp_path / "hs"
    write_hidden_service_dir(key, hs_dir)
    assert stat.S_IMODE(hs_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in hs_dir.iterdir())
    assert names == ["hostname", "hs_ed25519_public_key", "hs_ed25519_secret_key"]
    for path in hs_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = (hs_dir / "hs_ed25519_secret_key").read_bytes()
    assert len(secret) == 96
    assert secret[:32] == b"== ed25519v1-secret: type0 ==\0\0\0"
    assert secret[32:] == key.scalar + key.prf_secret
    public = (hs_dir / "hs_ed25519_public_key").read_bytes()
    assert public == b"== ed25519v1-public: type0 ==\0\0\0" + key.public_key
    hostname = (hs_dir / "hostname").read_text()
    assert hostname == key.onion_address + "\n" and len(hostname) == 63
    loaded = load_identity_key(hs_dir / "hs_ed25519_secret_key")
    assert loaded.public_key == key.public_key
    assert loaded.scalar == key.scalar and loaded.prf_secret == key.prf_secret
    assert loaded.seed is None


def test_hidden_service_dir_tightens_existing_dir_and_overwrites(tmp_path: Path) -> None:
    hs_dir = tmp_path / "hs"
    hs_dir.mkdir(mode=0o755)
    write_hidden_service_dir(IdentityKey.from_seed(b"\x01" * 32), hs_dir)
    key = IdentityKey.from_seed(SEED)
    write_hidden_service_dir(key, hs_dir)
    assert stat.S_IMODE(hs_dir.stat().st_mode) == 0o700
    assert load_identity_key(hs_dir / "hs_ed25519_secret_key").public_key == key.public_key
    assert not [p for p in hs_dir.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_hidden_service_dir_never_world_readable_under_permissive_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        write_hidden_service_dir(IdentityKey.from_seed(SEED), tmp_path / "hs")
    finally:
        os.umask(old)
    for path in (tmp_path / "hs").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_hidden_service_dir_unwritable_raises_invalid_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(InvalidKeyError, match="cannot write"):
        write_hidden_service_dir(IdentityKey.from_seed(SEED), blocker / "hs")


def test_seed_file_round_trip_and_refuses_overwrite(tmp_path: Path) -> None:
    key = IdentityKey.from_seed(SEED)
    path = tmp_path / "master.key"
    write_seed_key_file(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == SEED
    assert load_identity_key(path) == key
    with pytest.raises(InvalidKeyError, match="refusing to overwrite"):
        write_seed_key_file(IdentityKey.from_seed(b"\x02" * 32), path)
    assert path.read_bytes() == SEED


def test_seed_file_needs_a_seed(tmp_path: Path) -> None:
    key = IdentityKey.from_expanded(IdentityKey.from_seed(SEED).expanded)
    with pytest.raises(InvalidKeyError, match="no seed"):
        write_seed_key_file(key, tmp_path / "master.key")


def test_load_pem_pkcs8(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.from_private_bytes(SEED)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "onionbalance.key"
    path.write_bytes(pem)
    assert load_identity_key(path) == IdentityKey.from_seed(SEED)


def test_load_encrypted_pem_is_a_clear_error(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.from_private_bytes(SEED)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = tmp_path / "enc.key"
    path.write_bytes(pem)
    with pytest.raises(InvalidKeyError, match="password"):
        load_identity_key(path)


def test_load_pem_of_other_algorithm_rejected() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidKeyError, match="not an Ed25519"):
        parse_identity_key(pem)


def test_tor_key_with_mismatched_public_file(tmp_path: Path) -> None:
    key = IdentityKey.from_seed(SEED)
    write_hidden_service_dir(key, tmp_path)
    other = IdentityKey.from_seed(b"\x09" * 32)
    (tmp_path / "hs_ed25519_public_key").write_bytes(PUBLIC_KEY_HEADER + other.public_key)
    with pytest.raises(InvalidKeyError, match="does not match"):
        load_identity_key(tmp_path / "hs_ed25519_secret_key")


def test_tor_key_without_public_file_derives_it(tmp_path: Path) -> None:
    key = IdentityKey.from_seed(SEED)
    write_hidden_service_dir(key, tmp_path)
    (tmp_path / "hs_ed25519_public_key").unlink()
    assert load_identity_key(tmp_path / "hs_ed25519_secret_key").public_key == key.public_key


def test_raw_expanded_key_with_pub_companion(tmp_path: Path) -> None:
    key = IdentityKey.from_seed(SEED)
    path = tmp_path / "master.expanded"
    path.write_bytes(key.expanded)
    (tmp_path / "master.expanded.pub").write_bytes(key.public_key)
    assert load_identity_key(path).public_key == key.public_key
    (tmp_path / "master.expanded.pub").write_bytes(IdentityKey.from_seed(bytes(32)).public_key)
    with pytest.raises(InvalidKeyError, match="does not match"):
        load_identity_key(path)


def test_bad_header_rejected() -> None:
    key = IdentityKey.from_seed(SEED)
    data = b"== ed25519v1-secret: type1 ==\0\0\0" + key.expanded
    with pytest.raises(InvalidKeyError, match="bad header"):
        parse_identity_key(data)


def test_bad_public_header_rejected() -> None:
    key = IdentityKey.from_seed(SEED)
    with pytest.raises(InvalidKeyError, match="bad header"):
        parse_identity_key(SECRET_KEY_HEADER + key.expanded, b"\0" * 32 + key.public_key)


def test_public_key_file_given_as_secret_key() -> None:
    key = IdentityKey.from_seed(SEED)
    with pytest.raises(InvalidKeyError, match="public key file"):
        parse_identity_key(PUBLIC_KEY_HEADER + key.public_key)


@pytest.mark.parametrize("size", [0, 1, 31, 33, 63, 65, 95, 97, 200])
def test_wrong_size_rejected(size: int) -> None:
    with pytest.raises(InvalidKeyError, match="unrecognised key file"):
        parse_identity_key(b"\x11" * size)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError, match="cannot read"):
        load_identity_key(tmp_path / "missing.key")
    with pytest.raises(InvalidKeyError, match="cannot read"):
        load_identity_key(tmp_path)  # a directory


def test_huge_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"\0" * 100_000)
    with pytest.raises(InvalidKeyError, match="too large"):
        load_identity_key(path)


@settings(max_examples=budget(400), deadline=None)
@given(st.binary(max_size=200), st.none() | st.binary(max_size=80))
def test_parse_arbitrary_bytes_only_raises_invalid_key(data: bytes, public: bytes | None) -> None:
    try:
        key = parse_identity_key(data, public)
    except InvalidKeyError:
        return
    assert len(key.public_key) == 32


@settings(max_examples=budget(200), deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=100))
def test_round_trips_and_signatures_verify(seed: bytes, message: bytes) -> None:
    key = IdentityKey.from_seed(seed)
    assert parse_identity_key(seed) == key
    tor = parse_identity_key(SECRET_KEY_HEADER + key.expanded, PUBLIC_KEY_HEADER + key.public_key)
    assert (tor.public_key, tor.scalar, tor.prf_secret) == (
        key.public_key,
        key.scalar,
        key.prf_secret,
    )
    signature = tor.sign(message)
    assert signature == key.sign(message)
    Ed25519PublicKey.from_public_bytes(key.public_key).verify(signature, message)


@settings(max_examples=budget(200), deadline=None)
@given(st.integers(min_value=0, max_value=63), st.integers(min_value=1, max_value=255))
def test_corrupted_tor_key_file_is_detected(position: int, xor: int) -> None:
    # Header and scalar damage is caught (header check, clamping, a·G != A); the PRF half
    # (bytes 64-95) has no redundancy in tor's format and cannot be checked.
    key = IdentityKey.from_seed(SEED)
    data = bytearray(SECRET_KEY_HEADER + key.expanded)
    data[position] ^= xor
    try:
        loaded = parse_identity_key(bytes(data), PUBLIC_KEY_HEADER + key.public_key)
    except InvalidKeyError:
        return
    pytest.fail(f"corrupted key file accepted: {loaded.onion_address}")


@settings(max_examples=budget(300), deadline=None)
@given(
    st.sampled_from([b"-----BEGIN PRIVATE KEY-----\n", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"]),
    st.binary(max_size=120),
    st.booleans(),
)
def test_malformed_pem_only_raises_invalid_key(header: bytes, body: bytes, b64: bool) -> None:
    payload = base64.encodebytes(body) if b64 else body
    tail = header.replace(b"BEGIN", b"END")
    with pytest.raises(InvalidKeyError):
        parse_identity_key(header + payload + tail)
