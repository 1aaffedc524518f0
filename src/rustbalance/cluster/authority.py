"""Statements signed with the master key: the cluster's root of trust (pure, no I/O).

The master onion address *is* the cluster's identity: every node knows its public key
(``master.onion_address``), only the nodes an operator gave the master key can sign with it.
What those nodes sign here is what every node, keyless ones included, can verify offline:

- :class:`AdmissionRecord` binds a node id to the node's own key (:mod:`identity`), its
  WireGuard key and addresses, its election priority and whether it may publish. It is what a
  coordination message is checked against, so a node can only speak for itself, and priority
  and eligibility never come from a message.
- :class:`Revocation` removes a node (its key, for good) from the membership.
- :class:`JoinPolicy` ("rotate the join secret") voids every join grant issued before it.
- :class:`JoinGrant` is the signed half of a join token: its expiry and use count are enforced
  by the node that answers the join, never only by the joiner.

Encoding (all integers big-endian, strings ``len(u8) ‖ UTF-8``; see :mod:`wire`)::

    statement   = kind(u8) ‖ body ‖ signature(64)
    signature   = Ed25519(master key, DOMAIN ‖ kind ‖ body)       DOMAIN below, NUL included
    admission   = node_id ‖ node_key(32) ‖ issued_at_ms(u64) ‖ priority(u32) ‖ flags(u8)
                  ‖ coordination ‖ [wg_key(32) ‖ wg_endpoint ‖ tunnel_ipv4(4)]   (flag 4)
                  ‖ grant_id(16) ‖ grant_expires_at(u64, unix s) ‖ issuer
    revocation  = node_id ‖ node_key(32) ‖ revoked_at_ms(u64) ‖ issuer
    join policy = grants_not_before_ms(u64) ‖ issuer
    join grant  = grant_id(16) ‖ secret_hash(32) ‖ issued_at_ms(u64) ‖ expires_at(u64, unix s)
                  ‖ max_uses(u16) ‖ flags(u8: 1 = the token carries the master key) ‖ issuer

Why signing with the master identity key is safe: tor never signs with it directly (v3
descriptors are signed by blinded keys and descriptor-signing keys; rend-spec-v3 [KEYS]); every
message signed here starts with a RustBalance-specific domain string, so no signature made here
is valid for any message tor or a client would check. An Ed25519 signature by the master key
is a standard one (``IdentityKey.sign``, RFC 8032), verified with libsodium.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from rustbalance.cluster.identity import (
    SIGNATURE_BYTES,
    check_node_public_key,
    fingerprint,
    verify_signature,
)
from rustbalance.cluster.wire import (
    MAX_U16,
    MAX_U32,
    CoordinationError,
    Reader,
    RejectReason,
    Writer,
    check_node_id,
    check_peer_address,
    check_uint,
)
from rustbalance.errors import InvalidKeyError

__all__ = [
    "DOMAIN",
    "GRANT_ID_BYTES",
    "MAX_GRANT_USES",
    "MAX_STATEMENT_BYTES",
    "NO_GRANT",
    "AdmissionRecord",
    "JoinGrant",
    "JoinPolicy",
    "Revocation",
    "Signer",
    "Statement",
    "StatementKind",
    "WireGuardIdentity",
    "decode_statement",
    "grant_secret_hash",
]

DOMAIN = b"rustbalance cluster authority v1\x00"
GRANT_ID_BYTES = 16
NO_GRANT = bytes(GRANT_ID_BYTES)  # a self-admission: no join grant was used
MAX_GRANT_USES = 1000
# Above any statement: an admission with every string at its 255-byte limit is about 830 bytes.
MAX_STATEMENT_BYTES = 1024
# Times are unix milliseconds; 2^53 ms is the year 287 396, and keeps them exact in JSON.
MAX_TIME_MS = 2**53
_FLAG_ELIGIBLE = 1
_FLAG_MASTER_KEY = 2
_FLAG_WIREGUARD = 4
_GRANT_WITH_MASTER_KEY = 1
_SECRET_HASH_BYTES = 32

Signer = Callable[[bytes], bytes]


class StatementKind(IntEnum):
    ADMISSION = 1
    REVOCATION = 2
    JOIN_POLICY = 3
    JOIN_GRANT = 4


def grant_secret_hash(secret: bytes) -> bytes:
    """What a grant stores of the token's secret (the joiner presents the secret itself)."""
    return hashlib.sha256(b"rustbalance join grant secret v1\x00" + secret).digest()


