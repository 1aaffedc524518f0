"""Distinct descriptors per HSDir in node/publisher.py, with a fake tor network (issue 19).

The fake (tests/node/fakes.py) stands in for what real tor cannot do on demand: an upload
that times out at one HSDir, an HSDir that serves an older round, another publisher's
descriptor or one that does not verify, a new rotation epoch at once. The 10-node cluster on
the private Tor network (tests/node_e2e/test_distinct.py) proves the same code end to end.
The view has 10 HSDirs with tor's ring (8 store, 6 fetch), like the session test network.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from rustbalance.crypto.blinding import blind_public_key
from rustbalance.crypto.time_period import LIVE_TIME_PARAMS
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.coordination import CoordinationFacts
from rustbalance.node.distinct_round import ROTATION_SECS
from rustbalance.node.metrics import NodeMetrics
from rustbalance.node.publisher import FENCED, VERIFY_MAX_REPUBLISHES
from rustbalance.node.snapshot import (
    IntroSnapshot,
    NodeSnapshot,
    TorSnapshot,
    metrics_values,
    status_document,
)
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.network import HsDirUpload, NetworkView, decode_for_view
from tests.node.fakes import NOW, decoded, intro_points, ten_hsdirs
from tests.node.test_publisher import ADDRESS, KEY, OWN, Node, make_node

VIEW10 = ten_hsdirs()
# node-a (us, OWN) and nine peers with 3 intro points each: 30 > 20.
PEERS = {f"node-{c}": intro_points(3, seed=10 + i) for i, c in enumerate("bcdefghij")}


def owner_of(peers: dict[str, tuple[IntroPoint, ...]]) -> dict[bytes, str]:
    owner = {p.auth_key: "node-a" for p in OWN}
    owner.update({p.auth_key: node for node, pts in peers.items() for p in pts})
    return owner


def cluster_node(
    tmp_path: Path,
    peers: dict[str, tuple[IntroPoint, ...]] = PEERS,
    *,
    publish: str = "",
    view: NetworkView = VIEW10,
) -> Node:
    node = make_node(tmp_path, clustered=True, publish=publish, view=view)
    node.role.current = CoordinationFacts(True, True, dict(peers))
    return node


def targets(view: NetworkView) -> list[tuple[list[HSDirRelay], list[HSDirRelay]]]:
    """(store, fetch) HSDirs of the first and the second descriptor."""
    rings = []
    for target in view.descriptor_targets():
        blinded = blind_public_key(KEY.public_key, target.time_period, view.period_length)
        rings.append(
            (view.store_hsdirs(blinded, target), view.target_fetch_hsdirs(blinded, target))
        )
    return rings


def served_sets(node: Node, call: int) -> dict[str, tuple[int, frozenset[bytes]]]:
    """What one upload_per_hsdir call sent: HSDir -> (revision counter, auth keys)."""
    out = {}
    for relay, text in node.network.per_hsdir_uploads[call]:
        desc = decode_for_view(text, ADDRESS, node.network.view, now=NOW)
        out[relay.fingerprint] = (
            desc.revision_counter,
            frozenset(p.auth_key for p in desc.intro_points),
        )
    return out


# -- publishing --------------------------------------------------------------------------------


async def test_beyond_the_cap_each_hsdir_gets_its_own_descriptor_with_one_counter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster_node(tmp_path)
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    outcome = await node.publisher.publish_once()
    assert {p: r.ok for p, r in outcome.items()} == {"current": True, "next": True}
    assert node.network.uploads == []  # not the single-descriptor path
    owner = owner_of(PEERS)
    assert len(node.network.per_hsdir_uploads) == 2  # one HSPOST round per target
    for call, (store, fetch) in enumerate(targets(VIEW10)):
        sent = served_sets(node, call)
        assert set(sent) == {r.fingerprint for r in store}  # every store HSDir, only its own
        assert len({counter for counter, _ in sent.values()}) == 1  # one counter per target
        assert len({keys for _, keys in sent.values()}) > 1  # and really different sets
        for _, keys in sent.values():
            assert len(keys) == 20
            # 10 nodes <= 20: every descriptor lists every node (twice).
            assert Counter(owner[k] for k in keys) == dict.fromkeys(owner.values(), 2)
        listed = [k for r in fetch for k in sent[r.fingerprint][1]]
        # The fetch descriptors list each of the 30 points 4 times: a tenth per node.
        assert Counter(listed) == dict.fromkeys(owner, 4)
    assert set(node.publisher.published_auth_keys) == set(owner)
    assert any(
        m.startswith("Published distinct descriptors: 30 intro points from 10 nodes")
        for m in caplog.messages
    )
    snap = node.publisher.snapshot(NOW)
    assert snap.distinct is not None and snap.distinct.mode == "auto"
    current = snap.distinct.periods["current"]
    assert current.descriptors == 3
    assert current.expected_shares == dict.fromkeys(sorted(set(owner.values())), 0.1)
    assert [len(h.auth_keys) for h in current.hsdirs] == [20] * 8


async def test_off_keeps_one_merged_descriptor_for_all_hsdirs(tmp_path: Path) -> None:
    node = cluster_node(tmp_path, publish='distinct_descriptors = "off"')
    await node.publisher.publish_once()
    assert node.network.per_hsdir_uploads == []
    for planned, (store, _) in zip(node.network.uploads, targets(VIEW10), strict=True):
        assert planned.hsdirs == tuple(store)
        desc = decode_for_view(planned.text, ADDRESS, VIEW10, now=NOW)
        assert len(desc.intro_points) == 20  # the cap: 10 of the 30 points are left out
    snap = node.publisher.snapshot(NOW)
    assert snap.distinct is not None and snap.distinct.periods == {}


async def test_up_to_the_cap_nothing_changes(tmp_path: Path) -> None:
    """6 nodes x 3 = 18 points fit one descriptor: today's path, even in "auto"."""
    peers = dict(list(PEERS.items())[:5])
    node = cluster_node(tmp_path, peers)
    await node.publisher.publish_once()
    assert node.network.per_hsdir_uploads == []
    assert len(node.network.uploads) == 2
    desc = decode_for_view(node.network.uploads[0].text, ADDRESS, VIEW10, now=NOW)
    assert {p.auth_key for p in desc.intro_points} == set(owner_of(peers))


