"""node/cluster_mode.py: who publishes and tor's native publishing (pure, injected time).

One test per rule of the module doc, then hypothesis properties over random observation
sequences (like tests/cluster/test_election.py for the election)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.keys import IdentityKey
from rustbalance.node.cluster_link import MergeSignature
from rustbalance.node.cluster_mode import (
    Action,
    ClusterMode,
    ModePolicy,
    Observed,
    Republish,
    RoleChanged,
    SetEligible,
    SetNativePublishing,
)
from rustbalance.node.identity import NodeIdentity
from tests.budget import budget

TIMEOUT = 15.0
SIG_NONE: MergeSignature = (False, frozenset(), ())
SIG_OWN: MergeSignature = (False, frozenset({b"a"}), ())
SIG_PEER: MergeSignature = (True, frozenset({b"a"}), (("node-b", frozenset({b"b"})),))
SIG_PEER2: MergeSignature = (True, frozenset({b"a"}), (("node-b", frozenset({b"c"})),))


def policy(**kw: object) -> ModePolicy:
    base = ModePolicy(
        has_master_key=True,
        clustered=True,
        native_publishes_master=True,
        has_backends=False,
        publisher_eligible=True,
        alone_after=TIMEOUT,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def seen(**kw: object) -> Observed:
    base = Observed(
        is_multi=False,
        holds_lease=False,
        tor_running=True,
        own_intro_points=3,
        signature=SIG_OWN,
        publishing=False,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def of(actions: Sequence[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def republished(actions: Sequence[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Republish)]


# -- single node -------------------------------------------------------------------------------


def test_single_node_always_publishes_and_keeps_native_publishing() -> None:
    mode = ClusterMode(policy(clustered=False))
    assert mode.native_publishing_at_start()
    assert mode.should_publish(0.0, is_multi=False, holds_lease=False)
    assert mode.native_publishing_wanted(0.0, is_multi=False)


def test_a_node_without_the_master_key_never_publishes() -> None:
    for clustered in (False, True):
        mode = ClusterMode(policy(has_master_key=False, clustered=clustered))
        mode.begin(0.0, is_multi=False)
        mode.step(0.0, seen())
        assert not mode.should_publish(100.0, is_multi=False, holds_lease=True)
        assert not mode.should_publish(100.0, is_multi=True, holds_lease=True)


def test_instance_mode_keeps_native_publishing_on_always() -> None:
    mode = ClusterMode(policy(native_publishes_master=False))
    assert mode.native_publishing_at_start()
    mode.begin(0.0, is_multi=True)
    assert mode.native_publishing_wanted(0.0, is_multi=True)
    assert of(mode.step(0.0, seen(is_multi=True)), SetNativePublishing) == [
        SetNativePublishing(True)
    ]


def test_shared_mode_with_backends_keeps_native_publishing_off_even_alone() -> None:
    mode = ClusterMode(policy(clustered=False, has_backends=True))
    assert not mode.native_publishing_at_start()
    assert not mode.native_publishing_wanted(1000.0, is_multi=False)
    assert mode.should_publish(0.0, is_multi=False, holds_lease=False)


# -- cluster -----------------------------------------------------------------------------------


def test_a_cluster_node_starts_with_native_publishing_off() -> None:
    assert not ClusterMode(policy()).native_publishing_at_start()


def test_alone_at_start_up_waits_a_heartbeat_timeout_then_publishes_alone() -> None:
    mode = ClusterMode(policy())
    mode.begin(100.0, is_multi=False)
    first = mode.step(100.0, seen())
    assert first == [SetNativePublishing(False)]
    mode.native_applied(False)
    assert mode.step(100.0 + TIMEOUT - 0.1, seen()) == []
    assert not mode.should_publish(100.0 + TIMEOUT - 0.1, is_multi=False, holds_lease=False)
    settled = mode.step(100.0 + TIMEOUT, seen())
    assert settled == [
        SetNativePublishing(True),
        RoleChanged(publisher=True, multi=False),
        Republish("became publisher"),
    ]


def test_a_revoked_node_never_publishes_and_tor_stops_publishing_the_master() -> None:
    """Issue 16: coordination says this node was revoked. Alone and settled (where it would
    publish, and tor too), it steps down and switches tor's native publishing off."""
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=False)
    assert mode.step(0.0, seen()) == [SetNativePublishing(False)]
    mode.native_applied(False)
    assert RoleChanged(publisher=True, multi=False) in mode.step(TIMEOUT, seen())
    mode.native_applied(True)
    actions = mode.step(TIMEOUT + 1, seen(holds_lease=True, revoked=True))
    assert actions == [SetNativePublishing(False), RoleChanged(publisher=False, multi=False)]
    mode.native_applied(False)
    for is_multi in (False, True):
        assert not mode.should_publish(1000.0, is_multi, holds_lease=True, revoked=True)
        assert not mode.native_publishing_wanted(1000.0, is_multi, revoked=True)
    assert of(mode.step(1000.0, seen(holds_lease=True, revoked=True)), RoleChanged) == []


