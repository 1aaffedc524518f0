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

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import RuntimeError as NaclRuntimeError

from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import DescriptorError, InvalidKeyError

__all__ = [
    "AUTH_CLIENT_MULTIPLE",
    "COOKIE_LENGTH",
    "AuthClient",
    "ClientAuthPrivateKey",
    "build_auth_clients",
    "find_descriptor_cookie",
    "parse_auth_private",
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
# hs_client.c parse_auth_file_content: BASE32_NOPAD_LEN(CURVE25519_SECKEY_LEN) = 52; the
# address field is HS_SERVICE_ADDR_LEN_BASE32 = 56 characters, without ".onion".
_SECRET_KEY_CHARS = 52
_BASE32_CHARS = re.compile(r"[A-Za-z2-7]*")
# tor's SPLIT_SKIP_SPACE strips TOR_ISSPACE characters around each field.
_TOR_SPACE = " \t\r\n\v\f"


@dataclass(frozen=True, slots=True)
class AuthClient:
    """One ``auth-client`` line: client id (8), IV (16), encrypted cookie (16)."""

    client_id: bytes
    iv: bytes
    encrypted_cookie: bytes


@dataclass(frozen=True, slots=True)
class ClientAuthPrivateKey:
    """A client's restricted-discovery key for one service (tor's ``.auth_private`` file)."""

    onion_address: str
    secret_key: bytes

    def __repr__(self) -> str:  # the secret never reaches a log or a traceback
        return f"ClientAuthPrivateKey(onion_address={self.onion_address!r}, secret_key=<hidden>)"


def parse_auth_private(text: str) -> ClientAuthPrivateKey:
    """Parse ``<56-char address>:descriptor:x25519:<52-char base32 secret key>``.

    The rules are tor's (``src/feature/hs/hs_client.c`` ``parse_auth_file_content``, and
    ``hs_config_client_authorization`` for the address) and arti's
    (``crates/tor-keymgr/src/keystore/ctor/client.rs`` ``parse_client_keypair``): exactly 4
    ``:``-separated fields (blanks around a field ignored, as tor's ``SPLIT_SKIP_SPACE``), auth
    type ``descriptor``, key type ``x25519``, a valid v3 address without ``.onion``, and 52
    base32 characters (any case) of a key that is not all zero. Like arti we also refuse a
    non-canonical last character (tor drops the 4 surplus bits). The whole file is one
    record: a second line would be part of the key field, as in tor. Raises
    :class:`InvalidKeyError`, whose message never contains the key.
    """
    fields = [field.strip(_TOR_SPACE) for field in text.split(":")]
    if len(fields) != 4:
        raise InvalidKeyError(
            "must be exactly 4 fields '<address>:descriptor:x25519:<base32 key>', "
            f"got {len(fields)}"
        )
    address, auth_type, key_type, body = fields
    if auth_type != "descriptor":
        raise InvalidKeyError(f"auth type must be 'descriptor', got {auth_type[:32]!r}")
    if key_type != "x25519":
        raise InvalidKeyError(f"key type must be 'x25519', got {key_type[:32]!r}")
    if address.lower().endswith(ONION_SUFFIX) or len(address) != 56:
        raise InvalidKeyError("the address must be the 56 characters of a v3 address, no .onion")
    try:
        decode_onion_address(address)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"the address is not a valid v3 onion address: {exc}") from None
    if len(body) != _SECRET_KEY_CHARS:
        raise InvalidKeyError(f"the key must be {_SECRET_KEY_CHARS} base32 characters")
    if not _BASE32_CHARS.fullmatch(body):
        raise InvalidKeyError("the key has characters outside the base32 alphabet (a-z, 2-7)")
    try:
        secret = base64.b32decode(body.upper() + "====")
    except (binascii.Error, ValueError):  # unreachable after the checks above
        raise InvalidKeyError("the key is not base32") from None
    if base64.b32encode(secret).decode("ascii").rstrip("=") != body.upper():
        raise InvalidKeyError("the key is not canonical base32 (its last character is wrong)")
    if not any(secret):
        raise InvalidKeyError("the key is all zero")
    return ClientAuthPrivateKey(address.lower() + ONION_SUFFIX, secret)


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
