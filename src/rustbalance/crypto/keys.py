"""The master identity key: loading, writing tor's key files, and expanded-key signing.

Tor keeps only the *expanded* Ed25519 secret key ``(a, RH)`` (``SHA-512(seed)`` with ``a``
clamped), so every signing path here works from ``(a, RH)`` directly (RFC 8032 section 5.1.6,
tor ``src/ext/ed25519/donna/ed25519_tor.c`` ``ed25519_donna_sign``). Arithmetic uses libsodium's
constant-time ``crypto_core_ed25519_*`` / ``crypto_scalarmult_ed25519_*_noclamp`` primitives.

Key files understood by :func:`load_identity_key` (detected from their content):

* a raw 32-byte seed (the original product's ``master.key``);
* tor's ``hs_ed25519_secret_key``: 32-byte header ``"== ed25519v1-secret: type0 =="`` NUL
  padded, then ``a`` (32) and ``RH`` (32) (tor ``src/lib/crypt_ops/crypto_format.c``
  ``crypto_write_tagged_contents_to_file``, tag ``"type0"`` in ``src/feature/keymgt/loadkey.c``),
  optionally checked against ``hs_ed25519_public_key`` beside it;
* a raw 64-byte expanded key ``a | RH`` (the original product accepted it), the same check;
* PEM PKCS#8 Ed25519 private keys (Onionbalance's ``.key`` files).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import (
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_base_noclamp,
)

from rustbalance.atomic_file import write_file_atomic
from rustbalance.crypto.onion_address import encode_onion_address
from rustbalance.errors import InvalidKeyError
from rustbalance.secure_dir import ensured_dir

__all__ = [
    "PUBLIC_KEY_FILE",
    "PUBLIC_KEY_HEADER",
    "SECRET_KEY_FILE",
    "SECRET_KEY_HEADER",
    "IdentityKey",
    "clamp_scalar",
    "hidden_service_files",
    "load_identity_key",
    "parse_identity_key",
    "public_from_scalar",
    "sign_expanded",
    "write_hidden_service_dir",
    "write_seed_key_file",
]

# tor src/feature/hs/hs_service.c: fname_keyfile_prefix "hs_ed25519" + "_secret_key" etc.
SECRET_KEY_FILE = "hs_ed25519_secret_key"  # noqa: S105 (a file name, not a secret)
PUBLIC_KEY_FILE = "hs_ed25519_public_key"
HOSTNAME_FILE = "hostname"
# tor src/lib/crypt_ops/crypto_format.c: "== " + typestring + ": " + tag + " ==", NUL padded
# to 32 bytes; the ed25519 typestrings are "ed25519v1-secret" / "ed25519v1-public", tag "type0".
_HEADER_LENGTH = 32
SECRET_KEY_HEADER = b"== ed25519v1-secret: type0 ==".ljust(_HEADER_LENGTH, b"\0")
PUBLIC_KEY_HEADER = b"== ed25519v1-public: type0 ==".ljust(_HEADER_LENGTH, b"\0")
_KEY_LENGTH = 32
_MAX_KEY_FILE_SIZE = 64 * 1024  # no legitimate key file is larger; refuse to slurp huge files


def clamp_scalar(value: bytes) -> bytes:
    """Clamp 32 bytes as an Ed25519 scalar (RFC 8032 5.1.5: clear bits 0-2 and 255, set 254)."""
    if len(value) != _KEY_LENGTH:
        raise InvalidKeyError("a scalar to clamp must be 32 bytes")
    clamped = bytearray(value)
    clamped[0] &= 248
    clamped[31] &= 63
    clamped[31] |= 64
    return bytes(clamped)


def _is_clamped(scalar: bytes) -> bool:
    return scalar[0] & 7 == 0 and scalar[31] & 0xC0 == 0x40


def _reduce(scalar: bytes) -> bytes:
    """Reduce a 32- or 64-byte little-endian integer modulo the group order ℓ."""
    return bytes(crypto_core_ed25519_scalar_reduce(scalar.ljust(64, b"\0")))


def public_from_scalar(scalar: bytes) -> bytes:
    """Return ``A = a·G`` for a secret scalar (reduced mod ℓ first, as ed25519-donna does)."""
    if len(scalar) != _KEY_LENGTH:
        raise InvalidKeyError("secret scalar must be 32 bytes")
    reduced = _reduce(scalar)
    if reduced == bytes(_KEY_LENGTH):
        raise InvalidKeyError("secret scalar is zero modulo the group order")
    return bytes(crypto_scalarmult_ed25519_base_noclamp(reduced))


def sign_expanded(scalar: bytes, prf_secret: bytes, public_key: bytes, message: bytes) -> bytes:
    """Ed25519-sign ``message`` with an expanded secret key ``(scalar, prf_secret)``.

    RFC 8032 5.1.6 with the expanded key given directly (as tor's ``ed25519_donna_sign`` and
    rend-spec-v3 [KEYBLIND]'s blinded signing do): ``r = SHA-512(prf | M) mod ℓ``, ``R = r·G``,
    ``S = (r + SHA-512(R | A | M)·a) mod ℓ``. The nonce prefix must be the secret PRF half:
    a public or empty prefix makes the secret scalar recoverable from signatures (tor.md §5).
    """
    if len(scalar) != _KEY_LENGTH or len(public_key) != _KEY_LENGTH:
        raise InvalidKeyError("expanded-key signing needs a 32-byte scalar and public key")
    if len(prf_secret) != _KEY_LENGTH:
        raise InvalidKeyError("expanded-key signing needs a 32-byte PRF secret")
    if prf_secret == bytes(_KEY_LENGTH) or prf_secret in (public_key, scalar):
        raise InvalidKeyError("refusing to sign: the nonce PRF secret is empty or not secret")
    r = _reduce(hashlib.sha512(prf_secret + message).digest())
    big_r = bytes(crypto_scalarmult_ed25519_base_noclamp(r))
    k = _reduce(hashlib.sha512(big_r + public_key + message).digest())
    s = crypto_core_ed25519_scalar_add(r, crypto_core_ed25519_scalar_mul(k, _reduce(scalar)))
    return big_r + bytes(s)


@dataclass(frozen=True)
class IdentityKey:
    """An onion service's master identity key (rend-spec-v3 [KEYS]).

    ``public_key`` is A, ``scalar`` the clamped secret scalar a, ``prf_secret`` RH (second half
    of the expanded key), ``seed`` the 32-byte RFC 8032 seed when known (tor's key file does not
    keep it). Secret fields are kept out of ``repr``.
    """

    public_key: bytes
    scalar: bytes = field(repr=False)
    prf_secret: bytes = field(repr=False)
    seed: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.public_key) != _KEY_LENGTH or len(self.scalar) != _KEY_LENGTH:
            raise InvalidKeyError("identity public key and scalar must be 32 bytes each")
        if len(self.prf_secret) != _KEY_LENGTH:
            raise InvalidKeyError("identity PRF secret must be 32 bytes")
        if self.seed is not None and len(self.seed) != _KEY_LENGTH:
            raise InvalidKeyError("identity seed must be 32 bytes")

    @classmethod
    def from_seed(cls, seed: bytes) -> IdentityKey:
        """Expand a 32-byte seed: ``SHA-512(seed)`` = clamp(a) | RH (RFC 8032 5.1.5)."""
        if not isinstance(seed, bytes) or len(seed) != _KEY_LENGTH:
            raise InvalidKeyError("ed25519 seed must be exactly 32 bytes")
        digest = hashlib.sha512(seed).digest()
        scalar = clamp_scalar(digest[:32])
        return cls(public_from_scalar(scalar), scalar, digest[32:], seed)

    @classmethod
    def generate(cls, randbytes: Callable[[int], bytes]) -> IdentityKey:
        """Make a new key from ``randbytes(32)`` (e.g. ``os.urandom``)."""
        return cls.from_seed(randbytes(_KEY_LENGTH))

    @classmethod
    def from_expanded(cls, expanded: bytes, public_key: bytes | None = None) -> IdentityKey:
        """Build from tor's 64-byte expanded key ``a | RH``; check ``public_key`` if given."""
        if not isinstance(expanded, bytes) or len(expanded) != 2 * _KEY_LENGTH:
            raise InvalidKeyError("expanded ed25519 secret key must be exactly 64 bytes")
        scalar, prf = expanded[:32], expanded[32:]
        if not _is_clamped(scalar):
            # Tor only ever writes clamped scalars (ed25519_donna_seckey_expand); anything else
            # is a different format (e.g. libsodium's seed | public key).
            raise InvalidKeyError("expanded ed25519 secret key: the scalar is not clamped")
        derived = public_from_scalar(scalar)
        if public_key is not None and public_key != derived:
            raise InvalidKeyError("public key does not match the secret key (A != a·G)")
        return cls(derived, scalar, prf, None)

    @property
    def onion_address(self) -> str:
        """The service's ``<56 chars>.onion`` address."""
        return encode_onion_address(self.public_key)

    @property
    def expanded(self) -> bytes:
        """The 64-byte expanded secret key ``a | RH`` as tor stores it."""
        return self.scalar + self.prf_secret

    def sign(self, message: bytes) -> bytes:
        """A standard Ed25519 signature of ``message`` that verifies under ``public_key``."""
        return sign_expanded(self.scalar, self.prf_secret, self.public_key, message)


def _parse_public_key_file(data: bytes, name: str) -> bytes:
    if len(data) != _HEADER_LENGTH + _KEY_LENGTH:
        raise InvalidKeyError(f"{name}: public key file must be 64 bytes, got {len(data)}")
    if data[:_HEADER_LENGTH] != PUBLIC_KEY_HEADER:
        raise InvalidKeyError(f"{name}: bad header, expected '== ed25519v1-public: type0 =='")
    return data[_HEADER_LENGTH:]


def parse_identity_key(data: bytes, public_key_file: bytes | None = None) -> IdentityKey:
    """Parse key-file bytes (format detected from content); see the module docstring.

    ``public_key_file`` is the content of a companion ``hs_ed25519_public_key`` (with header) or
    a raw 32-byte public key; when given it must match the secret key.
    """
    public_key: bytes | None = None
    if public_key_file is not None:
        if len(public_key_file) == _KEY_LENGTH:
            public_key = public_key_file
        else:
            public_key = _parse_public_key_file(public_key_file, "public key")
    if data.startswith(b"== ed25519v1-public"):
        raise InvalidKeyError("this is tor's public key file; give the secret key file")
    if data.lstrip().startswith(b"-----BEGIN"):
        key = _parse_pem(data)
    elif len(data) == _HEADER_LENGTH + 2 * _KEY_LENGTH and data.startswith(b"== "):
        if data[:_HEADER_LENGTH] != SECRET_KEY_HEADER:
            raise InvalidKeyError(
                "tor secret key file: bad header, expected '== ed25519v1-secret: type0 =='"
            )
        key = IdentityKey.from_expanded(data[_HEADER_LENGTH:])
    elif len(data) == 2 * _KEY_LENGTH:
        key = IdentityKey.from_expanded(data)
    elif len(data) == _KEY_LENGTH:
        key = IdentityKey.from_seed(data)
    else:
        raise InvalidKeyError(
            f"unrecognised key file ({len(data)} bytes): expected a 32-byte seed, tor's 96-byte "
            "hs_ed25519_secret_key, a 64-byte expanded key or a PEM PKCS#8 Ed25519 key"
        )
    if public_key is not None and public_key != key.public_key:
        raise InvalidKeyError("public key file does not match the secret key (A != a·G)")
    return key


def _parse_pem(data: bytes) -> IdentityKey:
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography raises TypeError for encrypted keys
        raise InvalidKeyError("PEM key is password-protected; store it unencrypted") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError("PEM key file could not be decoded as PKCS#8") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidKeyError("PEM key is not an Ed25519 private key")
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return IdentityKey.from_seed(seed)


def _read_limited(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE_SIZE + 1)
    except OSError as exc:
        raise InvalidKeyError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise InvalidKeyError(f"key file {path} is too large to be a key")
    return data


def load_identity_key(path: str | os.PathLike[str]) -> IdentityKey:
    """Load a master identity key file; format detected from its content.

    For tor's ``hs_ed25519_secret_key`` (and raw 64-byte expanded keys) a companion public
    key is checked when present: ``hs_ed25519_public_key`` in the same directory, or
    ``<path>.pub``. Without one, A is derived as a·G.
    """
    key_path = Path(path)
    data = _read_limited(key_path)
    companion: bytes | None = None
    if len(data) in (2 * _KEY_LENGTH, _HEADER_LENGTH + 2 * _KEY_LENGTH):
        candidates = [key_path.with_name(key_path.name + ".pub")]
        if key_path.name == SECRET_KEY_FILE:
            candidates.insert(0, key_path.with_name(PUBLIC_KEY_FILE))
        for candidate in candidates:
            if candidate.is_file():
                companion = _read_limited(candidate)
                break
    try:
        return parse_identity_key(data, companion)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"{key_path}: {exc}") from exc