def test_a_node_whose_last_peer_expired_publishes_at_once() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    mode.step(0.0, seen(is_multi=True))
    mode.native_applied(False)
    # The peer was silent for a timeout already when coordination drops it.
    actions = mode.step(50.0, seen(is_multi=False))
    assert SetNativePublishing(True) in actions
    assert RoleChanged(publisher=True, multi=False) in actions


def test_in_a_cluster_the_lease_holder_publishes_and_native_publishing_is_off() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    actions = mode.step(0.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER))
    assert actions == [
        SetNativePublishing(False),
        RoleChanged(publisher=True, multi=True),
        Republish("became publisher"),
    ]
    mode.native_applied(False)
    lost = mode.step(1.0, seen(is_multi=True, holds_lease=False, signature=SIG_PEER))
    assert lost == [RoleChanged(False, True)]


def test_becoming_publisher_without_any_intro_points_does_not_republish() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    actions = mode.step(
        0.0, seen(is_multi=True, holds_lease=True, own_intro_points=0, signature=SIG_NONE)
    )
    assert RoleChanged(True, True) in actions
    assert republished(actions) == []


def test_eligibility_follows_the_config_and_tor() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    assert of(mode.step(0.0, seen(is_multi=True)), SetEligible) == []
    assert of(mode.step(1.0, seen(is_multi=True, tor_running=False)), SetEligible) == [
        SetEligible(False)
    ]
    assert of(mode.step(2.0, seen(is_multi=True, tor_running=False)), SetEligible) == []
    assert of(mode.step(3.0, seen(is_multi=True)), SetEligible) == [SetEligible(True)]
    never = ClusterMode(policy(publisher_eligible=False))
    never.begin(0.0, is_multi=True)
    assert of(never.step(0.0, seen(is_multi=True)), SetEligible) == []


def test_a_merged_set_change_republishes_after_the_debounce() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    mode.step(0.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER))
    mode.native_applied(False)
    mode.record_published(SIG_PEER)
    assert mode.step(1.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER)) == []
    changed = seen(is_multi=True, holds_lease=True, signature=SIG_PEER2)
    assert mode.step(2.0, changed) == []  # the change is noticed
    assert mode.step(3.4, changed) == []  # 1.4 s: still within the debounce
    assert republished(mode.step(3.5, changed)) == ["cluster intro points changed"]
    # Published: nothing more while it stays the same.
    mode.record_published(SIG_PEER2)
    assert mode.step(10.0, changed) == []


def test_no_republish_decision_while_an_upload_is_in_flight() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    mode.step(0.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER))
    mode.native_applied(False)
    mode.record_published(SIG_PEER)
    assert mode.step(0.5, seen(is_multi=True, holds_lease=True, signature=SIG_PEER)) == []
    busy = seen(is_multi=True, holds_lease=True, signature=SIG_PEER2, publishing=True)
    assert mode.step(1.0, busy) == []
    assert mode.step(9.0, busy) == []
    idle = dataclasses.replace(busy, publishing=False)
    assert mode.step(9.5, idle) == []  # the debounce starts only now
    assert republished(mode.step(11.0, idle)) == ["cluster intro points changed"]


def test_a_change_that_reverts_within_the_debounce_is_not_republished() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    mode.step(0.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER))
    mode.native_applied(False)
    mode.record_published(SIG_PEER)
    mode.step(1.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER2))
    assert mode.step(2.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER)) == []
    assert mode.step(5.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER2)) == []


def test_a_standby_forgets_what_it_published() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    mode.step(0.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER))
    mode.record_published(SIG_PEER)
    mode.step(1.0, seen(is_multi=True, holds_lease=False, signature=SIG_PEER))
    assert mode.published_signature is None


