"""Key blinding, blinded signing and (sub)credentials.

rend-spec-v3 [KEYBLIND] (appendix A.2) and [SUBCRED] (section 2.1), as implemented by tor in
``src/feature/hs/hs_common.c`` (``build_blinded_key_param``, ``hs_build_blinded_keypair``,
``hs_get_subcredential``) and ``src/ext/ed25519/donna/ed25519_tor.c``
(``ed25519_donna_blind_secret_key`` / ``ed25519_donna_blind_public_key``)::

    h   = H("Derive temporary signing key" | 0x00 | A | B | "key-blind" | INT_8(tp) | INT_8(len))
    A'  = clamp(h)·A        a' = clamp(h)·a mod ℓ
    RH' = SHA-512("Derive temporary signing key hash input" | RH)[:32]

H is SHA3-256 and B the base point written as the ASCII string below.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_noclamp,
)
from nacl.exceptions import RuntimeError as NaclRuntimeError

from rustbalance.crypto.keys import IdentityKey, clamp_scalar, sign_expanded
from rustbalance.crypto.onion_address import check_public_key
from rustbalance.errors import InvalidKeyError

__all__ = [
    "BASEPOINT_STRING",
    "BlindedKey",
    "blind_expanded_key",
    "blind_identity",
    "blind_public_key",
    "blinding_factor",
    "credential",
    "subcredential",
]

# rend-spec-v3 [KEYBLIND]: "Derive temporary signing key" is hashed with its terminating NUL
# (tor hs_common.c: hs_blind_str is hashed with sizeof(), i.e. including the NUL).
_BLIND_PREFIX = b"Derive temporary signing key\x00"
# rend-spec-v3 [KEYBLIND]: B as the decimal "(x, y)" string, no terminating NUL (tor
# hs_common.c str_ed25519_basepoint, hashed with HS_KEYBLIND_BASEPOINT_STR_LEN).
BASEPOINT_STRING = (
    b"(15112221349535400772501151409588531511454012693041857206046113283949847762202, "
    b"46316835694926478169428394003475163141307993866256225615783033603165251855960)"
)
# rend-spec-v3 [KEYBLIND]: N = "key-blind" | INT_8(period-number) | INT_8(period_length).
_NONCE_PREFIX = b"key-blind"
# tor ed25519_donna_blind_secret_key: RH' = SHA-512(str | RH)[:32], string first, no NUL.
_PRF_PREFIX = b"Derive temporary signing key hash input"
# rend-spec-v3 [SUBCRED]: N_hs_cred = H("credential" | A); N_hs_subcred = H("subcredential" |
# N_hs_cred | A').
_CREDENTIAL_PREFIX = b"credential"
_SUBCREDENTIAL_PREFIX = b"subcredential"
_UINT64_MAX = 2**64 - 1


def _check_uint64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise InvalidKeyError(f"{name} must be an integer in 0..2^64-1, got {value!r}")


def blinding_factor(public_key: bytes, time_period: int, period_length: int) -> bytes:
    """Return the unclamped blinding factor h for identity ``public_key`` and one time period.

    ``period_length`` is in minutes (1440 on the live network, 24 voting intervals on a test
    network), exactly as used in the time period computation.
    """
    if len(public_key) != 32:
        raise InvalidKeyError("identity public key must be 32 bytes")
    _check_uint64("time_period", time_period)
    _check_uint64("period_length", period_length)
    nonce = _NONCE_PREFIX + time_period.to_bytes(8, "big") + period_length.to_bytes(8, "big")
    return hashlib.sha3_256(_BLIND_PREFIX + public_key + BASEPOINT_STRING + nonce).digest()


def _mul_point(scalar: bytes, point: bytes) -> bytes:
    try:
        return bytes(crypto_scalarmult_ed25519_noclamp(scalar, point))
    except NaclRuntimeError as exc:  # libsodium refuses points outside the main subgroup
        raise InvalidKeyError("cannot blind: public key is not a valid prime-order point") from exc


def _reduce32(scalar: bytes) -> bytes:
    return bytes(crypto_core_ed25519_scalar_reduce(scalar + bytes(32)))


def blind_expanded_key(
    scalar: bytes, prf_secret: bytes, public_key: bytes, param: bytes
) -> tuple[bytes, bytes, bytes]:
    """Blind an expanded keypair with a raw 32-byte parameter; return ``(A', a', RH')``.

    This is tor's ``ed25519_keypair_blind`` (``src/lib/crypt_ops/crypto_ed25519.c``): the
    parameter is clamped first. :func:`blind_identity` feeds it the rend-spec factor h.
    """
    if len(scalar) != 32 or len(prf_secret) != 32 or len(param) != 32:
        raise InvalidKeyError("blinding needs a 32-byte scalar, PRF secret and parameter")
    check_public_key(public_key)
    h = clamp_scalar(param)
    blinded_public = _mul_point(h, public_key)
    blinded_scalar = bytes(crypto_core_ed25519_scalar_mul(_reduce32(h), _reduce32(scalar)))
    blinded_prf = hashlib.sha512(_PRF_PREFIX + prf_secret).digest()[:32]
    return blinded_public, blinded_scalar, blinded_prf


@dataclass(frozen=True)
class BlindedKey:
    """The blinded keypair of one time period (rend-spec-v3 [KEYBLIND]).

    ``public_key`` is A', ``scalar`` a' (reduced mod ℓ, not clamped), ``prf_secret`` RH'.
    Secret fields are kept out of ``repr``.
    """

    public_key: bytes
    scalar: bytes = field(repr=False)
    prf_secret: bytes = field(repr=False)
    time_period: int
    period_length: int

    @property
    def expanded(self) -> bytes:
        """The 64-byte blinded secret key ``a' | RH'`` (tor's ``blinded_kp.seckey``)."""
        return self.scalar + self.prf_secret

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``message`` that verifies under A'."""
        return sign_expanded(self.scalar, self.prf_secret, self.public_key, message)


def blind_identity(key: IdentityKey, time_period: int, period_length: int) -> BlindedKey:
    """Derive the blinded keypair of ``key`` for ``time_period`` (``period_length`` minutes)."""
    factor = blinding_factor(key.public_key, time_period, period_length)
    public, scalar, prf = blind_expanded_key(key.scalar, key.prf_secret, key.public_key, factor)
    return BlindedKey(public, scalar, prf, time_period, period_length)


def blind_public_key(public_key: bytes, time_period: int, period_length: int) -> bytes:
    """Return A' from the public identity key alone (clients, HSDir ring, checking 08 certs)."""
    check_public_key(public_key)
    factor = blinding_factor(public_key, time_period, period_length)
    return _mul_point(clamp_scalar(factor), public_key)


def credential(public_key: bytes) -> bytes:
    """``N_hs_cred = H("credential" | A)`` (rend-spec-v3 [SUBCRED])."""
    if len(public_key) != 32:
        raise InvalidKeyError("identity public key must be 32 bytes")
    return hashlib.sha3_256(_CREDENTIAL_PREFIX + public_key).digest()


def subcredential(public_key: bytes, blinded_public_key: bytes) -> bytes:
    """``N_hs_subcred = H("subcredential" | N_hs_cred | A')`` (rend-spec-v3 [SUBCRED])."""
    if len(blinded_public_key) != 32:
        raise InvalidKeyError("blinded public key must be 32 bytes")
    return hashlib.sha3_256(
        _SUBCREDENTIAL_PREFIX + credential(public_key) + blinded_public_key
    ).digest()