async def test_a_dead_node_leaves_every_descriptor_in_one_new_round(tmp_path: Path) -> None:
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    first = [served_sets(node, call) for call in range(2)]
    alive = {k: v for k, v in PEERS.items() if k != "node-e"}
    node.role.current = CoordinationFacts(True, True, alive)
    await node.publisher.publish_once()
    dead = {p.auth_key for p in PEERS["node-e"]}
    for call, (store, _) in enumerate(targets(VIEW10)):
        sent = served_sets(node, call + 2)
        assert set(sent) == {r.fingerprint for r in store}  # all HSDirs, not just changed ones
        (counter,) = {c for c, _ in sent.values()}
        assert counter > next(iter(first[call].values()))[0]
        for _, keys in sent.values():
            assert not keys & dead
            assert len(keys) == 20
    assert not dead & set(node.publisher.published_auth_keys)


async def test_the_same_nodes_give_the_same_layout_on_another_publisher(tmp_path: Path) -> None:
    """After a failover the new publisher (its own id, the same live nodes) deals the same
    sets to the same HSDirs: nodes are dealt by node id, never "own first"."""
    one = cluster_node(tmp_path / "a")
    await one.publisher.publish_once()
    other = make_node(tmp_path / "b", clustered=True, view=VIEW10)
    # node-b publishes now: node-a is its peer, node-b's points are its own.
    other.own.intro_points = PEERS["node-b"]
    peers = {k: v for k, v in PEERS.items() if k != "node-b"} | {"node-a": OWN}
    other.role.current = CoordinationFacts(True, True, peers)
    other.publisher._config = dataclasses.replace(
        other.publisher._config,
        node=dataclasses.replace(other.publisher._config.node, id="node-b"),
    )
    await other.publisher.publish_once()
    for call in range(2):
        assert {h: k for h, (_, k) in served_sets(one, call).items()} == {
            h: k for h, (_, k) in served_sets(other, call).items()
        }


# -- retries and verification per HSDir --------------------------------------------------------


async def test_failed_uploads_get_the_same_bytes_again_only_there(tmp_path: Path) -> None:
    node = cluster_node(tmp_path)
    store, _ = targets(VIEW10)[0]
    timed_out, rejected = store[1].fingerprint, store[2].fingerprint

    def answer(relay: HSDirRelay, text: str) -> HsDirUpload:
        if relay.fingerprint == timed_out:
            return HsDirUpload(relay.fingerprint, relay.nickname, False, "TIMEOUT")
        if relay.fingerprint == rejected:
            return HsDirUpload(relay.fingerprint, relay.nickname, False, "UPLOAD_REJECTED")
        return HsDirUpload(relay.fingerprint, relay.nickname, True)

    node.network.hsdir_answer = answer
    await node.publisher.publish_once()
    original = dict(node.network.per_hsdir_uploads[0])
    node.network.hsdir_answer = lambda relay, text: HsDirUpload(
        relay.fingerprint, relay.nickname, True
    )
    await node.publisher.verify_latest()
    resent = node.network.per_hsdir_uploads[2]
    # Only the HSDir that timed out (UPLOAD_REJECTED: it holds this round or newer), with
    # exactly the bytes of the round, not a new counter.
    assert [(r.fingerprint, text) for r, text in resent] == [
        (timed_out, next(t for r, t in original.items() if r.fingerprint == timed_out))
    ]