def _check_time(value: int, name: str) -> None:
    check_uint(value, MAX_TIME_MS, name)


def _check_issuer(issuer: str) -> None:
    try:
        check_node_id(issuer)
    except CoordinationError:
        raise CoordinationError("issuer must be a node id") from None


def _check_key(public: bytes, name: str) -> None:
    try:
        check_node_public_key(public)
    except InvalidKeyError as exc:
        raise CoordinationError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class WireGuardIdentity:
    """A node's place in the WireGuard mesh: its public key, endpoint and tunnel address."""

    public_key: bytes  # the raw 32-byte X25519 key (`wg` prints it base64)
    endpoint: str  # public HOST:PORT of its WireGuard socket
    tunnel_address: str  # its IPv4 address inside the tunnel network

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise CoordinationError("a WireGuard key is 32 bytes")
        if self.public_key == bytes(32):
            raise CoordinationError("the all-zero WireGuard key is not a key")
        if check_peer_address(self.endpoint) != self.endpoint:
            raise CoordinationError("WireGuard endpoint is not in canonical form")
        try:
            address = ipaddress.IPv4Address(self.tunnel_address)
        except (ValueError, TypeError):
            raise CoordinationError("tunnel address must be an IPv4 address") from None
        if str(address) != self.tunnel_address:
            raise CoordinationError("tunnel address is not in canonical form")
        if address.is_unspecified or address.is_multicast or address.is_reserved:
            raise CoordinationError("tunnel address must be a unicast address")

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode("ascii")


@dataclass(frozen=True)
class AdmissionRecord:
    """A node admitted to the cluster, as a master-key holder signed it (see the module doc).

    ``issued_at_ms`` orders the records of one node id: a newer one replaces an older one.
    ``grant_id`` names the join grant used (``NO_GRANT`` for a key holder that signed its own
    record) and ``grant_expires_at`` when that grant's use count may be forgotten.
    """

    node_id: str
    node_key: bytes
    issued_at_ms: int
    priority: int
    publisher_eligible: bool
    holds_master_key: bool
    coordination: str
    wireguard: WireGuardIdentity | None
    grant_id: bytes
    grant_expires_at: int
    issuer: str

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        _check_key(self.node_key, "node key")
        _check_time(self.issued_at_ms, "issued_at")
        check_uint(self.priority, MAX_U32, "priority")
        if not isinstance(self.publisher_eligible, bool) or not isinstance(
            self.holds_master_key, bool
        ):
            raise CoordinationError("flags must be booleans")
        if self.publisher_eligible and not self.holds_master_key:
            # Publishing means signing master descriptors: impossible without the key.
            raise CoordinationError("a publisher-eligible node must hold the master key")
        if check_peer_address(self.coordination) != self.coordination:
            raise CoordinationError("coordination address is not in canonical form")
        if self.wireguard is not None and not isinstance(self.wireguard, WireGuardIdentity):
            raise CoordinationError("wireguard must be a WireGuardIdentity")
        if not isinstance(self.grant_id, bytes) or len(self.grant_id) != GRANT_ID_BYTES:
            raise CoordinationError("grant id must be 16 bytes")
        check_uint(self.grant_expires_at, MAX_TIME_MS // 1000, "grant expiry")
        _check_issuer(self.issuer)

    @property
    def kind(self) -> StatementKind:
        return StatementKind.ADMISSION

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.node_key)

    def body(self) -> bytes:
        flags = (
            (_FLAG_ELIGIBLE if self.publisher_eligible else 0)
            | (_FLAG_MASTER_KEY if self.holds_master_key else 0)
            | (_FLAG_WIREGUARD if self.wireguard is not None else 0)
        )
        w = Writer().text(self.node_id).raw(self.node_key)
        w.pack(">QI", self.issued_at_ms, self.priority).u8(flags).text(self.coordination)
        if self.wireguard is not None:
            wg = self.wireguard
            w.raw(wg.public_key).text(wg.endpoint)
            w.raw(ipaddress.IPv4Address(wg.tunnel_address).packed)
        w.raw(self.grant_id).pack(">Q", self.grant_expires_at).text(self.issuer)
        return w.bytes()

    @classmethod
    def _decode(cls, r: Reader) -> AdmissionRecord:
        node_id = r.text()
        node_key = r.take(32)
        issued_at, priority = r.unpack(">QI")
        flags = r.u8()
        if flags & ~(_FLAG_ELIGIBLE | _FLAG_MASTER_KEY | _FLAG_WIREGUARD):
            raise CoordinationError("unknown admission flags")
        coordination = r.text()
        wireguard = None
        if flags & _FLAG_WIREGUARD:
            wg_key = r.take(32)
            endpoint = r.text()
            tunnel = str(ipaddress.IPv4Address(r.take(4)))
            wireguard = WireGuardIdentity(wg_key, endpoint, tunnel)
        grant_id = r.take(GRANT_ID_BYTES)
        (grant_expires_at,) = r.unpack(">Q")
        issuer = r.text()
        return cls(
            node_id,
            node_key,
            issued_at,
            priority,
            bool(flags & _FLAG_ELIGIBLE),
            bool(flags & _FLAG_MASTER_KEY),
            coordination,
            wireguard,
            grant_id,
            grant_expires_at,
            issuer,
        )


