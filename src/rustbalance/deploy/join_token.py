"""The versioned join token a running node hands to a new node (pure, no I/O).

Why it looks like this (system.md §5, §13.2 3.1, W1, W3, W13): the original token was protected by
one unsalted SHA-256 of the password and always carried the master key, so a copied token could be
brute-forced offline and made every node a key holder. Here:

- The key comes from Argon2id over the passphrase (64 MiB, t=3, p=1 by default) with a random
  16-byte salt. Parameters and salt are in the token header, so they can be raised later without
  a format change; the header is authenticated as AES-256-GCM associated data.
- A *raw* token embeds a random 256-bit key instead: no passphrase, the token itself is the secret
  and is shown exactly once.
- Protocol v3 (issue 16): the token carries a *join grant* signed with the master key
  (:class:`~rustbalance.cluster.authority.JoinGrant`: expiry, number of uses, whether the
  token carries the master key) and the grant's 256-bit secret. The node that answers the join
  enforces the grant; there is no cluster token and no cluster-wide join secret any more.
- The master key seed is present only when the operator asked for it explicitly (``rustbalance
  cluster token --with-master-key``); by default a joiner gets no master key and serves as an
  instance (``identity_mode = "instance"``).
- Every damage class has its own message, and a 4-byte checksum catches copy-and-paste damage
  before the (deliberately slow) key derivation runs.

Text form: ``rbj2-`` + base64url (no padding) of the binary token. Whitespace is ignored, so a
token wrapped by a terminal or mail client still decodes. A version 1 token (``rbj1-``, protocol
v2 clusters) is refused with a message saying to ask for a new one. Binary form, version 2::

    u8  version (2)
    u8  kind: 1 = passphrase (Argon2id), 2 = raw key
    kind 1: salt[16] | u32 memory_kib | u32 time_cost | u32 parallelism
    kind 2: key[32]
    nonce[12] | u32 ciphertext length          -- end of header (AAD)
    ciphertext (AES-256-GCM, tag included)
    checksum[4] = SHA-256(everything above)[:4]

The plaintext is canonical JSON (sorted keys, no spaces, ASCII). Clock and randomness are
injected, so this module never reads the time or the system RNG itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rustbalance.cluster.authority import (
    GRANT_ID_BYTES,
    JoinGrant,
    Statement,
    decode_statement,
    grant_secret_hash,
)
from rustbalance.cluster.wire import CoordinationError
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import InvalidKeyError, RustBalanceError
from rustbalance.rules import NODE_ID_RULE, is_node_id

__all__ = [
    "DEFAULT_ARGON2",
    "DEFAULT_LIFETIME_SECS",
    "FORMAT_VERSION",
    "MIN_PASSPHRASE_CHARS",
    "TOKEN_PREFIX",
    "Argon2Params",
    "JoinPayload",
    "JoinTokenError",
    "decode",
    "encode_raw",
    "encode_with_passphrase",
    "token_needs_passphrase",
]


class JoinTokenError(RustBalanceError):
    """A join token is malformed, damaged, expired, or the passphrase is wrong."""


FORMAT_VERSION = 2
TOKEN_PREFIX = f"rbj{FORMAT_VERSION}-"
_PREFIX_RE = re.compile(r"rbj([0-9]{1,9})-")

_KIND_PASSPHRASE = 1
_KIND_RAW = 2
_SALT_LEN = 16
_KEY_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_CHECKSUM_LEN = 4
_U32 = struct.Struct(">I")
_ARGON2_FIELDS = struct.Struct(">III")
_PASSPHRASE_EXTRA = _SALT_LEN + _ARGON2_FIELDS.size
_RAW_EXTRA = _KEY_LEN

# Bounds on what a token header may ask for: a hostile token must not make the joiner allocate
# gigabytes or spin for minutes before the passphrase check can even fail.
_MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
_MAX_TIME_COST = 32
_MAX_PARALLELISM = 16
_MAX_TOKEN_CHARS = 16384

MIN_PASSPHRASE_CHARS = 12
DEFAULT_LIFETIME_SECS = 24 * 3600
# A leaked token should not stay useful for long; longer windows are a configuration mistake.
_MAX_LIFETIME_SECS = 30 * 24 * 3600
# Joiner and issuer clocks may disagree a little (the cluster needs NTP anyway).
_CLOCK_SKEW_SECS = 300

# The grant secret: 256 random bits.
_SECRET_LEN = 32
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_WHITESPACE_RE = re.compile(r"\s+")

_DAMAGED = "wrong passphrase or damaged token"


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters, stored in every passphrase token's header."""

    memory_kib: int = 64 * 1024
    time_cost: int = 3
    parallelism: int = 1

    def check(self) -> None:
        if not 1 <= self.parallelism <= _MAX_PARALLELISM:
            raise JoinTokenError(f"Argon2 parallelism must be 1-{_MAX_PARALLELISM}")
        if not 8 * self.parallelism <= self.memory_kib <= _MAX_MEMORY_KIB:
            raise JoinTokenError(
                f"Argon2 memory must be {8 * self.parallelism}-{_MAX_MEMORY_KIB} KiB"
            )
        if not 1 <= self.time_cost <= _MAX_TIME_COST:
            raise JoinTokenError(f"Argon2 time cost must be 1-{_MAX_TIME_COST}")