async def test_fetch_back_checks_every_hsdir_of_the_clients_descriptor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    await node.publisher.verify_latest()
    (asked,) = node.network.per_hsdir_fetches
    assert len(asked) == 8
    assert any(m.startswith("Descriptors verified on 8 of 8 HSDirs") for m in caplog.messages)
    snap = node.publisher.snapshot(NOW).distinct
    assert snap is not None
    verified = [h.verified for p in snap.periods.values() for h in p.hsdirs if h.verified]
    assert verified == ["ok"] * 8


async def test_an_hsdir_behind_gets_the_same_bytes_a_foreign_one_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    uploads = dict(node.network.per_hsdir_uploads[0]) | dict(node.network.per_hsdir_uploads[1])
    await node.publisher.verify_latest()
    (asked,) = node.network.per_hsdir_fetches
    behind, missing, foreign = asked[0], asked[1], asked[2]
    served = decode_for_view(node.network.stored[behind], ADDRESS, VIEW10, now=NOW)
    node.network.served = {
        behind: dataclasses.replace(served, revision_counter=served.revision_counter - 1),
        missing: "NOT_FOUND",
        foreign: decoded(OWN, revision=served.revision_counter + 1000),
    }
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    before = len(node.network.per_hsdir_uploads)
    await node.publisher.verify_latest()
    resent = node.network.per_hsdir_uploads[before]
    assert sorted(r.fingerprint for r, _ in resent) == sorted([behind, missing])
    for relay, text in resent:
        assert text == next(t for r, t in uploads.items() if r.fingerprint == relay.fingerprint)
    assert any(
        m.startswith(f"HSDir {foreign} serves another publisher's descriptor")
        for m in caplog.messages
    )
    assert node.publisher.schedule.pending == []  # no new round for these
    # Bounded: the HSDirs stay behind, the round is sent again at most 3 times in all.
    for _ in range(VERIFY_MAX_REPUBLISHES + 2):
        await node.publisher.verify_latest()
    assert len(node.network.per_hsdir_uploads) - before == VERIFY_MAX_REPUBLISHES


async def test_a_descriptor_that_does_not_verify_starts_a_new_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    await node.publisher.verify_latest()
    (asked,) = node.network.per_hsdir_fetches
    node.network.served = {asked[3]: "BAD_DESCRIPTOR"}
    node.publisher.schedule.pending.clear()
    await node.publisher.verify_latest()
    assert f"HSDir {asked[3]} serves a descriptor that does not verify" in caplog.messages
    assert node.publisher.schedule.pending == ["an HSDir serves a descriptor that does not verify"]


# -- rotation ----------------------------------------------------------------------------------


def later(view: NetworkView, seconds: int) -> NetworkView:
    consensus = dataclasses.replace(view.consensus, valid_after=view.valid_after + seconds)
    return dataclasses.replace(view, consensus=consensus)


