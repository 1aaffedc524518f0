"""Test helpers for cluster trust (issue 16): a master key, node keys, signed statements.

Deterministic keys (from names) so failures reproduce; the master key here is a test key that
signs admission records, revocations, join policies and join grants exactly as a key holder
does (``IdentityKey.sign``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from rustbalance.cluster.authority import (
    NO_GRANT,
    AdmissionRecord,
    JoinGrant,
    JoinPolicy,
    Revocation,
    Statement,
    WireGuardIdentity,
    grant_secret_hash,
)
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.identity import NodeKey, write_node_key
from rustbalance.cluster.membership import Membership
from rustbalance.crypto.keys import IdentityKey

__all__ = [
    "MASTER",
    "OTHER_MASTER",
    "admit_keyless_node",
    "grant",
    "membership",
    "node_key",
    "now_ms",
    "record",
    "revocation",
    "signed",
    "wg_key",
]

MASTER = IdentityKey.from_seed(hashlib.sha256(b"test master").digest())
OTHER_MASTER = IdentityKey.from_seed(hashlib.sha256(b"another master").digest())


def now_ms() -> int:
    return int(time.time() * 1000)


def node_key(name: str, generation: int = 0) -> NodeKey:
    """The node key of ``name`` (another ``generation`` = a new key for the same name)."""
    return NodeKey(hashlib.sha256(f"node key {name} {generation}".encode()).digest())


def wg_key(name: str) -> bytes:
    return hashlib.sha256(f"wireguard {name}".encode()).digest()


def record(
    name: str,
    *,
    priority: int = 10,
    eligible: bool = True,
    holds_master_key: bool | None = None,
    coordination: str = "127.0.0.1:1",
    tunnel: str | None = None,
    endpoint: str = "192.0.2.1:51820",
    issued_at_ms: int | None = None,
    key: NodeKey | None = None,
    grant_id: bytes = NO_GRANT,
    grant_expires_at: int = 0,
    issuer: str = "issuer",
) -> AdmissionRecord:
    wireguard = WireGuardIdentity(wg_key(name), endpoint, tunnel) if tunnel is not None else None
    return AdmissionRecord(
        node_id=name,
        node_key=(key or node_key(name)).public,
        issued_at_ms=now_ms() if issued_at_ms is None else issued_at_ms,
        priority=priority,
        publisher_eligible=eligible,
        holds_master_key=eligible if holds_master_key is None else holds_master_key,
        coordination=coordination,
        wireguard=wireguard,
        grant_id=grant_id,
        grant_expires_at=grant_expires_at,
        issuer=issuer,
    )


def signed(
    content: AdmissionRecord | Revocation | JoinPolicy | JoinGrant,
    master: IdentityKey = MASTER,
) -> Statement:
    return Statement.sign(content, master.sign)


def revocation(name: str, key: NodeKey | None = None, at_ms: int | None = None) -> Statement:
    return signed(
        Revocation(name, (key or node_key(name)).public, now_ms() if at_ms is None else at_ms, "x")
    )


def grant(
    secret: bytes = b"\x05" * 32,
    *,
    grant_id: bytes = b"\x07" * 16,
    issued_at_ms: int | None = None,
    expires_at: int | None = None,
    max_uses: int = 1,
    with_master_key: bool = False,
    master: IdentityKey = MASTER,
) -> Statement:
    issued = now_ms() if issued_at_ms is None else issued_at_ms
    return signed(
        JoinGrant(
            grant_id=grant_id,
            secret_hash=grant_secret_hash(secret),
            issued_at_ms=issued,
            expires_at=issued // 1000 + 3600 if expires_at is None else expires_at,
            max_uses=max_uses,
            with_master_key=with_master_key,
            issuer="issuer",
        ),
        master,
    )


def membership(*records: AdmissionRecord, at_ms: int | None = None) -> Membership:
    result = Membership(MASTER.public_key)
    for content in records:
        result.apply(signed(content), now_ms() if at_ms is None else at_ms)
    return result


def admit_keyless_node(
    master: IdentityKey,
    node_id: str,
    *,
    key_path: Path,
    state_dir: Path,
    coordination: str,
    priority: int,
    publisher_eligible: bool = False,
    issuer: str = "node-a",
) -> None:
    """A node without the master key as ``rustbalance join`` leaves it: a new node key at
    ``key_path`` and its master-signed record in ``<state_dir>/cluster_members.json``."""
    key = NodeKey.generate()
    write_node_key(key_path, key)
    admitted = AdmissionRecord(
        node_id=node_id,
        node_key=key.public,
        issued_at_ms=now_ms(),
        priority=priority,
        publisher_eligible=publisher_eligible,
        holds_master_key=False,
        coordination=coordination,
        wireguard=None,
        grant_id=NO_GRANT,
        grant_expires_at=0,
        issuer=issuer,
    )
    members = Membership(master.public_key)
    members.apply(Statement.sign(admitted, master.sign), admitted.issued_at_ms)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / MEMBERS_FILE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(members.to_json())