@dataclass(frozen=True)
class Revocation:
    """``node_id``'s key is revoked for good; every record of it issued before
    ``revoked_at_ms`` is void (a re-admission needs a new node key and a newer record)."""

    node_id: str
    node_key: bytes
    revoked_at_ms: int
    issuer: str

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if not isinstance(self.node_key, bytes) or len(self.node_key) != 32:
            raise CoordinationError("node key must be 32 bytes")
        _check_time(self.revoked_at_ms, "revoked_at")
        _check_issuer(self.issuer)

    @property
    def kind(self) -> StatementKind:
        return StatementKind.REVOCATION

    def body(self) -> bytes:
        w = Writer().text(self.node_id).raw(self.node_key).pack(">Q", self.revoked_at_ms)
        return w.text(self.issuer).bytes()

    @classmethod
    def _decode(cls, r: Reader) -> Revocation:
        node_id = r.text()
        node_key = r.take(32)
        (revoked_at,) = r.unpack(">Q")
        return cls(node_id, node_key, revoked_at, r.text())


@dataclass(frozen=True)
class JoinPolicy:
    """Join grants issued before ``grants_not_before_ms`` are refused everywhere: rotating the
    join secret voids every outstanding join token at once."""

    grants_not_before_ms: int
    issuer: str

    def __post_init__(self) -> None:
        _check_time(self.grants_not_before_ms, "grants_not_before")
        _check_issuer(self.issuer)

    @property
    def kind(self) -> StatementKind:
        return StatementKind.JOIN_POLICY

    def body(self) -> bytes:
        return Writer().pack(">Q", self.grants_not_before_ms).text(self.issuer).bytes()

    @classmethod
    def _decode(cls, r: Reader) -> JoinPolicy:
        (not_before,) = r.unpack(">Q")
        return cls(not_before, r.text())