async def test_a_deal_that_rotates_is_dealt_anew_in_the_next_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """7 nodes x 3 = 21 points: 120 fetch slots do not split evenly over 7 nodes, so the deal
    rotates hourly (docs/distinct-descriptors.md section 4); 10 nodes do not rotate. With the
    live network's 24-hour periods (the test network's 8-minute periods change every hour
    anyway), at 12:04 UTC: the next hour is in the same period and SRV run."""
    live = dataclasses.replace(VIEW10, time_params=LIVE_TIME_PARAMS)
    seven = cluster_node(tmp_path / "7", dict(list(PEERS.items())[:6]), view=live)
    await seven.publisher.publish_once()
    shares = seven.publisher.snapshot(NOW).distinct
    assert shares is not None
    values = list(shares.periods["current"].expected_shares.values())
    assert max(values) - min(values) <= float(Fraction(1, 120)) + 1e-12
    epoch_start = (live.valid_after // ROTATION_SECS + 1) * ROTATION_SECS
    next_epoch = later(live, epoch_start - live.valid_after)
    assert [t.time_period for t in next_epoch.descriptor_targets()] == [
        t.time_period for t in live.descriptor_targets()
    ]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    seven.publisher.check_ring(later(live, 1))  # same epoch, same ring: nothing
    assert seven.publisher.schedule.pending == []
    seven.publisher.check_ring(next_epoch)
    assert seven.publisher.schedule.pending == ["rotation epoch changed"]
    assert f"Rotation epoch {epoch_start // ROTATION_SECS} began" in caplog.text
    seven.publisher.schedule.pending.clear()
    seven.publisher.check_ring(next_epoch)  # fired once for this epoch
    assert seven.publisher.schedule.pending == []

    ten = cluster_node(tmp_path / "10", view=live)
    await ten.publisher.publish_once()
    ten.publisher.check_ring(next_epoch)
    assert ten.publisher.schedule.pending == []


# -- status and metrics ------------------------------------------------------------------------


async def test_status_and_metrics_show_the_distinct_round(tmp_path: Path) -> None:
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    await node.publisher.verify_latest()
    snap = NodeSnapshot(
        node_id="node-a",
        master_onion_address=ADDRESS,
        multi=True,
        publisher=True,
        ready=True,
        uptime_secs=1.0,
        generated_at=float(NOW),
        tor=TorSnapshot("managed", True),
        intro=IntroSnapshot(tuple(p.auth_key for p in OWN), node.publisher.published_auth_keys),
        publish=node.publisher.snapshot(NOW),
    )
    doc = status_document(snap)
    assert doc["intro_points"]["published"] == 30  # the union over the HSDirs
    distinct = doc["distinct_descriptors"]
    assert distinct["mode"] == "auto" and distinct["active"]
    assert set(distinct["periods"]) == {"current", "next"}
    for period in distinct["periods"].values():
        assert len(period["hsdirs"]) == 8
        assert all(h["uploaded"] for h in period["hsdirs"])
        assert all(h["intro_points"] == len(h["auth_keys"]) == 20 for h in period["hsdirs"])
        assert set(period["expected_share"].values()) == {0.1}
    values = metrics_values(snap)
    # 10 nodes x 3 points, 20 per descriptor: each descriptor takes 2 of a node's 3 points,
    # in turn, so the sets repeat every 3 HSDirs (each point in 4 of the 6 fetch HSDirs'
    # descriptors); every HSDir still gets its own signed document.
    assert values["distinct_descriptors"] == {"current": 3, "next": 3}
    assert values["expected_node_share"]["current"] == {"min": 0.1, "max": 0.1}
    metrics = NodeMetrics()
    metrics.update(values)
    text = metrics.render().decode()
    assert 'rustbalance_distinct_descriptors{period="current"} 3.0' in text
    assert 'rustbalance_expected_node_share{bound="min",period="current"} 0.1' in text


async def test_nodes_beyond_what_the_fetch_hsdirs_list_show_a_zero_share(tmp_path: Path) -> None:
    """With max_intro_points = 1 the 6 fetch HSDirs list 6 of the 10 nodes: the other 4 show
    an expected share of 0 (status and the metrics' lowest share), and the deal rotates, so
    they are listed in a later epoch (docs/distinct-descriptors.md section 4)."""
    node = cluster_node(tmp_path, publish="max_intro_points = 1")
    await node.publisher.publish_once()
    snap = node.publisher.snapshot(NOW)
    assert snap.distinct is not None
    shares = snap.distinct.periods["current"].expected_shares
    assert len(shares) == 10
    assert sorted(shares.values()) == [0.0] * 4 + [pytest.approx(1 / 6)] * 6
    assert node.publisher._published_epoch is not None  # it rotates
    values = metrics_values(
        NodeSnapshot(
            node_id="node-a",
            master_onion_address=ADDRESS,
            multi=True,
            publisher=True,
            ready=True,
            uptime_secs=1.0,
            generated_at=float(NOW),
            tor=TorSnapshot("managed", True),
            publish=snap,
        )
    )
    assert values["expected_node_share"]["current"]["min"] == 0.0


# -- fencing (etcd, docs/etcd.md) --------------------------------------------------------------


async def test_distinct_rounds_are_fenced_before_each_target(tmp_path: Path) -> None:
    """A lease lost between the two targets stops the second target's HSPOSTs, as with one
    descriptor (test_publisher.py::test_a_lease_lost_between_the_two_uploads_stops_the_second)."""
    node = cluster_node(tmp_path)
    node.role.fence = [True, False]
    outcome = await node.publisher.publish_once()
    assert node.role.fenced == 2
    assert len(node.network.per_hsdir_uploads) == 1  # the current target only
    assert outcome["current"].ok
    assert not outcome["next"].ok and outcome["next"].error == FENCED


async def test_a_resend_is_fenced_too(tmp_path: Path) -> None:
    """Sending a round's bytes again is an upload: a node that lost its lease sends nothing."""
    node = cluster_node(tmp_path)
    await node.publisher.publish_once()
    before = len(node.network.per_hsdir_uploads)
    record = node.publisher._rounds["current"]
    some = [d.fingerprint.upper() for d in record.round.descriptors][:2]
    node.role.fence = [False]
    assert await node.publisher._resend(node.publisher._generation, {"current": some})
    assert len(node.network.per_hsdir_uploads) == before
    node.role.fence = []
    assert await node.publisher._resend(node.publisher._generation, {"current": some})
    assert len(node.network.per_hsdir_uploads) == before + 1
