"""Layer encryption (rend-spec-v3 [HS-DESC-ENCRYPTION-KEYS]) and client authorization
(rend-spec-v3 [CLIENT-AUTH])."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.descriptor.client_auth import (
    AUTH_CLIENT_MULTIPLE,
    build_auth_clients,
    find_descriptor_cookie,
    x25519_public,
)
from rustbalance.descriptor.layers import (
    ENCRYPTED_CONSTANT,
    SUPERENCRYPTED_CONSTANT,
    decrypt_layer,
    encrypt_layer,
    pad_plaintext,
)
from rustbalance.errors import DescriptorError
from tests.budget import budget

from .helpers import rng

SECRET = b"\x11" * 32
SUBCRED = b"\x22" * 32


def test_blob_layout_matches_the_spec_formula() -> None:
    # Recompute the blob independently from rend-spec-v3 [HS-DESC-ENCRYPTION-KEYS].
    salt = b"\x33" * 16
    plaintext = b"create2-formats 2\n"
    blob = encrypt_layer(
        plaintext,
        secret_data=SECRET,
        subcredential=SUBCRED,
        revision_counter=7,
        salt=salt,
        constant=ENCRYPTED_CONSTANT,
    )
    keys = hashlib.shake_256(
        SECRET + SUBCRED + (7).to_bytes(8, "big") + salt + b"hsdir-encrypted-data"
    ).digest(80)
    enc = Cipher(algorithms.AES(keys[:32]), modes.CTR(keys[32:48])).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()
    mac = hashlib.sha3_256(
        (32).to_bytes(8, "big") + keys[48:] + (16).to_bytes(8, "big") + salt + ciphertext
    ).digest()
    assert blob == salt + ciphertext + mac


def test_decrypt_checks_mac_and_strips_nul_padding() -> None:
    blob = encrypt_layer(
        pad_plaintext(b"hello\n"),
        secret_data=SECRET,
        subcredential=SUBCRED,
        revision_counter=1,
        salt=b"\0" * 16,
        constant=SUPERENCRYPTED_CONSTANT,
    )
    assert len(blob) == 16 + 10_000 + 32

    def dec(data: bytes, revision: int, constant: bytes) -> bytes:
        return decrypt_layer(
            data,
            secret_data=SECRET,
            subcredential=SUBCRED,
            revision_counter=revision,
            constant=constant,
            what="layer",
        )

    assert dec(blob, 1, SUPERENCRYPTED_CONSTANT) == b"hello\n"
    with pytest.raises(DescriptorError, match="MAC"):
        dec(blob, 2, SUPERENCRYPTED_CONSTANT)
    with pytest.raises(DescriptorError, match="MAC"):
        dec(blob, 1, ENCRYPTED_CONSTANT)
    tampered = blob[:20] + bytes([blob[20] ^ 1]) + blob[21:]
    with pytest.raises(DescriptorError, match="MAC"):
        dec(tampered, 1, SUPERENCRYPTED_CONSTANT)
    with pytest.raises(DescriptorError, match="too short"):
        dec(blob[:48], 1, SUPERENCRYPTED_CONSTANT)


@pytest.mark.parametrize(("size", "padded"), [(1, 10_000), (10_000, 10_000), (10_001, 20_000)])
def test_padding_to_multiples_of_10000(size: int, padded: int) -> None:
    # tor hs_descriptor.c compute_padded_plaintext_length: CEIL_DIV(len, 10000) * 10000.
    assert len(pad_plaintext(b"x" * size)) == padded


def test_client_auth_entries_deliver_the_cookie_only_to_authorized_clients() -> None:
    randbytes = rng(5)
    client_secrets = [randbytes(32) for _ in range(3)]
    outsider = randbytes(32)
    ephemeral = randbytes(32)
    cookie = randbytes(16)
    entries = build_auth_clients(
        subcredential=SUBCRED,
        ephemeral_secret=ephemeral,
        client_public_keys=[x25519_public(s) for s in client_secrets],
        descriptor_cookie=cookie,
        randbytes=randbytes,
    )
    assert len(entries) == AUTH_CLIENT_MULTIPLE
    for secret in client_secrets:
        found = find_descriptor_cookie(
            entries,
            subcredential=SUBCRED,
            ephemeral_public=x25519_public(ephemeral),
            client_secret=secret,
        )
        assert found == cookie
    assert (
        find_descriptor_cookie(
            entries,
            subcredential=SUBCRED,
            ephemeral_public=x25519_public(ephemeral),
            client_secret=outsider,
        )
        is None
    )


def test_client_auth_formula_matches_the_spec() -> None:
    # rend-spec-v3 [CLIENT-AUTH]: KEYS = SHAKE256(subcred | x25519(eph_sk, client_pk), 40).
    from nacl.bindings import crypto_scalarmult

    eph, client = b"\x05" * 32, b"\x09" * 32
    cookie = b"\x42" * 16
    iv_random = rng(9)
    entries = build_auth_clients(
        subcredential=SUBCRED,
        ephemeral_secret=eph,
        client_public_keys=[x25519_public(client)],
        descriptor_cookie=cookie,
        randbytes=iv_random,
    )
    keys = hashlib.shake_256(SUBCRED + crypto_scalarmult(eph, x25519_public(client))).digest(40)
    real = [e for e in entries if e.client_id == keys[:8]]
    assert len(real) == 1
    dec = Cipher(algorithms.AES(keys[8:]), modes.CTR(real[0].iv)).decryptor()
    assert dec.update(real[0].encrypted_cookie) == cookie


@settings(max_examples=budget(200), deadline=None)
@given(st.integers(0, 40))
def test_auth_client_count_is_padded_to_a_multiple_of_16(n_clients: int) -> None:
    randbytes = rng(n_clients)
    entries = build_auth_clients(
        subcredential=SUBCRED,
        ephemeral_secret=randbytes(32),
        client_public_keys=[x25519_public(randbytes(32)) for _ in range(n_clients)],
        descriptor_cookie=randbytes(16) if n_clients else None,
        randbytes=randbytes,
    )
    assert len(entries) % 16 == 0
    assert len(entries) == max(16, -(-n_clients // 16) * 16)
