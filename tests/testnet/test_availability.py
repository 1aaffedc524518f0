"""The availability harness's pure parts (issue 14): gaps, percentiles, timeline marks, the
summary, the HTTP response reader and the PNG. No sockets, no sleeps: the load generator
itself runs against real Tor in tests/reliability/test_availability.py."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.time_period import TimeParams, srv_run_start, time_period_start
from rustbalance.testnet.availability import (
    FRESH,
    KEEPALIVE,
    Gap,
    Mark,
    RequestRecord,
    _read_response,
    bucket_outcomes,
    find_gaps,
    percentile,
    plan_cover,
    schedule_marks,
    summarize,
)
from rustbalance.testnet.timeline import bucket_success, write_timeline_png
from tests.budget import budget

# 10 s voting: 4-minute periods starting 2 minutes into each 4-minute shared-random run.
TEN_S = TimeParams(period_length_minutes=4, rotation_offset_minutes=2, voting_interval_seconds=10)


def rec(started: float, ok: bool, kind: str = FRESH, ttfb: float | None = 0.5) -> RequestRecord:
    return RequestRecord(
        kind,  # type: ignore[arg-type]
        started,
        started + (ttfb or 30.0),
        ok,
        ttfb if ok else None,
        None if ok else "TimeoutError",
        "node-a" if ok else None,
    )


def test_no_failure_no_gap() -> None:
    assert find_gaps([rec(t, True) for t in range(10)], end=10) == []


def test_a_run_of_failures_is_one_gap_up_to_the_next_success() -> None:
    records = [rec(0, True), rec(1, False), rec(1.5, False), rec(2, False), rec(4.5, True)]
    assert find_gaps(records, end=10) == [Gap(start=1, length=3.5, failed=3)]


def test_failures_until_the_end_make_a_gap_to_the_end() -> None:
    assert find_gaps([rec(0, True), rec(7, False)], end=10) == [Gap(7, 3, 1)]
    assert find_gaps([rec(0, False), rec(2, True)], end=10) == [Gap(0, 2, 1)]


def test_gaps_follow_start_order_not_completion_order() -> None:
    """A request that started earlier but failed late (a 30 s timeout) still opens the gap at
    its start; a later start that succeeded ends it."""
    slow_failure = RequestRecord(FRESH, 1.0, 31.0, False, None, "TimeoutError")
    records = [rec(0, True), rec(2.0, True), slow_failure]
    assert find_gaps(records, end=40) == [Gap(1.0, 1.0, 1)]


@settings(max_examples=budget(150), deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 500, allow_nan=False), st.booleans()), min_size=0, max_size=60)
)
def test_gaps_cover_every_failure_and_no_success(points: list[tuple[float, bool]]) -> None:
    records = [rec(t, ok) for t, ok in points]
    end = 501.0
    gaps = find_gaps(records, end)
    for a, b in itertools.pairwise(gaps):
        assert a.start + a.length <= b.start  # ordered, disjoint
    for record in records:
        t = record.started
        if record.ok:  # no success strictly inside a gap
            assert not [g for g in gaps if g.start < t < g.start + g.length - 1e-6]
        else:  # every failure lies in a gap (its end included: a success at the same instant)
            assert [g for g in gaps if g.start <= t <= g.start + g.length]
    assert sum(g.failed for g in gaps) == sum(1 for r in records if not r.ok)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_marks_are_tors_rotations_and_period_starts() -> None:
    valid_after = 1_800_000_000 - (1_800_000_000 % 10)
    run = TEN_S.srv_run_seconds
    assert run == 240
    since = float(valid_after + 17)
    until = since + 600
    marks = schedule_marks(valid_after, TEN_S, since, until)
    rotations = [m.at for m in marks if m.kind == "rotation"]
    periods = [m for m in marks if m.kind == "period"]
    assert rotations and periods
    for at in rotations:
        unix = since + at
        assert srv_run_start(int(unix), TEN_S) == unix  # exactly a shared-random run start
    assert [b - a for a, b in itertools.pairwise(rotations)] == [240.0] * (len(rotations) - 1)
    for mark in periods:
        tp = int(mark.label.split()[2])
        assert since + mark.at == time_period_start(tp, TEN_S)
        # the period starts half a run after the rotation (offset = 12 voting intervals)
        assert (since + mark.at - srv_run_start(int(since + mark.at), TEN_S)) == 120
    assert all(0 <= m.at <= 600 for m in marks)
    assert len(rotations) in (2, 3) and len(periods) in (2, 3)
    assert marks == sorted(marks, key=lambda m: m.at)


def test_summary_per_kind_with_separate_gaps() -> None:
    records = [
        rec(0, True, ttfb=1.0),
        rec(1, False),
        rec(2, True, ttfb=3.0),
        rec(0.5, True, KEEPALIVE, ttfb=0.2),
        rec(1.5, True, KEEPALIVE, ttfb=0.4),
    ]
    marks = [Mark(1.2, "fault", "SIGKILL node-a"), Mark(0.7, "rotation", "r")]
    summary = summarize(records, marks, duration=5.0, info={"scenario": "x"})
    assert summary["scenario"] == "x"
    assert summary["requests"] == 5
    assert summary["success_rate"] == 0.8
    fresh = summary["kinds"][FRESH]
    assert fresh["ok"] == 2 and fresh["failed"] == 1
    assert fresh["gaps"] == [{"start_secs": 1.0, "length_secs": 1.0, "failed": 1}]
    assert fresh["ttfb_p50_secs"] == 1.0 and fresh["ttfb_p95_secs"] == 3.0
    assert fresh["errors"] == {"TimeoutError": 1}
    assert summary["kinds"][KEEPALIVE]["gaps"] == []
    assert summary["longest_gap_secs"] == 1.0
    assert [m["at"] for m in summary["marks"]] == [0.7, 1.2]


def test_bucket_success() -> None:
    records = [rec(0, True), rec(1, False), rec(6, True), rec(11, True)]
    assert bucket_success(records, 15.0, 5.0) == [(0.0, 0.5), (5.0, 1.0), (10.0, 1.0)]
    assert bucket_success([], 7.0, 5.0) == [(0.0, None), (5.0, None)]


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_response_reader_content_length_keep_alive_and_close() -> None:
    seen: list[int] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA"
    assert await _read_response(_reader(head), lambda: seen.append(1)) == (200, b"hello", True)
    assert seen == [1]
    closing = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert await _read_response(_reader(closing), lambda: None) == (503, b"", False)
    unframed = b"HTTP/1.0 200 OK\r\n\r\nbody until the end"
    assert await _read_response(_reader(unframed), lambda: None) == (
        200,
        b"body until the end",
        False,
    )
    with pytest.raises(ConnectionResetError):
        await _read_response(_reader(b""), lambda: None)
    with pytest.raises(Exception, match="SSH"):
        await _read_response(_reader(b"SSH-2.0-x\r\n\r\n"), lambda: None)


def test_timeline_png_is_written(tmp_path: Path) -> None:
    records = [rec(t / 2, t % 7 != 3) for t in range(100)]
    records += [rec(t, True, KEEPALIVE, ttfb=0.1) for t in range(50)]
    marks = [Mark(10, "rotation", "rotation"), Mark(20, "period", "tp 5"), Mark(30, "fault", "k")]
    path = write_timeline_png(tmp_path / "t.png", records, marks, 50.0, "title", 30.0)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_bucket_outcomes_count_each_kind_and_outcome() -> None:
    records = [
        rec(0, True),
        rec(0.5, False),
        rec(1.9, True, KEEPALIVE),
        rec(2.0, False, KEEPALIVE),
        rec(5.5, True),  # past the end: the last bucket
    ]
    assert bucket_outcomes(records, 5.0, 2.0) == [
        [0.0, 1, 1, 1, 0],
        [2.0, 0, 0, 0, 1],
        [4.0, 1, 0, 0, 0],
    ]
    assert bucket_outcomes([], 0.0, 2.0) == [[0.0, 0, 0, 0, 0]]
    with pytest.raises(ValueError):
        bucket_outcomes(records, 5.0, 0.0)


def test_plan_cover_waits_for_each_kind_after_the_lead() -> None:
    marks = [
        Mark(5, "period", "p0"),
        Mark(125, "rotation", "r1"),
        Mark(245, "period", "p1"),
        Mark(365, "rotation", "r2"),
    ]
    # The period change at 5 s comes too early (not before 10 s): the next one counts.
    assert plan_cover(marks, 10.0, ("period", "rotation"), 20.0) == (125.0, 265.0)
    assert plan_cover(marks, 0.0, ("period", "rotation"), 20.0) == (5.0, 145.0)
    assert plan_cover(marks, 130.0, ("rotation",), 10.0) == (365.0, 375.0)
    assert plan_cover(marks, 370.0, ("rotation",), 10.0) is None  # schedule further ahead
    assert plan_cover(marks, 42.0, (), 10.0) == (42.0, 52.0)


@settings(max_examples=budget(100), deadline=None)
@given(st.floats(0, 2_000, allow_nan=False), st.floats(0, 200, allow_nan=False))
def test_plan_cover_on_tors_schedule_sees_both_kinds(start: float, lead: float) -> None:
    """On the 10 s-voting schedule a load that ends at the planned end has seen a rotation and
    a period change, each at least ``lead`` after it started, and lasts at most two runs."""
    since = 1_800_000_000.0 + start
    marks = schedule_marks(1_800_000_000, TEN_S, since, since + lead + 2 * 240)
    planned = plan_cover(marks, lead, ("rotation", "period"), 20.0)
    assert planned is not None
    first, end = planned
    inside = [m for m in marks if lead <= m.at <= end]
    assert {m.kind for m in inside} == {"rotation", "period"}
    assert first >= lead and end <= lead + 120 + 120 + 20
