"""A node's own long-term cluster key (issue 16: per-node identities).

Every node has one Ed25519 key pair, made by ``rustbalance init`` / ``join`` (or by the daemon
at its first start, for a node upgraded from protocol v2). The master key binds the node id to
the public half in an admission record (:mod:`rustbalance.cluster.authority`); the node then
speaks for itself with the private half:

- it signs the statements others relay (its publisher statement, :mod:`messages`);
- its X25519 form (libsodium's ``crypto_sign_ed25519_sk_to_curve25519``) is the static key of
  the ``crypto_box`` (X25519 + XSalsa20-Poly1305) that seals every coordination datagram
  between two members, so a datagram authenticates its sender and only its recipient reads it.

The key file is the raw 32-byte seed, mode 0600 in a 0700 folder, opened without following
symlinks; it is never on a command line and never logged (only its fingerprint is).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.exceptions import RuntimeError as NaclRuntimeError
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from rustbalance.atomic_file import write_file_atomic
from rustbalance.errors import InvalidKeyError

__all__ = [
    "NODE_KEY_BYTES",
    "NodeKey",
    "box_public_key",
    "check_node_public_key",
    "fingerprint",
    "load_node_key",
    "load_or_create_node_key",
    "verify_signature",
]

NODE_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def check_node_public_key(public: bytes) -> bytes:
    """``public`` if it is a usable Ed25519 public key: 32 bytes, on the curve, not of small
    order (libsodium ``crypto_core_ed25519_is_valid_point``); else InvalidKeyError."""
    if not isinstance(public, bytes) or len(public) != NODE_KEY_BYTES:
        raise InvalidKeyError("a node key is 32 bytes")
    if not crypto_core_ed25519_is_valid_point(public):
        raise InvalidKeyError("a node key must be a valid Ed25519 point of prime order")
    return public


def box_public_key(public: bytes) -> PublicKey:
    """The X25519 form of an Ed25519 node public key (``crypto_sign_ed25519_pk_to_curve25519``)."""
    try:
        return VerifyKey(check_node_public_key(public)).to_curve25519_public_key()
    except NaclRuntimeError:
        raise InvalidKeyError("a node key has no X25519 form") from None


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` under ``public``."""
    if len(signature) != SIGNATURE_BYTES or len(public) != NODE_KEY_BYTES:
        return False
    try:
        VerifyKey(public).verify(message, signature)
    except (BadSignatureError, NaclRuntimeError, ValueError, TypeError):
        return False
    return True


def fingerprint(public: bytes) -> str:
    """``SHA256:<base64>`` of a public key, as ssh prints fingerprints (safe to log)."""
    digest = hashlib.sha256(public).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class NodeKey:
    """A node's Ed25519 key pair; the secret never appears in ``repr`` or in a message."""

    __slots__ = ("_box", "_signing", "public")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != NODE_KEY_BYTES:
            raise InvalidKeyError("a node key seed is 32 bytes")
        self._signing = SigningKey(seed)
        self.public: bytes = bytes(self._signing.verify_key)
        self._box: PrivateKey = self._signing.to_curve25519_private_key()

    @classmethod
    def generate(cls, randbytes: Callable[[int], bytes] = os.urandom) -> NodeKey:
        return cls(randbytes(NODE_KEY_BYTES))

    def __repr__(self) -> str:
        return f"NodeKey({fingerprint(self.public)})"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    @property
    def box_private(self) -> PrivateKey:
        """The X25519 form of the secret key (for ``crypto_box``)."""
        return self._box

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return bytes(self._signing.sign(message).signature)

    def seed_bytes(self) -> bytes:
        """The secret seed, only for writing the key file."""
        return bytes(self._signing)


def _refuse_exposed(path: Path, mode: int) -> None:
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidKeyError(
            f"node key {path}: mode {stat.S_IMODE(mode):04o} lets others read it; "
            f"run: chmod 600 {path}"
        )


def load_node_key(path: Path) -> NodeKey:
    """Read the node key (raw 32-byte seed); refuses symlinks and files others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InvalidKeyError(f"node key {path}: does not exist") from None
    except OSError as exc:
        raise InvalidKeyError(f"node key {path}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidKeyError(f"node key {path}: not a regular file")
        _refuse_exposed(path, info.st_mode)
        data = os.read(fd, NODE_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != NODE_KEY_BYTES:
        raise InvalidKeyError(
            f"node key {path}: must be exactly {NODE_KEY_BYTES} bytes, got "
            f"{'more' if len(data) > NODE_KEY_BYTES else len(data)}"
        )
    return NodeKey(data)


def load_or_create_node_key(
    path: Path, randbytes: Callable[[int], bytes] = os.urandom
) -> tuple[NodeKey, bool]:
    """The node key from ``path``, generated (0600, folder 0700) when missing: (key, created)."""
    try:
        return load_node_key(path), False
    except InvalidKeyError:
        if path.exists() or path.is_symlink():
            raise
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = path.parent.lstat()
        if folder.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.chmod(path.parent, 0o700)
    except OSError as exc:
        raise InvalidKeyError(f"node key folder {path.parent}: {exc.strerror or exc}") from None
    key = NodeKey.generate(randbytes)
    write_node_key(path, key)
    return key, True


def write_node_key(path: Path, key: NodeKey) -> None:
    """Write the seed to a new file (0600 from the first byte, never over an existing file or
    through a symlink: rustbalance/atomic_file.py)."""
    try:
        write_file_atomic(path, key.seed_bytes(), 0o600, overwrite=False)
    except FileExistsError:
        raise InvalidKeyError(f"node key {path}: refusing to overwrite it") from None
    except OSError as exc:
        raise InvalidKeyError(f"node key {path}: cannot write: {exc.strerror or exc}") from None
