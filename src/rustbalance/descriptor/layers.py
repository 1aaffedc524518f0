"""The two encryption layers of a v3 descriptor (rend-spec-v3 [HS-DESC-ENCRYPTION-KEYS],
tor ``src/feature/hs/hs_descriptor.c`` ``encrypt_descriptor_data`` / ``decrypt_desc_layer``).

::

    secret_input = SECRET_DATA | N_hs_subcred | INT_8(revision_counter)
    keys = SHAKE256(secret_input | SALT | STRING_CONSTANT, 32 + 16 + 32)
    SECRET_KEY = keys[:32]; SECRET_IV = keys[32:48]; MAC_KEY = keys[48:]
    blob = SALT | AES-256-CTR(SECRET_KEY, SECRET_IV, plaintext)
                | SHA3-256(INT_8(32) | MAC_KEY | INT_8(16) | SALT | ciphertext)

Only the first (superencrypted) layer is NUL padded before encryption, to a multiple of
``HS_DESC_SUPERENC_PLAINTEXT_PAD_MULTIPLE`` = 10 000 bytes (``build_encrypted``: "If we are
encrypting the middle layer of the descriptor, we need to first pad the plaintext"; "No padding
required for inner layers"). On decryption tor cuts the plaintext at its first NUL byte.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from rustbalance.errors import DescriptorError

__all__ = [
    "ENCRYPTED_CONSTANT",
    "PAD_MULTIPLE",
    "SALT_LENGTH",
    "SUPERENCRYPTED_CONSTANT",
    "decrypt_layer",
    "encrypt_layer",
    "pad_plaintext",
]

# rend-spec-v3 [HS-DESC-FIRST-LAYER] / [HS-DESC-SECOND-LAYER] string constants.
SUPERENCRYPTED_CONSTANT = b"hsdir-superencrypted-data"
ENCRYPTED_CONSTANT = b"hsdir-encrypted-data"
# hs_descriptor.h: HS_DESC_ENCRYPTED_SALT_LEN 16, HS_DESC_SUPERENC_PLAINTEXT_PAD_MULTIPLE 10000.
SALT_LENGTH = 16
PAD_MULTIPLE = 10_000
_KEY_LEN = 32
_IV_LEN = 16
_MAC_LEN = 32  # DIGEST256_LEN


def pad_plaintext(plaintext: bytes, multiple: int = PAD_MULTIPLE) -> bytes:
    """NUL-pad to the next multiple (``compute_padded_plaintext_length``: CEIL_DIV * multiple;
    an exact multiple stays as is)."""
    padded_len = -(-len(plaintext) // multiple) * multiple
    return plaintext + b"\0" * (padded_len - len(plaintext))


def _keys(
    secret_data: bytes, subcredential: bytes, revision_counter: int, salt: bytes, constant: bytes
) -> tuple[bytes, bytes, bytes]:
    if not 0 <= revision_counter < 1 << 64:
        raise DescriptorError("revision counter must fit in 64 bits")
    secret_input = secret_data + subcredential + revision_counter.to_bytes(8, "big")
    keys = hashlib.shake_256(secret_input + salt + constant).digest(_KEY_LEN + _IV_LEN + _MAC_LEN)
    return keys[:_KEY_LEN], keys[_KEY_LEN : _KEY_LEN + _IV_LEN], keys[_KEY_LEN + _IV_LEN :]


def _mac(mac_key: bytes, salt: bytes, ciphertext: bytes) -> bytes:
    # hs_descriptor.c build_mac: lengths are 64-bit big-endian (tor_htonll).
    return hashlib.sha3_256(
        len(mac_key).to_bytes(8, "big") + mac_key + len(salt).to_bytes(8, "big") + salt + ciphertext
    ).digest()


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    # tor's STREAM is AES-256-CTR with the IV as the initial big-endian 128-bit counter.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def encrypt_layer(
    plaintext: bytes,
    *,
    secret_data: bytes,
    subcredential: bytes,
    revision_counter: int,
    salt: bytes,
    constant: bytes,
) -> bytes:
    """Return ``SALT | ciphertext | MAC`` (the caller pads the first layer beforehand)."""
    if len(salt) != SALT_LENGTH:
        raise DescriptorError(f"layer salt must be {SALT_LENGTH} bytes")
    key, iv, mac_key = _keys(secret_data, subcredential, revision_counter, salt, constant)
    ciphertext = _ctr(key, iv, plaintext)
    return salt + ciphertext + _mac(mac_key, salt, ciphertext)


def decrypt_layer(
    blob: bytes,
    *,
    secret_data: bytes,
    subcredential: bytes,
    revision_counter: int,
    constant: bytes,
    what: str,
) -> bytes:
    """Check the MAC (constant time) and decrypt; return the plaintext cut at its first NUL.

    Raises :class:`DescriptorError` if the blob is too short (tor
    ``encrypted_data_length_is_valid``: at least one ciphertext byte), the MAC does not match,
    or the plaintext is empty.
    """
    if len(blob) <= SALT_LENGTH + _MAC_LEN:
        raise DescriptorError(f"{what}: encrypted blob is too short ({len(blob)} bytes)")
    salt, ciphertext, mac = blob[:SALT_LENGTH], blob[SALT_LENGTH:-_MAC_LEN], blob[-_MAC_LEN:]
    key, iv, mac_key = _keys(secret_data, subcredential, revision_counter, salt, constant)
    if not hmac.compare_digest(_mac(mac_key, salt, ciphertext), mac):
        raise DescriptorError(f"{what}: MAC check failed (wrong key, subcredential or forged)")
    plaintext = _ctr(key, iv, ciphertext)
    end = plaintext.find(b"\0")
    if end >= 0:
        plaintext = plaintext[:end]
    if not plaintext:
        raise DescriptorError(f"{what}: decrypted plaintext is empty")
    return plaintext