DEFAULT_ARGON2 = Argon2Params()


@dataclass(frozen=True, repr=False)
class JoinPayload:
    """What a joiner learns from the token. Secret fields never appear in ``repr``.

    ``grant`` is the master-signed :class:`JoinGrant` statement (checked against
    ``master_onion``'s key here, and again by the node that answers the join); ``grant_secret``
    the 32 bytes whose hash the grant holds. ``master_key_seed`` (32 bytes) is set exactly when
    the grant says the token carries the master key; the onion address it derives must be
    ``master_onion``. Construction validates every field and raises :class:`JoinTokenError`.
    """

    master_onion: str
    grant: bytes
    grant_secret: bytes
    issuer_node_id: str
    master_key_seed: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "master_onion", _check_onion(self.master_onion))
        if not isinstance(self.grant, bytes):
            raise JoinTokenError("grant must be bytes")
        try:
            statement = decode_statement(self.grant, decode_onion_address(self.master_onion))
        except CoordinationError as exc:
            raise JoinTokenError(f"grant: {exc}") from None
        if not isinstance(statement.content, JoinGrant):
            raise JoinTokenError("grant: not a join grant")
        if not isinstance(self.grant_secret, bytes) or len(self.grant_secret) != _SECRET_LEN:
            raise JoinTokenError("grant_secret must be 32 bytes")
        if grant_secret_hash(self.grant_secret) != statement.content.secret_hash:
            raise JoinTokenError("grant_secret does not belong to the grant")
        if not is_node_id(self.issuer_node_id):
            raise JoinTokenError(f"issuer_node_id must be {NODE_ID_RULE}")
        if (self.master_key_seed is not None) != statement.content.with_master_key:
            raise JoinTokenError(
                "master_key_seed must be present exactly when the grant carries the master key"
            )
        if self.master_key_seed is not None:
            if not isinstance(self.master_key_seed, bytes) or len(self.master_key_seed) != 32:
                raise JoinTokenError("master_key_seed must be 32 bytes")
            derived = IdentityKey.from_seed(self.master_key_seed).onion_address
            if derived != self.master_onion:
                raise JoinTokenError("master_key_seed does not belong to master_onion")

    @property
    def join_grant(self) -> JoinGrant:
        statement = decode_statement(self.grant, decode_onion_address(self.master_onion))
        assert isinstance(statement.content, JoinGrant)  # checked at construction
        return statement.content

    @property
    def created_at(self) -> int:
        return self.join_grant.issued_at_ms // 1000

    @property
    def expires_at(self) -> int:
        return self.join_grant.expires_at

    @property
    def publisher_eligible(self) -> bool:
        """True when the joiner receives the master key and may publish."""
        return self.master_key_seed is not None

    @classmethod
    def issue(
        cls,
        *,
        master_key: IdentityKey,
        issuer_node_id: str,
        now: int,
        randbytes: Callable[[int], bytes],
        lifetime_secs: int = DEFAULT_LIFETIME_SECS,
        max_uses: int = 1,
        with_master_key: bool = False,
    ) -> JoinPayload:
        """A new grant signed with ``master_key`` at unix time ``now``, valid for
        ``lifetime_secs`` and ``max_uses`` joins, and the payload that carries it."""
        if not 0 < lifetime_secs <= _MAX_LIFETIME_SECS:
            raise JoinTokenError(
                f"a token lives 1 s to {_MAX_LIFETIME_SECS // 86400} days, not {lifetime_secs} s"
            )
        if with_master_key and master_key.seed is None:
            raise JoinTokenError(
                "this master key has no seed (tor's expanded format): a token cannot carry it"
            )
        secret = _random(randbytes, _SECRET_LEN)
        try:
            grant = JoinGrant(
                grant_id=_random(randbytes, GRANT_ID_BYTES),
                secret_hash=grant_secret_hash(secret),
                issued_at_ms=now * 1000,
                expires_at=now + lifetime_secs,
                max_uses=max_uses,
                with_master_key=with_master_key,
                issuer=issuer_node_id,
            )
            statement = Statement.sign(grant, master_key.sign)
        except CoordinationError as exc:
            raise JoinTokenError(str(exc)) from None
        seed = master_key.seed if with_master_key else None
        return cls(master_key.onion_address, statement.data, secret, issuer_node_id, seed)

    def __repr__(self) -> str:
        seed = "<redacted>" if self.master_key_seed is not None else "None"
        return (
            f"JoinPayload(master_onion={self.master_onion!r}, "
            f"issuer_node_id={self.issuer_node_id!r}, expires_at={self.expires_at}, "
            f"publisher_eligible={self.publisher_eligible}, grant_secret=<redacted>, "
            f"master_key_seed={seed})"
        )

    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII only."""
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "master_onion": self.master_onion,
            "grant": _b64encode(self.grant),
            "grant_secret": _b64encode(self.grant_secret),
            "issuer": self.issuer_node_id,
        }
        if self.master_key_seed is not None:
            obj["master_key_seed"] = _b64encode(self.master_key_seed)
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JoinPayload:
        """Parse and validate :meth:`to_json` output; anything else raises JoinTokenError."""
        try:
            obj = json.loads(
                data.decode("ascii"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_reject_constant,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise JoinTokenError(f"damaged token: payload is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise JoinTokenError("damaged token: payload is not a JSON object")
        required = {"v", "master_onion", "grant", "grant_secret", "issuer"}
        missing = required - obj.keys()
        if missing:
            raise JoinTokenError(f"damaged token: payload lacks {', '.join(sorted(missing))}")
        unknown = obj.keys() - required - {"master_key_seed"}
        if unknown:
            raise JoinTokenError(f"damaged token: unknown payload field {sorted(unknown)[0]!r}")
        if obj["v"] != FORMAT_VERSION or type(obj["v"]) is not int:
            raise JoinTokenError(f"unsupported token version {obj['v']!r}")
        seed: bytes | None = None
        if "master_key_seed" in obj:
            seed = _b64decode_field(obj["master_key_seed"], "master_key_seed")
        return cls(
            obj["master_onion"],
            _b64decode_field(obj["grant"], "grant"),
            _b64decode_field(obj["grant_secret"], "grant_secret"),
            obj["issuer"],
            seed,
        )


def encode_with_passphrase(
    payload: JoinPayload,
    passphrase: str,
    randbytes: Callable[[int], bytes],
    params: Argon2Params = DEFAULT_ARGON2,
) -> str:
    """Encrypt ``payload`` under Argon2id(passphrase); ``randbytes`` is e.g. ``os.urandom``."""
    if not isinstance(passphrase, str) or len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise JoinTokenError(f"passphrase must be at least {MIN_PASSPHRASE_CHARS} characters")
    params.check()
    salt = _random(randbytes, _SALT_LEN)
    extra = salt + _ARGON2_FIELDS.pack(params.memory_kib, params.time_cost, params.parallelism)
    key = _derive_key(passphrase, salt, params)
    return _seal(payload, _KIND_PASSPHRASE, extra, key, randbytes)


def encode_raw(payload: JoinPayload, randbytes: Callable[[int], bytes]) -> str:
    """A token that carries its own random 256-bit key: the token itself is the secret."""
    key = _random(randbytes, _KEY_LEN)
    return _seal(payload, _KIND_RAW, key, key, randbytes)


def token_needs_passphrase(token: str) -> bool:
    """Whether :func:`decode` needs a passphrase for ``token`` (checks its structure too)."""
    return _parse(token).kind == _KIND_PASSPHRASE


def decode(token: str, passphrase: str | None, *, now: int) -> JoinPayload:
    """Decrypt and validate ``token`` at unix time ``now``.

    ``passphrase`` is ignored for raw tokens. Every failure is a :class:`JoinTokenError` whose
    message names the problem (truncated, damaged, wrong passphrase, unsupported version,
    expired) and never contains the token or the passphrase.
    """
    parsed = _parse(token)
    if parsed.kind == _KIND_PASSPHRASE:
        if passphrase is None:
            raise JoinTokenError("this token is protected by a passphrase; none was given")
        if not isinstance(passphrase, str):
            raise JoinTokenError("passphrase must be text")
        salt = parsed.extra[:_SALT_LEN]
        memory_kib, time_cost, parallelism = _ARGON2_FIELDS.unpack(parsed.extra[_SALT_LEN:])
        key = _derive_key(passphrase, salt, Argon2Params(memory_kib, time_cost, parallelism))
    else:
        key = parsed.extra
    try:
        plaintext = AESGCM(key).decrypt(parsed.nonce, parsed.ciphertext, parsed.header)
    except InvalidTag:
        raise JoinTokenError(_DAMAGED) from None
    payload = JoinPayload.from_json(plaintext)
    if now >= payload.expires_at:
        raise JoinTokenError(
            f"token expired (valid until unix time {payload.expires_at}); ask for a new one "
            "(rustbalance cluster token, on a node that holds the master key)"
        )
    if payload.created_at > now + _CLOCK_SKEW_SECS:
        raise JoinTokenError(
            "token was created in the future: this host's clock or the issuer's is wrong"
        )
    return payload


# --- internals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    kind: int
    extra: bytes  # salt + Argon2 fields, or the raw key
    nonce: bytes
    header: bytes  # authenticated as associated data
    ciphertext: bytes


def _parse(token: str) -> _Parsed:
    if not isinstance(token, str):
        raise JoinTokenError("a join token is text")
    if len(token) > _MAX_TOKEN_CHARS:
        raise JoinTokenError("damaged token: far too long for a join token")
    text = _WHITESPACE_RE.sub("", token)
    match = _PREFIX_RE.match(text)
    if match is None:
        raise JoinTokenError(
            f"not a RustBalance join token (expected it to start with {TOKEN_PREFIX!r})"
        )
    prefix_version = int(match.group(1))
    if prefix_version == 1:
        raise JoinTokenError(
            "this token is for a protocol v2 cluster (cluster token); this version needs a new "
            "one: run 'rustbalance cluster token' on a node that holds the master key"
        )
    if prefix_version != FORMAT_VERSION:
        raise JoinTokenError(f"unsupported token version {prefix_version}")
    body = text[match.end() :]
    if not _B64URL_RE.fullmatch(body):
        raise JoinTokenError("damaged token: characters outside base64url (A-Z a-z 0-9 - _)")
    # A length of 4k+1 is never valid base64: a character was lost or added. Parse what we can
    # so that a cut-off token is reported as truncated rather than merely damaged.
    usable = body[: len(body) - 1] if len(body) % 4 == 1 else body
    data = base64.urlsafe_b64decode(usable + "=" * (-len(usable) % 4))
    if len(data) < 2:
        raise JoinTokenError("token is truncated")
    if data[0] != FORMAT_VERSION:
        raise JoinTokenError(f"unsupported token version {data[0]}")
    kind = data[1]
    if kind == _KIND_PASSPHRASE:
        extra_len = _PASSPHRASE_EXTRA
    elif kind == _KIND_RAW:
        extra_len = _RAW_EXTRA
    else:
        raise JoinTokenError(f"damaged token: unknown token kind {kind}")
    header_len = 2 + extra_len + _NONCE_LEN + _U32.size
    if len(data) < header_len:
        raise JoinTokenError("token is truncated")
    (ct_len,) = _U32.unpack_from(data, header_len - _U32.size)
    total = header_len + ct_len + _CHECKSUM_LEN
    if len(data) < total:
        raise JoinTokenError("token is truncated")
    if len(data) > total or usable != body:
        raise JoinTokenError("damaged token: extra data after the end")
    if _b64encode(data) != body:
        raise JoinTokenError("damaged token: not canonical base64url")
    if hashlib.sha256(data[:-_CHECKSUM_LEN]).digest()[:_CHECKSUM_LEN] != data[-_CHECKSUM_LEN:]:
        raise JoinTokenError("damaged token: checksum mismatch (was it copied completely?)")
    if ct_len < _TAG_LEN:
        raise JoinTokenError("damaged token: ciphertext shorter than its tag")
    extra = data[2 : 2 + extra_len]
    if kind == _KIND_PASSPHRASE:
        try:
            Argon2Params(*_ARGON2_FIELDS.unpack(extra[_SALT_LEN:])).check()
        except JoinTokenError as exc:
            raise JoinTokenError(f"damaged token: {exc}") from None
    nonce_at = 2 + extra_len
    return _Parsed(
        kind,
        extra,
        data[nonce_at : nonce_at + _NONCE_LEN],
        data[:header_len],
        data[header_len : header_len + ct_len],
    )


def _seal(
    payload: JoinPayload,
    kind: int,
    extra: bytes,
    key: bytes,
    randbytes: Callable[[int], bytes],
) -> str:
    nonce = _random(randbytes, _NONCE_LEN)
    plaintext = payload.to_json()
    ct_len = len(plaintext) + _TAG_LEN
    header = bytes([FORMAT_VERSION, kind]) + extra + nonce + _U32.pack(ct_len)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, header)
    body = header + ciphertext
    body += hashlib.sha256(body).digest()[:_CHECKSUM_LEN]
    token = TOKEN_PREFIX + _b64encode(body)
    if len(token) > _MAX_TOKEN_CHARS:
        raise JoinTokenError("payload too large for a join token (too many seed peers?)")
    return token


def _derive_key(passphrase: str, salt: bytes, params: Argon2Params) -> bytes:
    # NFC so that the same passphrase typed on different systems gives the same bytes.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")
    try:
        return hash_secret_raw(
            secret,
            salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=_KEY_LEN,
            type=Type.ID,
        )
    except HashingError as exc:
        raise JoinTokenError(f"key derivation failed: {exc}") from None


def _random(randbytes: Callable[[int], bytes], n: int) -> bytes:
    value = randbytes(n)
    if not isinstance(value, bytes) or len(value) != n:
        raise JoinTokenError(f"randbytes({n}) must return {n} bytes")
    return value


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode_field(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not _B64URL_RE.fullmatch(value) or len(value) % 4 == 1:
        raise JoinTokenError(f"damaged token: {name} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise JoinTokenError(f"damaged token: {name} is not base64url") from None
    if _b64encode(raw) != value:
        raise JoinTokenError(f"damaged token: {name} is not canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _check_onion(address: object) -> str:
    if not isinstance(address, str):
        raise JoinTokenError("master_onion must be a v3 onion address")
    lowered = address.lower()
    if not lowered.endswith(ONION_SUFFIX):
        lowered += ONION_SUFFIX
    try:
        decode_onion_address(lowered)
    except InvalidKeyError as exc:
        raise JoinTokenError(f"master_onion: {exc}") from None
    return lowered
