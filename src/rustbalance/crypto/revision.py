"""Descriptor revision counters: order-preserving encryption of time, keyed like tor.

rend-spec-v3 appendix F.2 "Order-preserving encryption of revision counters" and tor's
``src/lib/crypt_ops/crypto_ope.c``: the ciphertext of ``T`` is the sum of the first ``T``
values ``w_i + 1``, where ``w_i`` are the AES-256-CTR keystream (zero IV) read as little-endian
16-bit words. The sum strictly increases with ``T``.

Keying follows tor ``src/feature/hs/hs_service.c`` ``generate_ope_cipher_for_desc``:
``K = SHA3-256("rev-counter-generation\\0" | blinded secret key)``, where the prefix is hashed
with ``sizeof()`` (so including its NUL) and the blinded secret key is the 64-byte
``a' | RH'``. ``T`` is the number of seconds since the start of the SRV protocol run the
descriptor belongs to, plus one (``set_descriptor_revision_counter``). Sharing tor's keying
means a balancer and a tor hosting the same key produce the same counters.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from rustbalance.crypto.blinding import BlindedKey
from rustbalance.errors import InvalidKeyError

__all__ = ["OPE_INPUT_MAX", "OPE_KEY_LENGTH", "ope_encrypt", "ope_key", "revision_counter"]

# tor src/lib/crypt_ops/crypto_ope.h: OPE_INPUT_MAX (1<<18), about 72 hours of seconds;
# crypto_ope_encrypt accepts 1..OPE_INPUT_MAX and fails otherwise.
OPE_INPUT_MAX = 1 << 18
# tor crypto_ope.h OPE_KEY_LEN: AES-256.
OPE_KEY_LENGTH = 32
# tor hs_service.c generate_ope_cipher_for_desc: prefix hashed including its NUL terminator.
_KEY_PREFIX = b"rev-counter-generation\x00"
_ZERO_IV = bytes(16)


def ope_key(blinded_secret_key: bytes) -> bytes:
    """``SHA3-256("rev-counter-generation\\0" | a' | RH')`` from the 64-byte blinded key."""
    if len(blinded_secret_key) != 64:
        raise InvalidKeyError("OPE key derivation needs the 64-byte blinded secret key")
    return hashlib.sha3_256(_KEY_PREFIX + blinded_secret_key).digest()


def ope_encrypt(key: bytes, plaintext: int) -> int:
    """tor's ``crypto_ope_encrypt``: the sum of the first ``plaintext`` words ``w_i + 1``.

    ``plaintext`` must lie in ``1..OPE_INPUT_MAX`` as in tor.
    """
    if len(key) != OPE_KEY_LENGTH:
        raise InvalidKeyError("OPE key must be 32 bytes")
    if isinstance(plaintext, bool) or not isinstance(plaintext, int):
        raise InvalidKeyError("OPE plaintext must be an integer")
    if not 1 <= plaintext <= OPE_INPUT_MAX:
        raise InvalidKeyError(f"OPE plaintext {plaintext} outside tor's range 1..{OPE_INPUT_MAX}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    keystream = encryptor.update(bytes(2 * plaintext))
    words = array("H")
    words.frombytes(keystream)
    if sys.byteorder != "little":  # the words are defined as little-endian (crypto_ope.c)
        words.byteswap()
    return sum(words) + plaintext


def revision_counter(blinded: BlindedKey, srv_run_start: int, now: int) -> int:
    """The revision counter tor would give a descriptor at ``now``.

    ``srv_run_start`` is the start (Unix seconds) of the SRV protocol run of the descriptor's
    SRV: the previous run for the first descriptor, the current run for the second.
    """
    seconds = now - srv_run_start
    if seconds < 0:
        raise InvalidKeyError(
            f"revision counter: now ({now}) is before the SRV run start ({srv_run_start})"
        )
    return ope_encrypt(ope_key(blinded.expanded), seconds + 1)
