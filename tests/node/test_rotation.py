"""node/rotation.py: when a node must look at its own descriptors again (issue 14)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.time_period import (
    LIVE_TIME_PARAMS,
    TimeParams,
    srv_run_start,
    time_period_start,
)
from rustbalance.node.rotation import (
    FAST_POLL_SECS,
    boundary_of,
    network_poll_delay,
    next_boundary,
)
from tests.budget import budget

TEN_S = TimeParams(period_length_minutes=4, rotation_offset_minutes=2, voting_interval_seconds=10)
RUN_START = 1_800_000_000 - (1_800_000_000 % 240)  # a shared-random run starts here (10 s voting)


def test_boundaries_alternate_run_start_and_period_start() -> None:
    assert srv_run_start(RUN_START, TEN_S) == RUN_START
    # in the first half of a run (segment A) the next boundary is the period start, 120 s in
    assert next_boundary(RUN_START, TEN_S) == RUN_START + 120
    assert next_boundary(RUN_START + 110, TEN_S) == RUN_START + 120
    # in the second half (segment B) it is the next run start, when tor rotates
    assert next_boundary(RUN_START + 120, TEN_S) == RUN_START + 240
    assert next_boundary(RUN_START + 230, TEN_S) == RUN_START + 240


def test_live_network_boundaries_are_midnight_and_noon() -> None:
    midnight = 1_800_057_600  # 2027-01-15 00:00 UTC
    assert midnight % 86_400 == 0
    assert next_boundary(midnight, LIVE_TIME_PARAMS) == midnight + 12 * 3600
    assert next_boundary(midnight + 12 * 3600, LIVE_TIME_PARAMS) == midnight + 86_400


def test_boundary_changes_at_the_period_start_and_at_the_run_start() -> None:
    a = boundary_of(RUN_START + 10, TEN_S)
    assert boundary_of(RUN_START + 110, TEN_S) == a
    b = boundary_of(RUN_START + 120, TEN_S)
    assert b[0] == a[0] + 1 and b[1] == a[1]  # a new period, same run
    c = boundary_of(RUN_START + 240, TEN_S)
    assert c[0] == b[0] and c[1] == b[1] + 240  # a new run (tor rotates), same period


def test_poll_delay_is_idle_far_from_a_boundary_and_fast_once_due() -> None:
    assert network_poll_delay(RUN_START, TEN_S, RUN_START + 5.0, 10.0) == 10.0
    assert network_poll_delay(RUN_START, TEN_S, RUN_START + 115.0, 10.0) == 5.0
    # due, and the consensus in hand is still from before it: check every second
    assert network_poll_delay(RUN_START, TEN_S, RUN_START + 121.0, 10.0) == FAST_POLL_SECS
    assert network_poll_delay(RUN_START + 110, TEN_S, RUN_START + 400.0, 10.0) == FAST_POLL_SECS
    # once a consensus past the boundary arrived, back to idle
    assert network_poll_delay(RUN_START + 120, TEN_S, RUN_START + 121.0, 10.0) == 10.0


@settings(max_examples=budget(200), deadline=None)
@given(st.integers(0, 10_000), st.floats(0, 1_000, allow_nan=False))
def test_poll_never_sleeps_past_a_due_boundary(step: int, offset: float) -> None:
    """Whatever the consensus and the clock, the node looks again no later than the next
    boundary (or at once if it is due), and never spins faster than the fast poll."""
    valid_after = RUN_START + 10 * step
    now = valid_after + offset
    delay = network_poll_delay(valid_after, TEN_S, now, 10.0)
    due = next_boundary(valid_after, TEN_S)
    assert FAST_POLL_SECS <= delay <= 10.0
    assert now + delay <= max(due, now + FAST_POLL_SECS)
    assert due > valid_after
    assert due in (
        srv_run_start(valid_after, TEN_S) + 240,
        time_period_start(boundary_of(valid_after, TEN_S)[0] + 1, TEN_S),
    )
