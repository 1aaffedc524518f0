"""node/publication.py: what a master descriptor holds, ring changes, counters (pure)."""

from __future__ import annotations

from rustbalance.descriptor.builder import PowParams
from rustbalance.node.publication import (
    METRICS_MAX_HSDIRS,
    Publication,
    PublishCounters,
    choose_publication,
    descriptor_ring,
    period_result,
    ring_change,
    served_verdict,
)
from rustbalance.node.publish_policy import HsDirResult, PeriodResult
from rustbalance.tor.network import HsDirUpload, PeriodPublish
from tests.node.fakes import (
    NOW,
    VIEW,
    decoded,
    intro_points,
    master_key,
    with_srv,
    without_hsdir,
)

OWN = intro_points(3, seed=1)
PEER = intro_points(2, seed=2)
BACKEND = intro_points(2, seed=3)
POW = PowParams(b"\x01" * 32, 0, NOW + 3600)
FLOW = "1-2 31"


def choose(**kw: object) -> Publication | str:
    args: dict[str, object] = {
        "own_id": "node-a",
        "distinct_mode": "auto",
        "peers": {},
        "backends": {},
        "clustered": False,
        "shared": True,
        "max_intro_points": 20,
        "now": NOW,
    }
    args.update(kw)
    return choose_publication(OWN, FLOW, POW, **args)  # type: ignore[arg-type]


def test_a_single_shared_node_carries_flow_control_and_pow() -> None:
    chosen = choose()
    assert isinstance(chosen, Publication)
    assert chosen.intro_points == OWN
    assert (chosen.flow_control, chosen.pow_params) == (FLOW, POW)
    assert (chosen.nodes, chosen.backends) == (1, 0)


def test_pow_needs_a_single_node_hosting_the_master_key() -> None:
    # An instance's seed is bound to its own blinded key; a cluster's to each node's tor.
    for kw in ({"shared": False}, {"clustered": True}, {"backends": {"b": BACKEND}}):
        chosen = choose(**kw)
        assert isinstance(chosen, Publication)
        assert chosen.pow_params is None, kw


def test_a_cluster_node_alone_keeps_flow_control_but_not_pow() -> None:
    chosen = choose(clustered=True)
    assert isinstance(chosen, Publication)
    assert chosen.flow_control == FLOW
    assert chosen.pow_params is None


def test_peers_are_merged_after_our_own_and_drop_flow_control() -> None:
    chosen = choose(clustered=True, peers={"node-b": PEER})
    assert isinstance(chosen, Publication)
    assert set(chosen.intro_points) == set(OWN) | set(PEER)
    assert chosen.intro_points[0] == OWN[0]  # fair round-robin, ours first
    assert chosen.flow_control is None
    assert chosen.nodes == 2


def test_a_peer_without_intro_points_does_not_count() -> None:
    chosen = choose(clustered=True, peers={"node-b": ()})
    assert isinstance(chosen, Publication)
    assert (chosen.nodes, chosen.flow_control) == (1, FLOW)


def test_backends_are_one_more_node_each_and_drop_flow_control() -> None:
    chosen = choose(backends={"x" * 56: BACKEND})
    assert isinstance(chosen, Publication)
    assert set(chosen.intro_points) == set(OWN) | set(BACKEND)
    assert (chosen.flow_control, chosen.nodes, chosen.backends) == (None, 2, 1)


def test_the_cap_applies_to_the_merged_set() -> None:
    chosen = choose(clustered=True, peers={"node-b": PEER}, max_intro_points=4)
    assert isinstance(chosen, Publication)
    assert len(chosen.intro_points) == 4


def test_nothing_to_publish_is_said() -> None:
    assert (
        choose_publication(
            (),
            FLOW,
            None,
            own_id="node-a",
            peers={},
            backends={},
            clustered=False,
            shared=True,
            max_intro_points=20,
            distinct_mode="auto",
            now=NOW,
        )
        == "no intro points yet"
    )
    # Certificates that expire within a minute are dropped: nothing is left.
    assert choose(now=NOW + 30 * 24 * 3600) == "intro points expire soon"