@dataclass(frozen=True)
class JoinGrant:
    """The signed half of a join token: who may join, until when, how many times."""

    grant_id: bytes
    secret_hash: bytes
    issued_at_ms: int
    expires_at: int  # unix seconds
    max_uses: int
    with_master_key: bool
    issuer: str

    def __post_init__(self) -> None:
        if not isinstance(self.grant_id, bytes) or len(self.grant_id) != GRANT_ID_BYTES:
            raise CoordinationError("grant id must be 16 bytes")
        if self.grant_id == NO_GRANT:
            raise CoordinationError("the all-zero grant id is reserved")
        if not isinstance(self.secret_hash, bytes) or len(self.secret_hash) != _SECRET_HASH_BYTES:
            raise CoordinationError("secret hash must be 32 bytes")
        _check_time(self.issued_at_ms, "issued_at")
        check_uint(self.expires_at, MAX_TIME_MS // 1000, "expires_at")
        if self.expires_at * 1000 <= self.issued_at_ms:
            raise CoordinationError("a grant must expire after it is issued")
        check_uint(self.max_uses, MAX_U16, "max_uses")
        if not 1 <= self.max_uses <= MAX_GRANT_USES:
            raise CoordinationError(f"max_uses must be 1-{MAX_GRANT_USES}")
        if not isinstance(self.with_master_key, bool):
            raise CoordinationError("with_master_key must be a bool")
        _check_issuer(self.issuer)

    @property
    def kind(self) -> StatementKind:
        return StatementKind.JOIN_GRANT

    def body(self) -> bytes:
        w = Writer().raw(self.grant_id).raw(self.secret_hash)
        w.pack(">QQH", self.issued_at_ms, self.expires_at, self.max_uses)
        return w.flag(self.with_master_key).text(self.issuer).bytes()

    @classmethod
    def _decode(cls, r: Reader) -> JoinGrant:
        grant_id = r.take(GRANT_ID_BYTES)
        secret_hash = r.take(_SECRET_HASH_BYTES)
        issued_at, expires_at, max_uses = r.unpack(">QQH")
        with_key = r.flag()
        return cls(grant_id, secret_hash, issued_at, expires_at, max_uses, with_key, r.text())


Content = AdmissionRecord | Revocation | JoinPolicy | JoinGrant
_DECODERS: dict[StatementKind, Callable[[Reader], Content]] = {
    StatementKind.ADMISSION: AdmissionRecord._decode,
    StatementKind.REVOCATION: Revocation._decode,
    StatementKind.JOIN_POLICY: JoinPolicy._decode,
    StatementKind.JOIN_GRANT: JoinGrant._decode,
}


def _signed_message(kind: StatementKind, body: bytes) -> bytes:
    return DOMAIN + bytes([kind]) + body


@dataclass(frozen=True)
class Statement:
    """A verified statement and its exact bytes (relayed and saved as they are)."""

    content: Content
    data: bytes

    @classmethod
    def sign(cls, content: Content, signer: Signer) -> Statement:
        """Sign ``content`` with the master key (``signer`` is ``IdentityKey.sign``)."""
        body = content.body()
        signature = signer(_signed_message(content.kind, body))
        if len(signature) != SIGNATURE_BYTES:
            raise CoordinationError("the signer returned a malformed signature")
        data = bytes([content.kind]) + body + signature
        if len(data) > MAX_STATEMENT_BYTES:
            raise CoordinationError("statement too large")
        return cls(content, data)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()


def decode_statement(data: bytes, master_public: bytes) -> Statement:
    """Parse and verify one statement; raises CoordinationError (FORGED for a bad signature)."""
    if not isinstance(data, bytes) or not 1 + SIGNATURE_BYTES < len(data) <= MAX_STATEMENT_BYTES:
        raise CoordinationError("statement size out of range")
    try:
        kind = StatementKind(data[0])
    except ValueError:
        raise CoordinationError(
            f"unknown statement kind {data[0]}", RejectReason.UNKNOWN_TYPE
        ) from None
    body, signature = data[1:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
    if not verify_signature(master_public, _signed_message(kind, body), signature):
        raise CoordinationError("statement not signed by the master key", RejectReason.FORGED)
    r = Reader(body)
    content = _DECODERS[kind](r)
    r.end()
    return Statement(content, bytes(data))