def hidden_service_files(key: IdentityKey) -> dict[str, bytes]:
    """tor's ``HiddenServiceDir`` key files for ``key``: name -> content (each written 0600)."""
    return {
        SECRET_KEY_FILE: SECRET_KEY_HEADER + key.expanded,
        PUBLIC_KEY_FILE: PUBLIC_KEY_HEADER + key.public_key,
        HOSTNAME_FILE: (key.onion_address + "\n").encode("ascii"),
    }


def write_hidden_service_dir(
    key: IdentityKey,
    directory: str | os.PathLike[str],
    *,
    extra: dict[str, bytes] | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write tor's ``HiddenServiceDir`` key files for ``key`` (and ``extra`` files).

    Creates ``directory`` with mode 0700 (tor refuses group/world-accessible service dirs,
    ``src/feature/hs/hs_common.c`` ``hs_check_service_private_dir``) and writes
    ``hs_ed25519_secret_key``, ``hs_ed25519_public_key`` and ``hostname`` (mode 0600). The
    folder is opened without following a symlink another user could have planted, and every
    file is written relative to it (rustbalance.secure_dir); with ``owner`` (uid, gid) the
    folder and the files are given to that user on their descriptors (root preparing a folder
    for the system tor's user). Raises InvalidKeyError, or UnsafePathError for a folder that
    leads elsewhere or belongs to a third user.
    """
    target = Path(directory).absolute()
    files = {**hidden_service_files(key), **(extra or {})}
    try:
        with ensured_dir(target, mode=0o700, owner=owner) as dir_fd:
            # Each file 0600 from its first byte, replaced atomically (a restart mid-write
            # leaves tor the old key or the new one, never a torn file).
            for name, data in files.items():
                write_file_atomic(name, data, 0o600, dir_fd=dir_fd, owner=owner)
    except OSError as exc:
        raise InvalidKeyError(
            f"cannot write hidden service directory {target}: {exc.strerror or exc}"
        ) from exc


def write_seed_key_file(
    key: IdentityKey,
    path: str | os.PathLike[str],
    *,
    dir_fd: int | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write the raw 32-byte seed to ``path`` (mode 0600); never overwrite an existing file.
    ``dir_fd`` and ``owner`` as for :func:`rustbalance.atomic_file.write_file_atomic`."""
    if key.seed is None:
        raise InvalidKeyError(
            "this key has no seed (it was loaded from tor's expanded key); write it with "
            "write_hidden_service_dir instead"
        )
    target = Path(path)
    try:
        write_file_atomic(target, key.seed, 0o600, overwrite=False, dir_fd=dir_fd, owner=owner)
    except FileExistsError as exc:
        raise InvalidKeyError(f"refusing to overwrite existing key file {target}") from exc
    except OSError as exc:
        raise InvalidKeyError(f"cannot write key file {target}: {exc.strerror or exc}") from exc
