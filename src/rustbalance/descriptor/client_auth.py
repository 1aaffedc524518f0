"""Restricted discovery (client authorization): ``auth-client`` entries and the descriptor
cookie (rend-spec-v3 [CLIENT-AUTH] and [HS-DESC-SECOND-LAYER]; tor
``src/feature/hs/hs_descriptor.c`` ``hs_desc_build_authorized_client``,
``build_descriptor_cookie_keys``, ``decrypt_descriptor_cookie``).

::

    SECRET_SEED = x25519(hs_eph_sk, client_pk)     (service side)
                = x25519(client_sk, hs_eph_pk)     (client side)
    KEYS = SHAKE256(N_hs_subcred | SECRET_SEED, 40)
    CLIENT-ID = KEYS[:8]; COOKIE-KEY = KEYS[8:40]
    auth-client CLIENT-ID IV AES-256-CTR(COOKIE-KEY, IV, descriptor_cookie)

The number of entries is padded with random fakes to a multiple of 16
(``HS_DESC_AUTH_CLIENT_MULTIPLE``; tor ``hs_service.c`` ``build_service_desc_superencrypted``
adds fakes even without client authorization, then shuffles the list).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import RuntimeError as NaclRuntimeError

from rustbalance.errors import DescriptorError

__all__ = [
    "AUTH_CLIENT_MULTIPLE",
    "COOKIE_LENGTH",
    "AuthClient",
    "build_auth_clients",
    "find_descriptor_cookie",
    "x25519_public",
]

Randbytes = Callable[[int], bytes]

# hs_descriptor.h: HS_DESC_CLIENT_ID_LEN 8, HS_DESC_DESCRIPTOR_COOKIE_LEN 16,
# HS_DESC_COOKIE_KEY_LEN 32, HS_DESC_ENCRYPED_COOKIE_LEN = HS_DESC_DESCRIPTOR_COOKIE_LEN.
CLIENT_ID_LENGTH = 8
COOKIE_LENGTH = 16
COOKIE_KEY_LENGTH = 32
IV_LENGTH = 16
# hs_descriptor.h HS_DESC_AUTH_CLIENT_MULTIPLE.
AUTH_CLIENT_MULTIPLE = 16
X25519_LENGTH = 32


@dataclass(frozen=True, slots=True)
class AuthClient:
    """One ``auth-client`` line: client id (8), IV (16), encrypted cookie (16)."""

    client_id: bytes
    iv: bytes
    encrypted_cookie: bytes


def x25519_public(secret: bytes) -> bytes:
    """Curve25519 public key of a 32-byte secret (libsodium clamps as tor's curve25519 does)."""
    if len(secret) != X25519_LENGTH:
        raise DescriptorError("x25519 secret key must be 32 bytes")
    return bytes(crypto_scalarmult_base(secret))


def _keys(subcredential: bytes, secret: bytes, public: bytes) -> tuple[bytes, bytes]:
    if len(public) != X25519_LENGTH or len(secret) != X25519_LENGTH:
        raise DescriptorError("x25519 keys must be 32 bytes")
    try:
        seed = bytes(crypto_scalarmult(secret, public))
    except NaclRuntimeError as exc:  # all-zero output: a low-order public key
        raise DescriptorError("x25519 public key is of low order") from exc
    keys = hashlib.shake_256(subcredential + seed).digest(CLIENT_ID_LENGTH + COOKIE_KEY_LENGTH)
    return keys[:CLIENT_ID_LENGTH], keys[CLIENT_ID_LENGTH:]


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _shuffle(entries: list[AuthClient], randbytes: Randbytes) -> None:
    # Fisher-Yates with injected randomness (tor smartlist_shuffle); the tiny modulo bias of a
    # 64-bit draw over at most a few hundred entries is irrelevant here.
    for i in range(len(entries) - 1, 0, -1):
        j = int.from_bytes(randbytes(8), "big") % (i + 1)
        entries[i], entries[j] = entries[j], entries[i]


def build_auth_clients(
    *,
    subcredential: bytes,
    ephemeral_secret: bytes,
    client_public_keys: Sequence[bytes],
    descriptor_cookie: bytes | None,
    randbytes: Randbytes,
) -> list[AuthClient]:
    """Real entries for ``client_public_keys``, padded with fakes to a multiple of 16, shuffled.

    Without clients (``descriptor_cookie`` None) tor still writes 16 fake entries.
    """
    entries: list[AuthClient] = []
    if client_public_keys:
        if descriptor_cookie is None or len(descriptor_cookie) != COOKIE_LENGTH:
            raise DescriptorError("client authorization needs a 16-byte descriptor cookie")
        for public in client_public_keys:
            client_id, cookie_key = _keys(subcredential, ephemeral_secret, public)
            iv = randbytes(IV_LENGTH)
            entries.append(AuthClient(client_id, iv, _ctr(cookie_key, iv, descriptor_cookie)))
    fakes = -len(entries) % AUTH_CLIENT_MULTIPLE
    if not entries:
        fakes = AUTH_CLIENT_MULTIPLE
    for _ in range(fakes):
        # hs_desc_build_fake_authorized_client: all three fields random.
        entries.append(
            AuthClient(randbytes(CLIENT_ID_LENGTH), randbytes(IV_LENGTH), randbytes(COOKIE_LENGTH))
        )
    _shuffle(entries, randbytes)
    return entries


def find_descriptor_cookie(
    entries: Sequence[AuthClient],
    *,
    subcredential: bytes,
    ephemeral_public: bytes,
    client_secret: bytes,
) -> bytes | None:
    """Return the descriptor cookie if one entry is addressed to ``client_secret``, else None."""
    client_id, cookie_key = _keys(subcredential, client_secret, ephemeral_public)
    for entry in entries:
        if hmac.compare_digest(entry.client_id, client_id):
            return _ctr(cookie_key, entry.iv, entry.encrypted_cookie)
    return None