def test_native_publishing_is_asked_for_until_tor_accepted_it() -> None:
    mode = ClusterMode(policy())
    mode.begin(0.0, is_multi=True)
    assert of(mode.step(0.0, seen(is_multi=True)), SetNativePublishing) == [
        SetNativePublishing(False)
    ]
    # The SETCONF failed (tor restarting): asked again at the next step.
    assert of(mode.step(1.0, seen(is_multi=True)), SetNativePublishing) == [
        SetNativePublishing(False)
    ]
    assert mode.native_applied(False)
    assert not mode.native_applied(False)  # a re-apply after a reconnect is no change
    assert of(mode.step(2.0, seen(is_multi=True)), SetNativePublishing) == []


# -- an authoritative lease (the etcd backend) ------------------------------------------------


def test_with_a_lease_only_backend_a_node_alone_never_publishes_by_itself() -> None:
    """etcd: a node that hears no peer may be the one cut off from etcd; publishing alone
    would give two publishers. Only the lease decides, however long it has been alone."""
    mode = ClusterMode(policy(lease_only=True))
    mode.begin(0.0, is_multi=False)
    assert mode.step(0.0, seen()) == [SetNativePublishing(False)]
    mode.native_applied(False)
    for now in (TIMEOUT, 10 * TIMEOUT, 1000 * TIMEOUT):
        actions = mode.step(now, seen())
        assert actions == []
        assert not mode.should_publish(now, is_multi=False, holds_lease=False)
        # tor's native publishing of the master stays off too (it would publish alone).
        assert not mode.native_publishing_wanted(now, is_multi=False)


def test_with_a_lease_only_backend_the_lease_holder_publishes_alone_or_not() -> None:
    """The only node registered in etcd holds the lease: it publishes its own intro points
    (and tor's native publishing stays off: the node publishes the master itself)."""
    mode = ClusterMode(policy(lease_only=True))
    mode.begin(0.0, is_multi=False)
    actions = mode.step(0.0, seen(holds_lease=True))
    assert actions == [
        SetNativePublishing(False),
        RoleChanged(publisher=True, multi=False),
        Republish("became publisher"),
    ]
    mode.native_applied(False)
    # A peer registers: still the publisher, now merging.
    assert mode.step(1.0, seen(is_multi=True, holds_lease=True, signature=SIG_PEER)) == []
    # The lease is lost (cut off from etcd, the peer's view unknown): a standby at once.
    lost = mode.step(2.0, seen(is_multi=True, holds_lease=False, signature=SIG_PEER))
    assert RoleChanged(publisher=False, multi=True) in lost
    # Its last peer vanished from its view as well (the watch broke): still a standby.
    assert of(mode.step(50.0, seen(holds_lease=False)), RoleChanged) == []


def test_with_a_lease_only_backend_instance_mode_keeps_native_publishing() -> None:
    mode = ClusterMode(policy(lease_only=True, native_publishes_master=False))
    assert mode.native_publishing_at_start()
    mode.begin(0.0, is_multi=False)
    assert mode.native_publishing_wanted(100.0, is_multi=False)


def test_the_lease_only_rule_is_set_by_the_etcd_backend_only() -> None:
    from rustbalance.config import parse_config

    base = (
        '[node]\nid = "node-a"\n[master]\nidentity_key_path = "m.key"\n'
        '[target]\naddress = "127.0.0.1:80"\n[tor]\n'
    )
    etcd = (
        '[coordination]\nbackend = "etcd"\n[etcd]\nendpoints = ["127.0.0.1:2379"]\n'
        'ca_path = "ca.pem"\ncert_path = "c.pem"\nkey_path = "k.pem"\n'
    )
    key = IdentityKey.from_seed(bytes(32))
    identity = NodeIdentity("shared", key.onion_address, key, key)
    embedded = ModePolicy.for_node(parse_config(base, "/"), identity, clustered=True)
    assert not embedded.lease_only
    etcd_policy = ModePolicy.for_node(parse_config(base + etcd, "/"), identity, clustered=True)
    assert etcd_policy.lease_only


# -- properties over random observation sequences ---------------------------------------------

SIGNATURES = (SIG_NONE, SIG_OWN, SIG_PEER, SIG_PEER2)