def test_nodes_are_dealt_in_node_id_order_and_distinct_only_beyond_the_cap() -> None:
    """Distinct descriptors deal from every node by node id (ours among them), then the
    backends by address, so every publisher deals the same layout; they are used only when
    the valid intro points exceed max_intro_points and the mode is "auto"."""
    peers = {"node-c": PEER, "node-0": intro_points(2, seed=4)}
    chosen = choose(clustered=True, peers=peers, backends={"zz": BACKEND}, max_intro_points=20)
    assert isinstance(chosen, Publication)
    assert [node for node, _ in chosen.by_node] == ["node-0", "node-a", "node-c", "zz"]
    assert chosen.by_node[1][1] == OWN
    assert not chosen.distinct  # 9 points fit
    over = choose(clustered=True, peers=peers, backends={"zz": BACKEND}, max_intro_points=8)
    assert isinstance(over, Publication) and over.distinct
    assert over.pow_params is None
    off = choose(peers=peers, max_intro_points=4, distinct_mode="off")
    assert isinstance(off, Publication) and not off.distinct
    assert len(off.intro_points) == 4


def test_served_verdicts() -> None:
    keys = frozenset(p.auth_key for p in OWN)
    assert served_verdict(10, keys, decoded(OWN, revision=10)) == "ok"
    assert served_verdict(10, keys, decoded(OWN, revision=9)) == "older"
    assert served_verdict(10, keys, decoded(OWN, revision=11)) == "foreign"
    assert served_verdict(10, keys, decoded(PEER, revision=10)) == "foreign"
    assert served_verdict(10, keys, None, "NOT_FOUND") == "missing"
    assert served_verdict(10, keys, None, "BAD_DESCRIPTOR") == "bad"
    assert served_verdict(10, keys, None, "TIMEOUT") == "unanswered"


def test_ring_change_tells_a_new_period_or_srv_from_new_hsdirs() -> None:
    key = master_key().public_key
    ring = descriptor_ring(key, VIEW)
    assert len(ring) == 2 and all(fps for _, _, fps in ring)
    assert ring_change(None, None, ring) is None  # nothing published yet
    assert ring_change(ring, None, ring) is None
    new_srv = descriptor_ring(key, with_srv(VIEW, b"\x07" * 32))
    assert ring_change(ring, None, new_srv) == "period"
    assert ring_change(ring, new_srv, new_srv) is None  # already fired for this ring
    moved = descriptor_ring(key, without_hsdir(VIEW))
    assert moved != ring
    assert ring_change(ring, None, moved) == "hsdirs"


def test_period_result_names_each_hsdir_and_explains_a_total_rejection() -> None:
    ok = PeriodPublish("current", 5, 7, 3, (HsDirUpload("AB", "relay1", True),))
    assert period_result(ok) == PeriodResult(True, None, (HsDirResult("$AB~relay1", True),))
    rejected = PeriodPublish("next", 6, 7, 3, (HsDirUpload("CD", "r2", False, "UPLOAD_REJECTED"),))
    result = period_result(rejected)
    assert not result.ok
    assert result.error == "no responsible HSDir accepted the descriptor"
    failed = PeriodPublish("next", 6, 0, 3, error="tor went away")
    assert period_result(failed).error == "tor went away"


def test_counters_keep_the_newest_hsdirs_only() -> None:
    counters = PublishCounters()
    for n in range(METRICS_MAX_HSDIRS + 6):
        hsdir = HsDirResult(f"${n:040X}~relay", n % 2 == 0)
        counters.record({"current": PeriodResult(True, None, (hsdir,))})
    assert len(counters.hsdir_last) == METRICS_MAX_HSDIRS
    assert f"{METRICS_MAX_HSDIRS + 5:040X}" in counters.hsdir_last
    assert f"{0:040X}" not in counters.hsdir_last
    assert counters.hsdir_uploads == {"ok": 35, "failed": 35}
    counters.record_failure()
    assert counters.periods == {"current": {"ok": 70, "failed": 1}, "next": {"ok": 0, "failed": 1}}
