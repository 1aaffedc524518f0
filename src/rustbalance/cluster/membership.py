"""The cluster membership: admitted nodes, revocations, the join policy (pure, no I/O).

Every node holds one :class:`Membership`, fed with master-signed statements
(:mod:`rustbalance.cluster.authority`) from the join answer, its saved file, the ``rustbalance
cluster`` commands and other members (coordination gossip). Because every statement is signed
with the master key, it does not matter who relays it; what matters is that the state a node
ends up with depends only on the *set* of statements it has seen, not on their order, so every
node that has seen the same statements agrees (the property test checks this):

- a node id's record is the newest one (``issued_at_ms``) that is not void (one record is kept
  per node id *and node key*, so when a newer record's key is revoked later, the older key's
  record still counts, whatever the order the two arrived in);
- a revocation voids its node key for good and every record of that node id issued at or
  before it (so an old record relayed by a stale node cannot bring a revoked node back; a
  re-admission needs a new node key and a newer record);
- among the remaining records, two nodes cannot share a node key, a WireGuard key or a tunnel
  address: the older record (then the smaller node id) keeps it and the other record is
  *shadowed* (held, but not a member) - two key holders admitting at the same instant with the
  same address cannot split the cluster's view;
- the newest join policy wins.

Everything is bounded: at most ``max_members`` records, ``max_revocations`` revocations (the
oldest is forgotten first) and ``max_grants`` join-grant use counts (the soonest to expire is
forgotten first; a count is kept until its grant expires, also when the node was revoked since,
so a single-use token stays used). A record further than :data:`MAX_FUTURE_MS` in the future is
refused: no statement can pin a node id for the rest of time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rustbalance.cluster.authority import (
    NO_GRANT,
    AdmissionRecord,
    JoinGrant,
    JoinPolicy,
    Revocation,
    Statement,
    decode_statement,
)
from rustbalance.cluster.wire import CoordinationError, check_node_id

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "MAX_FUTURE_MS",
    "MEMBERS_FILE_VERSION",
    "Applied",
    "Membership",
    "Outcome",
]

DEFAULT_MAX_MEMBERS = 256
DEFAULT_MAX_REVOCATIONS = 1024
DEFAULT_MAX_GRANTS = 1024
# Each grant may be used at most authority.MAX_GRANT_USES times; one more name per grant is
# enough to see that it is used up, so the per-grant set never needs to grow beyond that.
_MAX_NAMES_PER_GRANT = 1001
# Records kept per node id, one per node key (a node id gets a new key only when it is
# re-admitted after a revocation, so a handful is plenty).
_MAX_KEYS_PER_NODE = 8
# Statements dated further ahead than this (signer's clock ahead of ours) are refused.
MAX_FUTURE_MS = 5 * 60 * 1000
MEMBERS_FILE_VERSION = 1
_MAX_FILE_CHARS = 4_000_000


class Outcome(StrEnum):
    """What applying one statement did; the values are log and metric words."""

    ADDED = "added"
    UPDATED = "updated"
    REVOKED = "revoked"  # a revocation that removed a member
    RECORDED = "recorded"  # a revocation or policy stored, no member removed
    HELD = "held"  # a record stored, but another of the node id's records is newer
    KNOWN = "known"  # nothing new
    OLDER = "older"  # superseded by what we hold
    VOID = "void"  # the record's key or time is revoked
    FUTURE = "future"
    FULL = "full"
    NOT_MEMBERSHIP = "not_membership"  # a join grant: never part of the membership


@dataclass(frozen=True)
class Applied:
    outcome: Outcome
    node_id: str | None = None

    @property
    def changed(self) -> bool:
        return self.outcome in (
            Outcome.ADDED,
            Outcome.UPDATED,
            Outcome.REVOKED,
            Outcome.RECORDED,
            Outcome.HELD,
        )


@dataclass
class _GrantUse:
    expires_at: int  # unix seconds
    node_ids: set[str] = field(default_factory=set)


class Membership:
    """See the module docstring. ``master_public`` verifies every statement given as bytes."""

    def __init__(
        self,
        master_public: bytes,
        *,
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_revocations: int = DEFAULT_MAX_REVOCATIONS,
        max_grants: int = DEFAULT_MAX_GRANTS,
    ) -> None:
        self.master_public = master_public
        self.max_members = max_members
        self.max_revocations = max_revocations
        self.max_grants = max_grants
        # node id -> node key -> the newest non-void record of that id with that key. Keeping
        # one per key (not only the newest) is what keeps the result independent of the order
        # when a newer record's key is revoked later (the older key's record then counts).
        self._records: dict[str, dict[bytes, Statement]] = {}
        self._revocations: dict[bytes, Statement] = {}  # revoked node key -> revocation
        self._void_before: dict[str, int] = {}  # node id -> newest revocation time
        self._policy: Statement | None = None
        self._grants: dict[bytes, _GrantUse] = {}
        self._members: dict[str, AdmissionRecord] | None = None  # cache of the effective set

    def __repr__(self) -> str:
        return (
            f"Membership(members={len(self.members())}, node_ids={len(self._records)}, "
            f"revocations={len(self._revocations)})"
        )

    # -- inputs -------------------------------------------------------------------------------

    def apply_bytes(self, data: bytes, now_ms: int) -> Applied:
        """Verify and apply one statement; raises CoordinationError for a bad one."""
        if any(held.data == data for held in self._held(data)):
            return Applied(Outcome.KNOWN)  # already verified and held: skip the signature check
        return self.apply(decode_statement(data, self.master_public), now_ms)

    def _held(self, data: bytes) -> list[Statement]:
        """Statements held that ``data`` could be a copy of (cheap: no signature check)."""
        held = [s for keys in self._records.values() for s in keys.values()]
        return [s for s in (*held, *self._revocations.values()) if s.data == data]

    def apply(self, statement: Statement, now_ms: int) -> Applied:
        """Apply a verified statement; never raises."""
        content = statement.content
        if isinstance(content, AdmissionRecord):
            return self._apply_record(statement, content, now_ms)
        if isinstance(content, Revocation):
            return self._apply_revocation(statement, content, now_ms)
        if isinstance(content, JoinPolicy):
            return self._apply_policy(statement, content, now_ms)
        return Applied(Outcome.NOT_MEMBERSHIP)

    def _apply_record(self, statement: Statement, record: AdmissionRecord, now: int) -> Applied:
        node_id = record.node_id
        if record.issued_at_ms > now + MAX_FUTURE_MS:
            return Applied(Outcome.FUTURE, node_id)
        if record.grant_id != NO_GRANT:
            # Every admission signed with a grant used it, whether or not the record is (still)
            # a member here: counting it first keeps the counts independent of the order.
            self._count_grant_use(record.grant_id, record.grant_expires_at, node_id)
        if record.node_key in self._revocations or record.issued_at_ms <= self._void_before.get(
            node_id, -1
        ):
            return Applied(Outcome.VOID, node_id)
        keys = self._records.get(node_id)
        if keys is None and len(self._records) >= self.max_members:
            return Applied(Outcome.FULL, node_id)
        keys = keys if keys is not None else {}
        newest = _newest(keys)
        old = keys.get(record.node_key)
        if old is not None:
            if old.data == statement.data:
                return Applied(Outcome.KNOWN, node_id)
            if _order(old) >= _order(statement):
                return Applied(Outcome.OLDER, node_id)
        if old is None and len(keys) >= _MAX_KEYS_PER_NODE:
            oldest = min(keys.values(), key=_order)
            if _order(oldest) >= _order(statement):
                return Applied(Outcome.OLDER, node_id)
            del keys[_record(oldest).node_key]
        keys[record.node_key] = statement
        self._records[node_id] = keys
        self._members = None
        if newest is None:
            return Applied(Outcome.ADDED, node_id)
        if _newest(keys) is newest:
            return Applied(Outcome.HELD, node_id)
        return Applied(Outcome.UPDATED, node_id)

    def _count_grant_use(self, grant_id: bytes, expires_at: int, node_id: str) -> None:
        use = self._grants.get(grant_id)
        if use is None:
            if len(self._grants) >= self.max_grants:
                soonest = min(self._grants, key=lambda g: (self._grants[g].expires_at, g))
                del self._grants[soonest]
            use = self._grants[grant_id] = _GrantUse(expires_at)
        if len(use.node_ids) < _MAX_NAMES_PER_GRANT:
            use.node_ids.add(node_id)

    def _apply_revocation(self, statement: Statement, revocation: Revocation, now: int) -> Applied:
        node_id = revocation.node_id
        if revocation.revoked_at_ms > now + MAX_FUTURE_MS:
            return Applied(Outcome.FUTURE, node_id)
        old = self._revocations.get(revocation.node_key)
        if old is not None:
            old_revocation = old.content
            assert isinstance(old_revocation, Revocation)
            if (old_revocation.revoked_at_ms, old.data) >= (
                revocation.revoked_at_ms,
                statement.data,
            ):
                return Applied(Outcome.KNOWN, node_id)
        elif len(self._revocations) >= self.max_revocations:
            oldest = min(
                self._revocations,
                key=lambda k: (_revoked_at(self._revocations[k]), k),
            )
            if (_revoked_at(self._revocations[oldest]), oldest) > (
                revocation.revoked_at_ms,
                revocation.node_key,
            ):
                return Applied(Outcome.OLDER, node_id)  # it would be the first to go
            del self._revocations[oldest]
            self._void_before = _void_times(self._revocations)
        self._revocations[revocation.node_key] = statement
        self._void_before[node_id] = max(
            self._void_before.get(node_id, -1), revocation.revoked_at_ms
        )
        keys = self._records.get(node_id)
        if keys:
            before = _newest(keys)
            for key, held in list(keys.items()):
                if (
                    key == revocation.node_key
                    or _record(held).issued_at_ms <= revocation.revoked_at_ms
                ):
                    del keys[key]
            if not keys:
                del self._records[node_id]
            if _newest(keys) is not before:
                self._members = None
                return Applied(Outcome.REVOKED, node_id)
        return Applied(Outcome.RECORDED, node_id)

    def _apply_policy(self, statement: Statement, policy: JoinPolicy, now: int) -> Applied:
        if policy.grants_not_before_ms > now + MAX_FUTURE_MS:
            return Applied(Outcome.FUTURE)
        current = self.policy
        if current is not None and (current.grants_not_before_ms, self._policy_data()) >= (
            policy.grants_not_before_ms,
            statement.data,
        ):
            return Applied(Outcome.KNOWN)
        self._policy = statement
        return Applied(Outcome.RECORDED)

    def _newest_records(self) -> list[Statement]:
        """Each node id's effective candidate: its newest held record, sorted by node id."""
        out = []
        for node_id in sorted(self._records):
            newest = _newest(self._records[node_id])
            if newest is not None:
                out.append(newest)
        return out

    def _policy_data(self) -> bytes:
        return self._policy.data if self._policy is not None else b""

    def prune(self, now_s: int) -> None:
        """Forget the use counts of expired grants (an expired grant is refused anyway)."""
        for grant_id in [g for g, use in self._grants.items() if use.expires_at < now_s]:
            del self._grants[grant_id]

    # -- queries ------------------------------------------------------------------------------

    def _effective(self) -> dict[str, AdmissionRecord]:
        if self._members is None:
            records = sorted(
                (_record(s) for s in self._newest_records()),
                key=lambda r: (r.issued_at_ms, r.node_id),
            )
            taken: set[object] = set()
            members: dict[str, AdmissionRecord] = {}
            for record in records:
                assert isinstance(record, AdmissionRecord)
                claims: list[object] = [("node", record.node_key)]
                if record.wireguard is not None:
                    claims.append(("wg", record.wireguard.public_key))
                    claims.append(("tunnel", record.wireguard.tunnel_address))
                if any(claim in taken for claim in claims):
                    continue  # shadowed by an older record (see the module docstring)
                taken.update(claims)
                members[record.node_id] = record
            self._members = dict(sorted(members.items()))
        return self._members

    def members(self) -> list[AdmissionRecord]:
        """The admitted nodes (effective records), sorted by node id."""
        return list(self._effective().values())

    def member(self, node_id: str) -> AdmissionRecord | None:
        return self._effective().get(node_id)

    def statement_of(self, node_id: str) -> Statement | None:
        """The signed record of a member (what a hello carries)."""
        if node_id not in self._effective():
            return None
        return _newest(self._records.get(node_id, {}))

    def shadowed(self) -> list[AdmissionRecord]:
        """Records held but not effective (a key or address conflict with an older record)."""
        effective = self._effective()
        return [
            s.content
            for s in self._newest_records()
            if _record(s).node_id not in effective and isinstance(s.content, AdmissionRecord)
        ]

    def revocations(self) -> list[Revocation]:
        return sorted(
            (s.content for s in self._revocations.values() if isinstance(s.content, Revocation)),
            key=lambda r: (r.revoked_at_ms, r.node_id, r.node_key),
        )

    def is_revoked(self, node_key: bytes) -> bool:
        return node_key in self._revocations

    @property
    def policy(self) -> JoinPolicy | None:
        content = self._policy.content if self._policy is not None else None
        return content if isinstance(content, JoinPolicy) else None

    def grant_uses(self, grant_id: bytes) -> frozenset[str]:
        """The node ids admitted with ``grant_id`` (kept until the grant expires)."""
        use = self._grants.get(grant_id)
        return frozenset(use.node_ids) if use is not None else frozenset()

    def grant_usable(self, grant: JoinGrant, node_id: str, now_s: int) -> bool:
        """Whether ``grant`` may admit ``node_id`` now: not expired, not voided by the join
        policy, and a use left (a node already admitted with it does not use another)."""
        if now_s >= grant.expires_at:
            return False
        policy = self.policy
        if policy is not None and grant.issued_at_ms < policy.grants_not_before_ms:
            return False
        used = self.grant_uses(grant.grant_id)
        return node_id in used or len(used) < grant.max_uses

    def statements(self) -> list[Statement]:
        """Every statement held, in a stable order (records, revocations, policy)."""
        out = [
            s
            for node_id in sorted(self._records)
            for s in sorted(self._records[node_id].values(), key=_order)
        ]
        out += sorted(self._revocations.values(), key=lambda s: s.data)
        if self._policy is not None:
            out.append(self._policy)
        return out

    def digest(self) -> bytes:
        """SHA-256 over every statement held: equal digests = nothing to exchange."""
        h = hashlib.sha256(b"rustbalance membership v1")
        for statement in sorted(self.statements(), key=lambda s: s.data):
            h.update(len(statement.data).to_bytes(2, "big"))
            h.update(statement.data)
        return h.digest()

    # -- the members file ---------------------------------------------------------------------

    def to_json(self) -> str:
        """The file text: every statement (base64) and the grant use counts; no secrets."""
        doc: dict[str, Any] = {
            "version": MEMBERS_FILE_VERSION,
            "statements": [base64.b64encode(s.data).decode("ascii") for s in self.statements()],
            "grant_uses": [
                {
                    "grant": grant_id.hex(),
                    "expires_at": use.expires_at,
                    "node_ids": sorted(use.node_ids),
                }
                for grant_id, use in sorted(self._grants.items())
            ],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def load_json(self, text: str, now_ms: int) -> list[str]:
        """Apply a file written by :meth:`to_json`; returns the problems found (statements that
        do not verify are skipped, so a damaged file loses only the damaged entries). Raises
        CoordinationError when the file as a whole is not a members file."""
        if not isinstance(text, str) or len(text) > _MAX_FILE_CHARS:
            raise CoordinationError("members file: not text or too large")
        try:
            doc: Any = json.loads(text)
        except (ValueError, RecursionError):
            raise CoordinationError("members file: not valid JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"version", "statements", "grant_uses"}:
            raise CoordinationError(
                "members file: expected an object with 'version', 'statements', 'grant_uses'"
            )
        if doc["version"] != MEMBERS_FILE_VERSION or isinstance(doc["version"], bool):
            raise CoordinationError(f"members file: unsupported version {doc['version']!r}")
        statements, uses = doc["statements"], doc["grant_uses"]
        if not isinstance(statements, list) or not isinstance(uses, list):
            raise CoordinationError("members file: 'statements' and 'grant_uses' must be lists")
        problems: list[str] = []
        for index, entry in enumerate(statements):
            try:
                if not isinstance(entry, str):
                    raise CoordinationError("not a string")
                data = base64.b64decode(entry.encode("ascii"), validate=True)
                self.apply_bytes(data, now_ms)
            except (CoordinationError, binascii.Error, ValueError, UnicodeEncodeError) as exc:
                problems.append(f"statements[{index}]: {exc}")
        for index, entry in enumerate(uses):
            try:
                self._load_grant_use(entry)
            except (CoordinationError, ValueError) as exc:
                problems.append(f"grant_uses[{index}]: {exc}")
        return problems

    def _load_grant_use(self, entry: object) -> None:
        if not isinstance(entry, dict) or set(entry) != {"grant", "expires_at", "node_ids"}:
            raise CoordinationError("expected 'grant', 'expires_at' and 'node_ids'")
        grant_id = bytes.fromhex(str(entry["grant"]))
        expires_at, node_ids = entry["expires_at"], entry["node_ids"]
        if len(grant_id) != 16 or type(expires_at) is not int or not isinstance(node_ids, list):
            raise CoordinationError("malformed grant use")
        for node_id in node_ids[:_MAX_NAMES_PER_GRANT]:
            if not isinstance(node_id, str):
                raise CoordinationError("node ids must be strings")
            self._count_grant_use(grant_id, expires_at, check_node_id(node_id))


def _record(statement: Statement) -> AdmissionRecord:
    content = statement.content
    assert isinstance(content, AdmissionRecord)  # only records are kept in _records
    return content


def _order(statement: Statement) -> tuple[int, bytes]:
    """Which of two records of one node id is newer (the bytes break a tie: no order left)."""
    return (_record(statement).issued_at_ms, statement.data)


def _newest(keys: dict[bytes, Statement]) -> Statement | None:
    return max(keys.values(), key=_order) if keys else None


def _revoked_at(statement: Statement) -> int:
    content = statement.content
    return content.revoked_at_ms if isinstance(content, Revocation) else 0


def _void_times(revocations: dict[bytes, Statement]) -> dict[str, int]:
    times: dict[str, int] = {}
    for statement in revocations.values():
        content = statement.content
        if isinstance(content, Revocation):
            times[content.node_id] = max(times.get(content.node_id, -1), content.revoked_at_ms)
    return times
