"""node/publisher.py with a fake tor network (tests/node/fakes.py) and a manual clock.

Upload failures of one or both periods, a standby, verification that finds an older revision,
and ring changes: faults real tor cannot produce on demand (the real-tor behaviour is proved
by tests/node_e2e/test_survival.py and test_periods.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rustbalance.config import parse_config
from rustbalance.crypto.blinding import blind_public_key
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import ControlError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.backend_state import BackendBook
from rustbalance.node.backends import BackendPoller
from rustbalance.node.cluster_link import MergeSignature, merge_signature
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.coordination import ALONE, CoordinationFacts
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.publisher import FENCED, VERIFY_MAX_REPUBLISHES, Publisher
from rustbalance.node.readiness import Readiness
from rustbalance.node.sdnotify import SystemdNotifier
from rustbalance.tor.network import HsDirUpload, NetworkView, PlannedDescriptor, decode_for_view
from tests.node.fakes import (
    NOW,
    VIEW,
    FakeNetwork,
    ManualClock,
    decoded,
    intro_points,
    master_key,
    with_srv,
    without_hsdir,
)

KEY = master_key()
ADDRESS = KEY.onion_address
OWN = intro_points(3, seed=1)
PEER = intro_points(2, seed=2)


def keys(points: tuple[IntroPoint, ...]) -> set[bytes]:
    """Intro points by their auth key (the master descriptor re-certifies them)."""
    return {p.auth_key for p in points}


@dataclass
class Own:
    intro_points: tuple[IntroPoint, ...] = OWN
    flow_control: str | None = "1-2 31"
    pow_params: PowParams | None = None

    async def has_intro_points(self) -> bool:
        return bool(self.intro_points)


@dataclass
class Role:
    own: Own
    publisher: bool = True
    current: CoordinationFacts = ALONE
    recorded: list[tuple[MergeSignature, int]] = field(default_factory=list)
    # What the coordination backend's fencing check answers, one per call (then True).
    fence: list[bool] = field(default_factory=list)
    fenced: int = 0

    def is_publisher(self) -> bool:
        return self.publisher

    async def may_publish(self) -> bool:
        self.fenced += 1
        return self.fence.pop(0) if self.fence else True

    def facts(self) -> CoordinationFacts:
        return self.current

    def signature(self, facts: CoordinationFacts | None = None) -> MergeSignature:
        f = self.current if facts is None else facts
        peers = f.peer_intro_points if f.is_multi else {}
        return merge_signature(f.is_multi, self.own.intro_points, peers)

    def record_published(self, signature: MergeSignature, unix_time: int) -> None:
        self.recorded.append((signature, unix_time))


@dataclass
class Node:
    publisher: Publisher
    network: FakeNetwork
    clock: ManualClock
    role: Role
    own: Own
    readiness: Readiness


def make_node(
    tmp_path: Path,
    *,
    identity: NodeIdentity | None = None,
    clustered: bool = False,
    publish: str = "",
    view: NetworkView = VIEW,
) -> Node:
    """A publisher on a fake network; ``publish``: extra ``[publish]`` lines."""
    config = parse_config(
        '[node]\nid = "node-a"\nstate_dir = "state"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:8000"\n'
        f"[publish]\n{publish}\n",
        tmp_path,
    )
    clock = ManualClock()
    network = FakeNetwork(clock, view)
    own = Own()
    role = Role(own)
    readiness = Readiness.for_config(SystemdNotifier(env={}), clock, config)
    publisher = Publisher(
        config,
        identity or NodeIdentity("shared", ADDRESS, KEY, KEY),
        network,
        ConsensusWatch(network, clock, lambda view: None),
        clock,
        role=role,
        own=own,
        readiness=readiness,
        clustered=clustered,
    )
    return Node(publisher, network, clock, role, own, readiness)


def idle_poller(book: BackendBook) -> BackendPoller:
    """A poller whose task never runs here: the publisher only reads its book."""

    async def fetch(address: str) -> DecodedDescriptor:
        raise AssertionError("not polled here")

    async def probe(address: str) -> None:
        raise AssertionError("not polled here")

    return BackendPoller(book, fetch, probe, on_change=lambda reason: None, is_active=lambda: True)


def fail_next(planned: PlannedDescriptor) -> list[HsDirUpload]:
    if planned.label == "next":
        raise ControlError("next upload blocked")
    return [HsDirUpload(h.fingerprint, h.nickname, True) for h in planned.hsdirs]


def reject_all(planned: PlannedDescriptor) -> list[HsDirUpload]:
    return [
        HsDirUpload(h.fingerprint, h.nickname, False, "UPLOAD_REJECTED") for h in planned.hsdirs
    ]


# -- publishing --------------------------------------------------------------------------------


async def test_both_descriptors_go_to_their_own_responsible_hsdirs(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    outcome = await node.publisher.publish_once()
    assert {p: r.ok for p, r in outcome.items()} == {"current": True, "next": True}
    uploads = node.network.uploads
    assert [u.label for u in uploads] == ["current", "next"]
    for planned, target in zip(uploads, VIEW.descriptor_targets(), strict=True):
        blinded = blind_public_key(KEY.public_key, target.time_period, VIEW.period_length)
        assert planned.hsdirs == tuple(VIEW.store_hsdirs(blinded, target))
        assert planned.address == ADDRESS
        assert planned.time_period == target.time_period
        text = decode_for_view(planned.text, ADDRESS, VIEW, now=NOW)
        assert keys(text.intro_points) == keys(OWN)
        assert text.flow_control == "1-2 31"  # a single node carries its own line
    assert node.publisher.published_auth_keys == tuple(p.auth_key for p in OWN)
    assert node.role.recorded == [(node.role.signature(), NOW)]
    # Publishing is not what makes a node ready (node/readiness.py: serving is).
    assert not node.readiness.ready


async def test_revision_counters_grow_within_one_second(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    await node.publisher.publish_once()
    await node.publisher.publish_once()  # the clock did not move
    first, second = node.network.uploads[0], node.network.uploads[2]
    assert first.label == second.label == "current"
    assert second.revision_counter > first.revision_counter


async def test_a_failed_next_upload_keeps_the_current_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path)
    node.network.answer = fail_next
    caplog.set_level(logging.INFO)
    outcome = await node.publisher.publish_once()
    assert outcome["current"].ok
    assert not outcome["next"].ok
    assert outcome["next"].error == "next upload blocked"
    assert "publishing the next descriptor failed: next upload blocked" in caplog.messages
    # A partial publish is a publish: recorded, and verified for the period that went out.
    assert node.role.recorded
    current = node.network.uploads[0]
    node.network.fetched[ADDRESS] = [
        decoded(OWN, time_period=current.time_period, revision=current.revision_counter)
    ]
    caplog.clear()
    await node.publisher.verify_latest()
    assert f"Descriptor verified on HSDirs (rev={current.revision_counter})" in caplog.messages


async def test_when_no_hsdir_accepts_nothing_counts_as_published(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.network.answer = reject_all
    outcome = await node.publisher.publish_once()
    assert not any(r.ok for r in outcome.values())
    assert outcome["current"].error == "no responsible HSDir accepted the descriptor"
    assert outcome["current"].hsdirs and not outcome["current"].hsdirs[0].ok
    assert node.role.recorded == []
    assert node.publisher.published_auth_keys == ()


async def test_a_standby_uploads_nothing(tmp_path: Path) -> None:
    node = make_node(tmp_path, clustered=True)
    node.role.publisher = False
    outcome = await node.publisher.publish_once()
    assert {r.error for r in outcome.values()} == {"standby: another node publishes"}
    assert node.network.uploads == []


# -- fencing (issue 20: the etcd backend confirms the lease before every upload) ---------------


async def test_every_upload_is_fenced_immediately_before_it_goes_out(tmp_path: Path) -> None:
    """The fencing check runs once per planned descriptor, after it was built and signed and
    right before its upload, so a lease lost while the first period was uploading stops the
    second upload."""
    node = make_node(tmp_path, clustered=True)
    checks: list[int] = []
    answer = node.network.answer

    def record(planned: PlannedDescriptor) -> list[HsDirUpload]:
        checks.append(node.role.fenced)
        return answer(planned)

    node.network.answer = record
    outcome = await node.publisher.publish_once()
    assert {p: r.ok for p, r in outcome.items()} == {"current": True, "next": True}
    assert checks == [1, 2]  # one check before each of the two uploads


async def test_a_refused_fence_uploads_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path, clustered=True)
    node.role.fence = [False, False]
    caplog.set_level(logging.WARNING)
    outcome = await node.publisher.publish_once()
    assert node.network.uploads == []
    assert {r.ok for r in outcome.values()} == {False}
    assert {r.error for r in outcome.values()} == {FENCED}
    assert f"publishing the current descriptor failed: {FENCED}" in caplog.messages
    assert node.role.recorded == []
    assert node.publisher.published_auth_keys == ()


async def test_a_lease_lost_between_the_two_uploads_stops_the_second(tmp_path: Path) -> None:
    node = make_node(tmp_path, clustered=True)
    node.role.fence = [True, False]
    outcome = await node.publisher.publish_once()
    assert [u.label for u in node.network.uploads] == ["current"]
    assert outcome["current"].ok
    assert not outcome["next"].ok and outcome["next"].error == FENCED


async def test_without_intro_points_nothing_is_uploaded(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.own.intro_points = ()
    outcome = await node.publisher.publish_once()
    assert {r.error for r in outcome.values()} == {"no intro points yet"}
    assert node.network.uploads == []


async def test_a_node_without_the_master_key_cannot_upload(tmp_path: Path) -> None:
    own_key = master_key(seed=9)
    instance = NodeIdentity("instance", ADDRESS, None, own_key)
    node = make_node(tmp_path, identity=instance)
    with pytest.raises(ControlError, match="no master key"):
        await node.publisher.publish_once()


async def test_a_publisher_in_a_cluster_merges_its_peers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path, clustered=True)
    node.role.current = CoordinationFacts(True, True, {"node-b": PEER})
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    await node.publisher.publish_once()
    text = decode_for_view(node.network.uploads[0].text, ADDRESS, VIEW, now=NOW)
    assert keys(text.intro_points) == keys(OWN) | keys(PEER)
    assert text.flow_control is None
    assert "Published merged descriptor: 5 intro points from 2 nodes (0 plain backends)" in (
        caplog.messages
    )


async def test_backend_intro_points_are_merged(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    backend = "b" * 56
    book = BackendBook((f"{backend}.onion",), poll_secs=60, max_age_secs=900)
    points = intro_points(2, seed=4)
    book.record_fetch(backend, points, revision_counter=1, lifetime_mins=180, now=NOW)
    book.record_probe(backend, True, "", NOW)

    node.publisher.backends = idle_poller(book)
    await node.publisher.publish_once()
    text = decode_for_view(node.network.uploads[0].text, ADDRESS, VIEW, now=NOW)
    assert keys(text.intro_points) == keys(OWN) | keys(points)


# -- verification ------------------------------------------------------------------------------


async def test_an_older_revision_on_the_hsdirs_republishes_at_most_three_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path)
    await node.publisher.publish_once()
    current = node.network.uploads[0]
    older = decoded(OWN, time_period=current.time_period, revision=current.revision_counter - 1)
    node.network.fetched[ADDRESS] = [older]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    for _ in range(VERIFY_MAX_REPUBLISHES + 2):
        node.publisher.schedule.pending.clear()
        await node.publisher.verify_latest()
    warnings = [m for m in caplog.messages if m.startswith("HSDirs serve an older descriptor")]
    assert len(warnings) == VERIFY_MAX_REPUBLISHES + 2
    assert node.publisher.schedule.pending == []  # the budget is spent
    # A verified upload restores the budget.
    node.network.fetched[ADDRESS] = [
        decoded(OWN, time_period=current.time_period, revision=current.revision_counter)
    ]
    await node.publisher.verify_latest()
    node.network.fetched[ADDRESS] = [older]
    await node.publisher.verify_latest()
    assert node.publisher.schedule.pending == ["verification found an older descriptor"]


async def test_a_standby_does_not_republish_for_verification(tmp_path: Path) -> None:
    node = make_node(tmp_path, clustered=True)
    await node.publisher.publish_once()
    current = node.network.uploads[0]
    node.network.fetched[ADDRESS] = [
        decoded(OWN, time_period=current.time_period, revision=current.revision_counter - 1)
    ]
    node.role.publisher = False
    await node.publisher.verify_latest()
    assert node.publisher.schedule.pending == []


async def test_a_fetch_that_fails_is_logged_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path)
    await node.publisher.publish_once()
    node.network.fetched[ADDRESS] = [ControlError("no HSDir answered")]
    await node.publisher.verify_latest()
    assert "Could not fetch the published descriptor back: no HSDir answered" in caplog.messages
    assert node.publisher.schedule.pending == []


async def test_the_verify_task_checks_each_upload_after_a_delay(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    verify = asyncio.ensure_future(node.publisher.verify())
    try:
        await node.publisher.publish_once()
        current = node.network.uploads[0]
        node.network.fetched[ADDRESS] = [
            decoded(OWN, time_period=current.time_period, revision=current.revision_counter)
        ]
        for _ in range(20):
            if node.network.fetches:
                break
            await asyncio.sleep(0)
        assert node.network.fetches == [ADDRESS]
        assert node.clock.slept == [2.0]
    finally:
        verify.cancel()


# -- the ring ----------------------------------------------------------------------------------


async def test_a_new_srv_or_new_hsdirs_republish_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tmp_path)
    publisher = node.publisher
    publisher.check_ring(with_srv(VIEW, b"\x05" * 32))
    assert publisher.schedule.pending == []  # nothing published yet
    node.network.view = VIEW
    await publisher.publish_once()
    publisher.schedule.pending.clear()
    publisher.check_ring(VIEW)
    assert publisher.schedule.pending == []
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    publisher.check_ring(with_srv(VIEW, b"\x05" * 32))
    assert publisher.schedule.pending == ["time period / SRV changed"]
    assert "Time period or shared random value changed: republishing" in caplog.messages
    publisher.schedule.pending.clear()
    publisher.check_ring(with_srv(VIEW, b"\x05" * 32))  # the same new ring: fired already
    assert publisher.schedule.pending == []
    publisher.check_ring(without_hsdir(VIEW))
    assert publisher.schedule.pending == ["HSDirs changed"]


async def test_a_new_period_fetches_the_backends_at_once(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    book = BackendBook(("c" * 56,), poll_secs=60, max_age_secs=900)
    book.record_fetch_failure("c" * 56, "not yet", NOW)
    assert book.due(node.clock.wall()) == []

    node.publisher.backends = idle_poller(book)
    node.own.intro_points = OWN
    await node.publisher.publish_once()
    node.publisher.check_ring(with_srv(VIEW, b"\x06" * 32))
    assert book.due(node.clock.wall()) == ["c" * 56]


# -- status ------------------------------------------------------------------------------------


async def test_the_snapshot_counts_rounds_and_is_a_copy(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    publisher = node.publisher
    node.network.answer = fail_next
    outcome = await publisher.publish_counted()
    publisher.state.record(outcome, NOW)  # what the publish loop does with the outcome
    snap = publisher.snapshot(NOW + 5)
    assert snap.descriptor_age == 5.0
    assert snap.periods == {"current": {"ok": 1, "failed": 0}, "next": {"ok": 0, "failed": 1}}
    accepted = len(node.network.uploads[0].hsdirs)
    assert snap.hsdir_uploads == {"ok": accepted, "failed": 0}
    assert all(snap.hsdir_last_upload.values()) and len(snap.hsdir_last_upload) == accepted
    node.network.answer = reject_all
    publisher.state.record(await publisher.publish_counted(), NOW + 10)
    assert snap.periods["current"] == {"ok": 1, "failed": 0}
    assert snap.state.last_attempt == NOW
    assert publisher.snapshot(NOW + 10).periods["current"] == {"ok": 1, "failed": 1}


async def test_a_greater_revision_is_another_publishers_descriptor_and_we_publish_above_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An HSDir serving a *greater* revision counter than we posted holds someone else's
    descriptor: Onionbalance's after a migration (its counters ran 16 s ahead of ours in
    test_import_onionbalance.py, and 5 of 8 HSDirs refused our first upload), a tor that hosted
    the key, or another node of ours. It was logged as "Descriptor verified"
    (docs/distinct-descriptors.md section 5); it is reported as another publisher's, and since
    an HSDir only takes a strictly greater counter, the next publish goes above it (bounded
    like every verification republish; between our own nodes the election decides)."""
    node = make_node(tmp_path)
    await node.publisher.publish_once()
    current = node.network.uploads[0]
    ahead = current.revision_counter + 10_000_000  # about 300 s of OPE steps ahead
    foreign = dataclasses.replace(
        decoded(intro_points(3, seed=5), time_period=current.time_period, revision=ahead),
        blinded_key=blind_public_key(KEY.public_key, current.time_period, VIEW.period_length),
    )
    node.network.fetched[ADDRESS] = [foreign]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    await node.publisher.verify_latest()
    assert not [m for m in caplog.messages if m.startswith("Descriptor verified")]
    assert (
        f"HSDirs serve another publisher's descriptor (rev={ahead}, "
        f"posted rev={current.revision_counter}): publishing above it" in caplog.messages
    )
    assert node.publisher.schedule.pending == ["HSDirs serve another publisher's descriptor"]
    node.network.uploads.clear()
    await node.publisher.publish_once()
    again = next(u for u in node.network.uploads if u.time_period == current.time_period)
    assert ahead < again.revision_counter < ahead + 2 * 65536  # the first second above it


async def test_our_revision_with_other_intro_points_is_not_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Equal counter, other intro points: not what we posted (section 5 compares the set)."""
    node = make_node(tmp_path)
    await node.publisher.publish_once()
    current = node.network.uploads[0]
    node.network.fetched[ADDRESS] = [
        decoded(
            intro_points(3, seed=5),
            time_period=current.time_period,
            revision=current.revision_counter,
        )
    ]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    await node.publisher.verify_latest()
    assert not [m for m in caplog.messages if m.startswith("Descriptor verified")]
    assert any(m.startswith("HSDirs serve another publisher's descriptor") for m in caplog.messages)
