"""Master-signed statements and the membership state (issue 16), pure: no sockets, no sleeps.

The property that matters most: the membership a node ends up with depends only on the set of
statements it has seen, never on their order, so every node that saw the same statements (in
whatever order gossip brought them) agrees on who is a member.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.authority import (
    DOMAIN,
    NO_GRANT,
    AdmissionRecord,
    JoinGrant,
    JoinPolicy,
    Revocation,
    Statement,
    StatementKind,
    WireGuardIdentity,
    decode_statement,
    grant_secret_hash,
)
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME, load_membership_file
from rustbalance.cluster.membership import MAX_FUTURE_MS, Membership, Outcome
from rustbalance.cluster.wire import CoordinationError, RejectReason
from tests.budget import budget
from tests.trust import (
    MASTER,
    OTHER_MASTER,
    grant,
    membership,
    node_key,
    now_ms,
    record,
    revocation,
    signed,
)

NOW_MS = 1_800_000_000_000


def fresh() -> Membership:
    return Membership(MASTER.public_key)


# -- statements ---------------------------------------------------------------------------------


def test_every_statement_round_trips_and_is_bound_to_the_master_key() -> None:
    contents = [
        record("node-a", tunnel="10.99.0.1", coordination="10.99.0.1:51821", issued_at_ms=NOW_MS),
        record("node-b", eligible=False, holds_master_key=True, issued_at_ms=NOW_MS),
        Revocation("node-a", node_key("node-a").public, NOW_MS, "node-b"),
        JoinPolicy(NOW_MS, "node-b"),
        grant(issued_at_ms=NOW_MS).content,
    ]
    for content in contents:
        statement = signed(content)  # type: ignore[arg-type]
        assert decode_statement(statement.data, MASTER.public_key) == statement
        with pytest.raises(CoordinationError) as info:
            decode_statement(statement.data, OTHER_MASTER.public_key)
        assert info.value.reason is RejectReason.FORGED
        # The signature covers the domain and the kind: the same body as another kind fails.
        other_kind = bytes([(statement.data[0] % 4) + 1]) + statement.data[1:]
        with pytest.raises(CoordinationError):
            decode_statement(other_kind, MASTER.public_key)
    assert DOMAIN.endswith(b"\x00")


def test_statement_validation() -> None:
    with pytest.raises(CoordinationError, match="must hold the master key"):
        record("node-a", eligible=True, holds_master_key=False)
    with pytest.raises(CoordinationError):
        record("bad id!")
    with pytest.raises(CoordinationError, match="node key"):
        AdmissionRecord("n", bytes(32), 1, 1, False, False, "127.0.0.1:1", None, NO_GRANT, 0, "i")
    with pytest.raises(CoordinationError, match="canonical"):
        record("n", coordination="[FD00::1]:1")
    with pytest.raises(CoordinationError, match="unicast"):
        WireGuardIdentity(b"\x01" * 32, "192.0.2.1:1", "224.0.0.1")
    with pytest.raises(CoordinationError, match="all-zero"):
        WireGuardIdentity(bytes(32), "192.0.2.1:1", "10.0.0.1")
    with pytest.raises(CoordinationError, match="expire after"):
        JoinGrant(b"\x01" * 16, b"\x00" * 32, NOW_MS, NOW_MS // 1000, 1, False, "i")
    with pytest.raises(CoordinationError, match="max_uses"):
        JoinGrant(b"\x01" * 16, b"\x00" * 32, NOW_MS, NOW_MS // 1000 + 1, 0, False, "i")
    with pytest.raises(CoordinationError, match="reserved"):
        JoinGrant(NO_GRANT, b"\x00" * 32, NOW_MS, NOW_MS // 1000 + 1, 1, False, "i")
    assert grant_secret_hash(b"a") != grant_secret_hash(b"b")


@settings(max_examples=budget(300), deadline=None)
@given(st.binary(max_size=1100))
def test_fuzz_decode_statement_only_raises_coordination_error(data: bytes) -> None:
    with contextlib.suppress(CoordinationError):
        decode_statement(data, MASTER.public_key)


@settings(max_examples=budget(300), deadline=None)
@given(st.sampled_from(list(StatementKind)), st.binary(max_size=600))
def test_fuzz_authentic_statement_bodies(kind: StatementKind, body: bytes) -> None:
    """Correctly signed but arbitrary bodies: decoding raises only CoordinationError, and what
    it accepts encodes back to the same body."""
    data = bytes([kind]) + body + MASTER.sign(DOMAIN + bytes([kind]) + body)
    try:
        statement = decode_statement(data, MASTER.public_key)
    except CoordinationError:
        return
    assert statement.content.body() == body


# -- the membership -----------------------------------------------------------------------------


def test_newest_record_wins_and_older_ones_are_ignored() -> None:
    m = fresh()
    old = signed(record("node-a", priority=10, issued_at_ms=NOW_MS))
    new = signed(record("node-a", priority=5, issued_at_ms=NOW_MS + 1))
    assert m.apply(old, NOW_MS).outcome is Outcome.ADDED
    assert m.apply(new, NOW_MS).outcome is Outcome.UPDATED
    assert m.apply(old, NOW_MS).outcome is Outcome.OLDER
    assert m.apply(new, NOW_MS).outcome is Outcome.KNOWN
    member = m.member("node-a")
    assert member is not None and member.priority == 5


def test_a_revocation_removes_the_node_for_good_but_allows_a_new_key() -> None:
    m = fresh()
    m.apply(signed(record("node-a", issued_at_ms=NOW_MS)), NOW_MS)
    applied = m.apply(revocation("node-a", at_ms=NOW_MS + 10), NOW_MS)
    assert applied.outcome is Outcome.REVOKED and applied.node_id == "node-a"
    assert m.member("node-a") is None and m.is_revoked(node_key("node-a").public)
    # The old record relayed by a stale node, or re-signed with the revoked key: void.
    again = m.apply(signed(record("node-a", issued_at_ms=NOW_MS)), NOW_MS)
    assert again.outcome is Outcome.VOID
    later_same_key = signed(record("node-a", issued_at_ms=NOW_MS + 20))
    assert m.apply(later_same_key, NOW_MS).outcome is Outcome.VOID
    # A re-admission with a new node key, after the revocation: a member again.
    readmitted = record("node-a", key=node_key("node-a", 1), issued_at_ms=NOW_MS + 20)
    assert m.apply(signed(readmitted), NOW_MS).outcome is Outcome.ADDED
    assert m.member("node-a") == readmitted


def test_conflicting_records_are_shadowed_by_the_older_one() -> None:
    m = fresh()
    first = record("node-a", tunnel="10.99.0.5", issued_at_ms=NOW_MS)
    clash = record("node-b", tunnel="10.99.0.5", issued_at_ms=NOW_MS + 1)
    same_key = record("node-c", key=node_key("node-a"), issued_at_ms=NOW_MS + 2)
    for content in (clash, same_key, first):
        m.apply(signed(content), NOW_MS)
    assert [r.node_id for r in m.members()] == ["node-a"]
    assert {r.node_id for r in m.shadowed()} == {"node-b", "node-c"}


def test_records_from_the_future_are_refused() -> None:
    m = fresh()
    far = signed(record("node-a", issued_at_ms=NOW_MS + MAX_FUTURE_MS + 1))
    assert m.apply(far, NOW_MS).outcome is Outcome.FUTURE
    assert m.apply(revocation("node-a", at_ms=NOW_MS + MAX_FUTURE_MS + 1), NOW_MS).outcome is (
        Outcome.FUTURE
    )
    assert m.members() == []


def test_bounds() -> None:
    m = Membership(MASTER.public_key, max_members=3, max_revocations=2, max_grants=2)
    outcomes = [
        m.apply(signed(record(f"n{i}", issued_at_ms=NOW_MS)), NOW_MS).outcome for i in range(5)
    ]
    assert outcomes == [Outcome.ADDED] * 3 + [Outcome.FULL] * 2
    for i in range(4):
        m.apply(revocation(f"gone{i}", at_ms=NOW_MS + i), NOW_MS)
    assert len(m.revocations()) == 2
    assert [r.node_id for r in m.revocations()] == ["gone2", "gone3"]  # the oldest went first
    m2 = Membership(MASTER.public_key, max_grants=2)
    for i in range(4):
        rec = record(f"j{i}", issued_at_ms=NOW_MS, grant_id=bytes([i + 1]) * 16,
                     grant_expires_at=NOW_MS // 1000 + i + 1)  # fmt: skip
        m2.apply(signed(rec), NOW_MS)
    assert m2.grant_uses(b"\x01" * 16) == frozenset() and m2.grant_uses(b"\x04" * 16) == {"j3"}


def test_grant_uses_are_counted_and_outlive_a_revocation() -> None:
    m = fresh()
    g = grant(issued_at_ms=NOW_MS, max_uses=1).content
    assert isinstance(g, JoinGrant)
    now_s = NOW_MS // 1000
    assert m.grant_usable(g, "node-x", now_s)
    used = record("node-x", issued_at_ms=NOW_MS, grant_id=g.grant_id,
                  grant_expires_at=g.expires_at)  # fmt: skip
    m.apply(signed(used), NOW_MS)
    assert m.grant_usable(g, "node-x", now_s)  # the same node again: a repeat, not a use
    assert not m.grant_usable(g, "node-y", now_s)  # used up
    m.apply(revocation("node-x", at_ms=NOW_MS + 1), NOW_MS)
    assert not m.grant_usable(g, "node-y", now_s)  # still used up after the revocation
    assert not m.grant_usable(g, "node-x", g.expires_at)  # expired
    m.prune(g.expires_at + 1)
    assert m.grant_uses(g.grant_id) == frozenset()


def test_rotating_the_join_secret_voids_older_grants() -> None:
    m = fresh()
    old = grant(issued_at_ms=NOW_MS).content
    newer = grant(issued_at_ms=NOW_MS + 5000, grant_id=b"\x08" * 16).content
    assert isinstance(old, JoinGrant) and isinstance(newer, JoinGrant)
    assert m.apply(signed(JoinPolicy(NOW_MS + 1000, "node-a")), NOW_MS + 1000).changed
    assert not m.grant_usable(old, "node-x", NOW_MS // 1000 + 10)
    assert m.grant_usable(newer, "node-x", NOW_MS // 1000 + 10)
    # An older policy does not undo it.
    older = signed(JoinPolicy(NOW_MS, "node-b"))
    assert m.apply(older, NOW_MS).outcome is Outcome.KNOWN
    assert m.policy == JoinPolicy(NOW_MS + 1000, "node-a")


def test_join_grants_are_not_membership() -> None:
    assert fresh().apply(grant(), NOW_MS).outcome is Outcome.NOT_MEMBERSHIP


def test_members_file_round_trip_and_damage() -> None:
    m = fresh()
    m.apply(signed(record("node-a", tunnel="10.99.0.1", issued_at_ms=NOW_MS)), NOW_MS)
    m.apply(signed(record("node-b", issued_at_ms=NOW_MS, grant_id=b"\x02" * 16,
                          grant_expires_at=NOW_MS // 1000 + 99)), NOW_MS)  # fmt: skip
    m.apply(revocation("node-c", at_ms=NOW_MS), NOW_MS)
    m.apply(signed(JoinPolicy(NOW_MS, "node-a")), NOW_MS)
    text = m.to_json()
    copy = fresh()
    assert copy.load_json(text, NOW_MS) == []
    assert copy.to_json() == text and copy.digest() == m.digest()
    doc = json.loads(text)
    doc["statements"][0] = doc["statements"][0][:-8] + "AAAAAAA="  # a damaged signature
    damaged = fresh()
    problems = damaged.load_json(json.dumps(doc), NOW_MS)
    assert len(problems) == 1 and "statements[0]" in problems[0]
    assert len(damaged.members()) == 1  # the rest is kept
    for broken in ("{", "[]", json.dumps({**doc, "version": 9})):
        with pytest.raises(CoordinationError):
            fresh().load_json(broken, NOW_MS)
    # A file of another cluster (another master key) keeps nothing.
    other = Membership(OTHER_MASTER.public_key)
    assert len(other.load_json(text, NOW_MS)) == 4 and other.members() == []


# -- properties ---------------------------------------------------------------------------------

NAMES = ("node-a", "node-b", "node-c")
TUNNELS = ("10.99.0.1", "10.99.0.2", None)


def _statement(draw: st.DrawFn) -> Statement:
    kind = draw(st.sampled_from(("record", "record", "revocation", "policy")))
    name = draw(st.sampled_from(NAMES))
    at = NOW_MS + draw(st.integers(0, 20))
    generation = draw(st.integers(0, 2))
    if kind == "record":
        return signed(
            record(
                name,
                key=node_key(name, generation),
                priority=draw(st.integers(0, 3)),
                tunnel=draw(st.sampled_from(TUNNELS)),
                issued_at_ms=at,
                grant_id=draw(st.sampled_from((NO_GRANT, b"\x01" * 16))),
                grant_expires_at=NOW_MS // 1000 + 100,
            )
        )
    if kind == "revocation":
        return revocation(name, node_key(name, generation), at)
    return signed(JoinPolicy(at, name))


statements = st.lists(st.composite(_statement)(), max_size=12, unique_by=lambda s: s.data)


def _state(m: Membership) -> tuple[object, ...]:
    return (
        tuple(m.members()),
        tuple(m.revocations()),
        m.policy,
        m.grant_uses(b"\x01" * 16),
        m.digest(),
    )


@settings(max_examples=budget(200), deadline=None)
@given(statements, st.randoms(use_true_random=False))
def test_the_membership_does_not_depend_on_the_order(
    items: list[Statement], rnd: random.Random
) -> None:
    forward, shuffled = fresh(), fresh()
    for statement in items:
        assert forward.apply(statement, NOW_MS) is not None
    order = list(items)
    rnd.shuffle(order)
    for statement in order:
        shuffled.apply(statement, NOW_MS)
    assert _state(forward) == _state(shuffled)
    # Applying everything again (gossip repeats itself) changes nothing.
    for statement in items:
        assert not forward.apply(statement, NOW_MS).changed
    assert _state(forward) == _state(shuffled)


@settings(max_examples=budget(200), deadline=None)
@given(statements)
def test_the_membership_invariants_hold(items: list[Statement]) -> None:
    m = Membership(MASTER.public_key, max_members=2, max_revocations=3)
    for statement in items:
        m.apply(statement, NOW_MS)
        members = m.members()
        assert len(members) <= 2 and len(m.revocations()) <= 3
        keys = [r.node_key for r in members]
        assert len(set(keys)) == len(keys)
        assert not any(m.is_revoked(k) for k in keys)
        tunnels = [r.wireguard.tunnel_address for r in members if r.wireguard]
        assert len(set(tunnels)) == len(tunnels)
    copy = fresh()
    copy.load_json(m.to_json(), NOW_MS)
    assert copy.members() == m.members() or len(m.shadowed()) > 0


# -- the members file on disk ------------------------------------------------------------------


def test_the_members_file_is_never_followed_through_a_symlink_or_read_from_a_fifo(
    tmp_path: Path,
) -> None:
    """``rustbalance prepare`` reads the members file as root from the service user's state
    folder (whether the node is clustered): a symlink planted there is not followed (it could
    point at any file root can read), and a FIFO does not block the reader."""
    real = tmp_path / "elsewhere.json"
    real.write_text(membership(record("node-a"), record("node-b")).to_json())
    assert len(load_membership_file(real, MASTER.public_key, now_ms())[0].members()) == 2
    link = tmp_path / MEMBERS_FILE_NAME
    link.symlink_to(real)
    loaded, problems = load_membership_file(link, MASTER.public_key, now_ms())
    assert loaded.members() == [] and len(problems) == 1
    assert problems[0].startswith(f"cannot read {link}: ")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    result: list[tuple[Membership, list[str]]] = []
    reader = threading.Thread(
        target=lambda: result.append(load_membership_file(fifo, MASTER.public_key, now_ms())),
        daemon=True,
    )
    reader.start()
    reader.join(timeout=5.0)
    blocked = reader.is_alive()
    if blocked:  # release the reader (a writer that closes at once: EOF)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5.0)
    assert not blocked, "a FIFO blocked the reader"
    assert result[0][0].members() == [] and result[0][1][0].startswith(f"cannot read {fifo}: ")