observation = st.builds(
    Observed,
    is_multi=st.booleans(),
    holds_lease=st.booleans(),
    tor_running=st.booleans(),
    own_intro_points=st.integers(0, 3),
    signature=st.sampled_from(SIGNATURES),
    publishing=st.booleans(),
    # Rarely: a revocation is for good in a real run; here it may come and go.
    revoked=st.sampled_from([False, False, False, True]),
)
policies = st.builds(
    ModePolicy,
    has_master_key=st.booleans(),
    clustered=st.just(True),
    native_publishes_master=st.booleans(),
    has_backends=st.booleans(),
    publisher_eligible=st.booleans(),
    alone_after=st.sampled_from([5.0, 15.0]),
    lease_only=st.booleans(),
)
steps = st.lists(
    st.tuples(
        # Seconds since the step before: around the debounce (1.5 s) and the timeouts.
        st.sampled_from([0.0, 0.4, 1.0, 1.49, 1.5, 2.0, 4.99, 5.0, 14.99, 15.0, 20.0]),
        observation,
        st.booleans(),  # tor accepts a SetNativePublishing
        st.booleans(),  # a publish succeeds after this step
    ),
    max_size=40,
)


@settings(max_examples=budget(150), deadline=None)
@given(policy_=policies, sequence=steps, start_multi=st.booleans())
def test_properties_of_random_runs(
    policy_: ModePolicy,
    sequence: list[tuple[float, Observed, bool, bool]],
    start_multi: bool,
) -> None:
    mode = ClusterMode(policy_)
    now = 0.0
    mode.begin(now, start_multi)
    alone_since: float | None = None if start_multi else now
    role = False
    eligible = policy_.publisher_eligible
    differs_since: float | None = None  # the merged set differs from what was published
    for dt, observed, accepted, published in sequence:
        now += dt
        if observed.is_multi:
            alone_since = None
        elif alone_since is None:
            alone_since = now - policy_.alone_after
        was_published = mode.published_signature
        actions = mode.step(now, observed)
        publisher = mode.should_publish(
            now, observed.is_multi, observed.holds_lease, observed.revoked
        )
        if not publisher:
            differs_since = None
        elif not observed.publishing:
            if observed.signature == was_published:
                differs_since = None
            elif differs_since is None:
                differs_since = now

        # Who publishes: never without the key, never a revoked node (issue 16); the lease
        # holder in a cluster; a node alone only after alone_after without peers, and never
        # with a lease-only backend (etcd): there the lease is the whole answer.
        if not policy_.has_master_key or observed.revoked:
            assert not publisher
        elif policy_.lease_only or observed.is_multi:
            assert publisher == observed.holds_lease
        elif not observed.holds_lease:
            assert publisher == (
                alone_since is not None and now - alone_since >= policy_.alone_after
            )

        # Native publishing: asked for only when it differs from what tor has; off in a
        # cluster and with backends in shared mode, always on in instance mode.
        wanted = mode.native_publishing_wanted(now, observed.is_multi, observed.revoked)
        for action in of(actions, SetNativePublishing):
            assert isinstance(action, SetNativePublishing)
            assert action.on == wanted != mode.native_publishing
            if accepted:
                mode.native_applied(action.on)
        if not policy_.native_publishes_master:
            assert wanted
        elif policy_.has_backends or observed.is_multi or policy_.lease_only or observed.revoked:
            assert not wanted

        # The role is logged once per change, and a standby has nothing published.
        for action in of(actions, RoleChanged):
            assert isinstance(action, RoleChanged)
            assert action.publisher != role
            role = action.publisher
        assert role == publisher
        if not publisher:
            assert mode.published_signature is None

        # Eligibility is reported on change only, and follows the config and tor.
        for action in of(actions, SetEligible):
            assert isinstance(action, SetEligible)
            assert action.eligible != eligible
            eligible = action.eligible
        assert eligible == (policy_.publisher_eligible and observed.tor_running)

        # Republishing: only a publisher with intro points; for a change of the merged set
        # only when no upload is in flight and the set has differed from what was published
        # for at least the debounce.
        has_points = observed.own_intro_points > 0 or bool(observed.signature[2])
        for reason in republished(actions):
            assert publisher and has_points
            if policy_.lease_only:
                assert observed.holds_lease
            if reason == "cluster intro points changed":
                assert not observed.publishing
                assert differs_since is not None
                assert now - differs_since >= policy_.republish_debounce
                differs_since = None

        if published and publisher:
            mode.record_published(observed.signature)
