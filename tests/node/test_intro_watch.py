"""node/intro_watch.py and node/consensus_watch.py with a fake tor network and a manual clock."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from functools import partial

import pytest

from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ControlError, DescriptorError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.consensus_watch import NETWORK_POLL_SECS, ConsensusWatch
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.intro_watch import (
    INTRO_EVENT_DEBOUNCE_SECS,
    INTRO_POLL_SECS,
    OWN_FETCH_RETRY_SECS,
    IntroWatch,
)
from rustbalance.node.own_descriptor import OWN_NEXT_MAX_AGE_SECS
from rustbalance.node.rotation import FAST_POLL_SECS
from rustbalance.tor.network import NetworkView
from tests.node.fakes import (
    VIEW,
    FakeNetwork,
    ManualClock,
    at_valid_after,
    decoded,
    hs_desc,
    intro_points,
    master_key,
    reply_error,
    until,
    with_srv,
)

KEY = master_key()
SHARED = NodeIdentity("shared", KEY.onion_address, KEY, KEY)
BARE = KEY.onion_address.removesuffix(".onion")


class Watched:
    def __init__(self, identity: NodeIdentity = SHARED) -> None:
        self.clock = ManualClock()
        self.network = FakeNetwork(self.clock)
        self.new_views: list[NetworkView] = []
        self.views = ConsensusWatch(self.network, self.clock, self.new_views.append)
        self.read: list[tuple[IntroPoint, ...]] = []
        self.changes: list[str] = []
        self.watch = IntroWatch(
            identity,
            self.network,
            self.views,
            self.clock,
            on_read=lambda points: self.read.append(tuple(points)),
            on_changed=self.changes.append,
        )


def reads(watched: Watched) -> Sequence[int]:
    return [len(points) for points in watched.read]


async def test_a_changed_set_is_reported_and_republished(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    first = intro_points(3, seed=1)
    w.network.own = [decoded(first)]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    assert await w.watch.refresh()
    assert w.watch.intro_points == first
    assert w.changes == ["intro points changed"]
    assert "Own intro points changed: 3 now (was 0), publishing" in caplog.messages
    # The same set again: reported (coordination dedups), not republished.
    assert await w.watch.refresh()
    assert w.changes == ["intro points changed"]
    assert reads(w) == [3, 3]
    # One intro point replaced (same count): a change all the same (system.md W15).
    w.network.own = [decoded((*first[:2], intro_points(1, seed=5)[0]))]
    await w.watch.refresh()
    assert w.changes == ["intro points changed"] * 2
    assert w.watch.flow_control == "1-2 31"


async def test_no_descriptor_yet_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    w.network.own = [reply_error(551, "Not found")]
    assert not await w.watch.refresh()
    assert not await w.watch.has_intro_points()
    assert w.read == [] and w.changes == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failed_read_keeps_what_was_known(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched()
    w.network.own = [decoded(intro_points(2))]
    await w.watch.refresh()
    w.network.own = [ControlError("control connection lost")]
    assert await w.watch.refresh()
    assert w.watch.count == 2
    assert "Reading own descriptor failed: control connection lost" in caplog.messages


async def test_a_descriptor_of_a_newer_period_rereads_the_view_once() -> None:
    w = Watched()
    await w.views.current()
    w.network.own = [DescriptorError("not valid for periods 1, 2, 3"), decoded(intro_points(2))]
    assert await w.watch.refresh()
    assert w.network.view_reads == 2  # the stale view was dropped and read again
    assert w.network.own_reads == 2


async def test_an_instance_in_segment_b_uses_its_next_descriptor_as_clients_fetch_it() -> None:
    own_key = master_key(seed=11)
    instance = NodeIdentity("instance", KEY.onion_address, KEY, own_key)
    w = Watched(instance)
    first = VIEW.descriptor_targets()[0].time_period
    client = VIEW.current_time_period()
    assert first != client  # the test consensus is in segment B
    current, following = intro_points(2, seed=1), intro_points(2, seed=2)
    w.network.own = [decoded(current, time_period=first)]
    w.network.fetched[own_key.onion_address] = [decoded(following, time_period=client)]
    await w.watch.refresh()
    assert w.watch.intro_points == following
    assert w.network.fetches == [own_key.onion_address]
    # A fetch that fails falls back to tor's first descriptor (its intro points work until
    # the next SRV).
    w.clock.advance(OWN_NEXT_MAX_AGE_SECS + 1)  # the cached copy is too old now
    w.network.fetched[own_key.onion_address] = [ControlError("no HSDir")]
    await w.watch.refresh()
    assert w.watch.intro_points == current


async def test_after_a_tor_restart_old_intro_points_are_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = Watched()
    w.network.own = [decoded(intro_points(2))]
    await w.watch.refresh()
    read_at = w.clock.wall()
    w.watch.after_tor_restart(read_at - 10)  # restarted before the read: keep
    assert w.watch.count == 2
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    w.watch.after_tor_restart(read_at + 1)
    assert w.watch.count == 0
    assert "Tor restarted: waiting for its new intro points to republish" in caplog.messages


async def test_the_task_reads_on_start_on_own_events_and_every_poll() -> None:
    w = Watched()
    w.network.own = [decoded(intro_points(2))]
    task = asyncio.ensure_future(w.watch.run())
    try:
        await until(lambda: w.network.own_reads == 1)
        start = w.clock.monotonic()
        # Another service's event, and our own HSPOST (auth type UNKNOWN): no read.
        w.network.events.append(hs_desc("UPLOAD", "a" * 56))
        w.network.events.append(hs_desc("UPLOADED", BARE, auth_type="UNKNOWN"))
        # tor built a descriptor of ours: read once, shortly after.
        w.network.events.append(hs_desc("CREATED", BARE))
        await until(lambda: w.network.own_reads == 2)
        assert w.clock.monotonic() - start <= INTRO_EVENT_DEBOUNCE_SECS + 1.0
        # Then only every poll interval.
        after_event = w.clock.monotonic()
        await until(lambda: w.network.own_reads == 3)
        assert w.clock.monotonic() - after_event >= INTRO_POLL_SECS - 0.01
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert w.network.stream is not None and w.network.stream.closed


async def test_the_consensus_watch_rereads_the_view_on_a_new_consensus_only() -> None:
    w = Watched()
    task = asyncio.ensure_future(w.views.run())
    try:
        await until(lambda: len(w.new_views) == 1)
        await until(lambda: len(w.clock.slept) >= 3)
        assert len(w.new_views) == 1  # same valid-after: not read again
        w.network.view = with_srv(VIEW, b"\x01" * 32)
        w.network.valid_after = "2025-06-01 12:04:20"
        await until(lambda: len(w.new_views) == 2)
        assert w.views.view is w.network.view
        # An older tor without consensus/valid-after: read every time.
        w.network.valid_after = None
        await until(lambda: len(w.new_views) >= 4)
        assert set(w.clock.slept) == {NETWORK_POLL_SECS}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------- issue 14: time-period and SRV-run boundaries

# The test consensus (20 s voting: 8-minute periods, a shared-random run every 480 s) is valid
# after 12:04:00, the start of a time period; the next run starts, and tor rotates its
# descriptors, at 12:08:00; the next period at 12:12:00.
NOW_VA = VIEW.valid_after
ROTATION = NOW_VA + 240
NEXT_PERIOD = ROTATION + 240


async def test_the_consensus_watch_looks_every_second_once_a_boundary_is_due() -> None:
    """A node must notice a new SRV run (tor rotated its descriptors) or a new time period
    (clients fetch the next period's descriptor) within a second of its tor's consensus, not
    at the next 10 s poll (issue 14: a late switch left clients with intro points that die at
    the next rotation). Until the boundary the watch sleeps as usual; it never sleeps past it;
    once due it looks every second until a consensus past it arrives, reports which boundary
    it was, and goes back to the usual poll."""
    w = Watched()
    boundaries: list[str] = []
    w.views = ConsensusWatch(w.network, w.clock, w.new_views.append, boundaries.append)
    task = asyncio.ensure_future(w.views.run())
    try:
        await until(lambda: w.clock.wall() >= ROTATION + 3)
        before = list(w.clock.slept)
        assert set(before[:20]) == {NETWORK_POLL_SECS}
        assert sum(before[:-3]) == ROTATION - NOW_VA  # woke exactly at the rotation
        assert before[-3:] == [FAST_POLL_SECS] * 3
        assert boundaries == []  # the first view is no boundary
        # tor's consensus of the new run arrives.
        w.network.view = at_valid_after(VIEW, ROTATION)
        w.network.valid_after = "2025-06-01 12:08:00"
        await until(lambda: boundaries == ["run"])
        await until(lambda: len(w.clock.slept) >= len(before) + 3)
        assert w.clock.slept[-1] == NETWORK_POLL_SECS
        # ... and the one of the next time period, 240 s later.
        await until(lambda: w.clock.wall() >= NEXT_PERIOD + 1)
        w.network.view = at_valid_after(VIEW, NEXT_PERIOD)
        w.network.valid_after = "2025-06-01 12:12:00"
        await until(lambda: boundaries == ["run", "period"])
        # A new consensus within the period is no boundary.
        w.network.view = at_valid_after(VIEW, NEXT_PERIOD + 20)
        w.network.valid_after = "2025-06-01 12:12:20"
        await until(lambda: len(w.new_views) == 4)
        assert boundaries == ["run", "period"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _instance_in_segment_b() -> tuple[Watched, str]:
    own_key = master_key(seed=11)
    w = Watched(NodeIdentity("instance", KEY.onion_address, KEY, own_key))
    first = VIEW.descriptor_targets()[0].time_period
    w.network.own = [decoded(intro_points(2, seed=1), time_period=first)]
    return w, own_key.onion_address


async def test_a_failing_next_descriptor_fetch_backs_off_to_the_usual_poll() -> None:
    w, own = _instance_in_segment_b()
    w.network.fetched[own] = [ControlError("no HSDir answered")]
    task = asyncio.ensure_future(w.watch.run())
    try:
        await until(lambda: len(w.network.fetches) == 1)
        times = [w.clock.monotonic()]
        for n in range(2, 7):
            await until(partial(lambda k: len(w.network.fetches) == k, n))
            times.append(w.clock.monotonic())
        gaps = [round(b - a) for a, b in itertools.pairwise(times)]
        assert gaps == [2, 4, 8, 16, 20]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_boundary_makes_an_instance_fetch_its_next_descriptor_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a new period or run the cached copy of our own next descriptor is stale (tor built
    a new one, or clients now fetch it): the watch fetches it again within about a second,
    although the copy is younger than its usual maximum age."""
    w, own = _instance_in_segment_b()
    following = intro_points(2, seed=2)
    w.network.fetched[own] = [decoded(following, time_period=VIEW.current_time_period())]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    task = asyncio.ensure_future(w.watch.run())
    try:
        await until(lambda: w.network.fetches == [own])
        assert w.watch.intro_points == following
        w.clock.advance(5.0)
        at = w.clock.monotonic()
        w.watch.at_boundary("period")
        await until(lambda: len(w.network.fetches) == 2)
        assert w.clock.monotonic() - at <= INTRO_EVENT_DEBOUNCE_SECS + 1.0
        assert "New time period: re-reading own intro points" in caplog.messages
        w.watch.at_boundary("run")
        await until(lambda: len(w.network.fetches) == 3)
        assert "New SRV run: re-reading own intro points" in caplog.messages
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_failed_next_descriptor_fetch_is_retried_after_two_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Until our own next descriptor is fetched, the node publishes intro points that die at
    the next rotation: a failed fetch (not uploaded yet, no HSDir answered) is retried after
    ``OWN_FETCH_RETRY_SECS`` (then twice that while it keeps failing), not at the next 20 s
    poll, and said once at INFO. The fake network stands in for an HSFETCH failure that real
    tor gives only by chance."""
    w, own = _instance_in_segment_b()
    following = intro_points(2, seed=2)
    w.network.fetched[own] = [
        ControlError("no HSDir answered"),
        ControlError("no HSDir answered"),
        decoded(following, time_period=VIEW.current_time_period()),
    ]
    caplog.set_level(logging.INFO, logger=DAEMON_LOGGER)
    task = asyncio.ensure_future(w.watch.run())
    try:
        await until(lambda: len(w.network.fetches) == 1)
        start = w.clock.monotonic()
        await until(lambda: len(w.network.fetches) == 3)
        assert w.clock.monotonic() - start <= 3 * OWN_FETCH_RETRY_SECS + 0.5
        assert w.watch.intro_points == following
        failed = [m for m in caplog.messages if m.startswith("Fetching our own next descriptor")]
        assert failed == [
            "Fetching our own next descriptor failed (retrying shortly): no HSDir answered"
        ]
        # Fetched: back to the usual poll.
        fetched_at = w.clock.monotonic()
        await until(lambda: w.network.own_reads >= 4)
        assert w.clock.monotonic() - fetched_at >= INTRO_POLL_SECS - 0.01
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
