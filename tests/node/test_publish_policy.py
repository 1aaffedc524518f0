"""node/publish_policy.py: Phase 1.4 retries, 1.5 first-publish wait, 2.3 schedule (fake clock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from rustbalance.node.publish_policy import (
    HsDirResult,
    PeriodResult,
    PublishOutcome,
    PublishSchedule,
    PublishState,
    PublishTrigger,
    backoff,
    periods_to_publish,
    publish_with_retries,
    run_publish_loop,
    wait_for_intro_points,
)

LOGGER = "rustbalance.node.publish_policy"
OK = PeriodResult(ok=True)
FAIL = PeriodResult(ok=False, error="551 Unable to upload")
BOTH_OK: PublishOutcome = {"current": OK, "next": OK}
BOTH_FAIL: PublishOutcome = {"current": FAIL, "next": FAIL}


class StopLoop(Exception):
    pass


class FakeTime:
    def __init__(self, start: float = 1_700_000_000.0, max_sleeps: int = 1000) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.max_sleeps = max_sleeps

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if len(self.sleeps) >= self.max_sleeps:
            raise StopLoop
        self.sleeps.append(seconds)
        self.now += seconds


class Publisher:
    """publish_once() returning scripted outcomes; counts reconnects."""

    def __init__(self, outcomes: Sequence[PublishOutcome | Exception]) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.reconnects = 0
        self.log: list[str] = []

    async def publish_once(self) -> PublishOutcome:
        self.calls += 1
        self.log.append("publish")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def reconnect(self) -> None:
        self.reconnects += 1
        self.log.append("reconnect")


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- Phase 1.5 ------------------------------------------------------------------------------


async def test_first_publish_waits_only_until_intro_points_exist(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    start = time.now
    ready = await wait_for_intro_points(
        lambda: time.now - start >= 33, clock=time.clock, sleep=time.sleep
    )
    assert ready is True
    assert time.sleeps == [5.0] * 7  # detected at the 5 s poll after 33 s
    assert messages(caplog, logging.INFO)[-1] == (
        "Intro points available after 35s - starting publish loop"
    )


async def test_first_publish_accepts_async_check(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()

    async def has_ips() -> bool:
        return True

    assert await wait_for_intro_points(has_ips, clock=time.clock, sleep=time.sleep)
    assert time.sleeps == []
    assert "Intro points available after 0s - starting publish loop" in messages(
        caplog, logging.INFO
    )


async def test_first_publish_gives_up_after_120s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    polls = 0

    def has_ips() -> bool:
        nonlocal polls
        polls += 1
        return False

    assert await wait_for_intro_points(has_ips, clock=time.clock, sleep=time.sleep) is False
    assert sum(time.sleeps) == 120
    assert polls == 25  # t = 0, 5, ..., 120
    assert messages(caplog, logging.WARNING) == [
        "No intro points after 120s - starting publish loop anyway (will retry)"
    ]


# --- backoff --------------------------------------------------------------------------------


def test_backoff_is_5_10_20_capped_at_30_with_up_to_25_percent_jitter() -> None:
    assert [backoff(a, rand=lambda: 0.0) for a in (1, 2, 3, 4, 50)] == [5, 10, 20, 30, 30]
    assert [backoff(a, rand=lambda: 1.0) for a in (1, 2, 3, 4)] == [6.25, 12.5, 25, 30]
    assert backoff(2, rand=lambda: 0.5) == 11.25
    with pytest.raises(ValueError, match="1-based"):
        backoff(0)


# --- Phase 1.4 ------------------------------------------------------------------------------


async def test_publish_success_needs_no_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    pub = Publisher([BOTH_OK])
    state = PublishState()
    ok = await publish_with_retries(
        pub.publish_once, pub.reconnect, state, clock=time.clock, sleep=time.sleep
    )
    assert ok and time.sleeps == [] and pub.reconnects == 0
    assert state.last_success == {"current": time.now, "next": time.now}
    assert messages(caplog, logging.INFO) == ["Published descriptor for current and next period"]


async def test_three_retries_with_backoff_and_reconnect_then_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    pub = Publisher([BOTH_FAIL] * 4)
    state = PublishState()
    ok = await publish_with_retries(
        pub.publish_once,
        pub.reconnect,
        state,
        clock=time.clock,
        sleep=time.sleep,
        rand=lambda: 0.0,
    )
    assert ok is False
    assert time.sleeps == [5, 10, 20]
    assert pub.log == ["publish"] + ["reconnect", "publish"] * 3
    assert messages(caplog, logging.ERROR) == ["Failed to publish after 3 retries"]
    assert messages(caplog, logging.WARNING)[0] == (
        "Failed to publish descriptor: current: 551 Unable to upload; next: 551 Unable to upload"
    )
    assert state.consecutive_failures == 4
    assert state.last_success == {}
    assert state.last_attempt == time.now


async def test_retry_succeeds_after_controller_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    pub = Publisher([ConnectionResetError("control connection lost"), BOTH_FAIL, BOTH_OK])
    state = PublishState()
    ok = await publish_with_retries(
        pub.publish_once,
        pub.reconnect,
        state,
        clock=time.clock,
        sleep=time.sleep,
        rand=lambda: 1.0,
    )
    assert ok is True
    assert time.sleeps == [6.25, 12.5]
    assert pub.reconnects == 2
    assert messages(caplog, logging.WARNING)[0] == (
        "Failed to publish descriptor: current: control connection lost; "
        "next: control connection lost"
    )
    assert "Published descriptor for current and next period (retry 2/3)" in messages(
        caplog, logging.INFO
    )
    assert messages(caplog, logging.ERROR) == []
    assert state.consecutive_failures == 0


async def test_failed_reconnect_is_logged_and_retry_still_happens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    time = FakeTime()
    pub = Publisher([BOTH_FAIL, BOTH_OK])

    async def reconnect() -> None:
        raise ConnectionRefusedError("connection refused")

    ok = await publish_with_retries(
        pub.publish_once, reconnect, PublishState(), clock=time.clock, sleep=time.sleep
    )
    assert ok and pub.calls == 2
    assert "Reconnecting to the Tor control port failed: connection refused" in messages(
        caplog, logging.WARNING
    )


async def test_partial_publish_keeps_the_successful_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    first = time.now
    pub = Publisher([BOTH_OK, {"current": OK, "next": FAIL}])
    state = PublishState()
    await publish_with_retries(
        pub.publish_once, pub.reconnect, state, clock=time.clock, sleep=time.sleep
    )
    time.now += 600
    ok = await publish_with_retries(
        pub.publish_once, pub.reconnect, state, clock=time.clock, sleep=time.sleep
    )
    assert ok is True and pub.calls == 2  # one period succeeded: no retries
    assert state.last_success == {"current": first + 600, "next": first}
    assert state.last_results["next"] == FAIL
    assert messages(caplog, logging.WARNING) == [
        "Failed to publish next period descriptor: 551 Unable to upload"
    ]
    assert messages(caplog, logging.INFO)[-1] == "Published descriptor for current period"


def test_publish_state_status_has_per_period_times_and_hsdir_results() -> None:
    state = PublishState()
    state.record(
        {
            "current": PeriodResult(
                ok=True,
                hsdirs=(HsDirResult("$AAAA", True), HsDirResult("$BBBB", False, "UPLOAD_REJECTED")),
            ),
            "next": PeriodResult(ok=False, error="timeout"),
        },
        100.0,
    )
    assert state.to_status() == {
        "current": 100.0,
        "next": None,
        "last_attempt": 100.0,
        "consecutive_failures": 0,
        "results": {
            "current": {
                "ok": True,
                "error": None,
                "hsdirs": [
                    {"hsdir": "$AAAA", "ok": True, "reason": None},
                    {"hsdir": "$BBBB", "ok": False, "reason": "UPLOAD_REJECTED"},
                ],
                "hsdirs_ok": 1,
                "hsdirs_failed": 1,
            },
            "next": {
                "ok": False,
                "error": "timeout",
                "hsdirs": [],
                "hsdirs_ok": 0,
                "hsdirs_failed": 0,
            },
        },
    }
    assert state.descriptor_age(160.0) == 60.0


# --- Phase 2.3 schedule ---------------------------------------------------------------------


def test_schedule_refresh_interval_and_triggers() -> None:
    sched = PublishSchedule()
    first = sched.decide(0.0, None)
    assert first.publish and "never published" in first.reasons
    sched.published(0.0)
    assert not sched.decide(300.0, 0.0).publish
    assert sched.sleep_for(300.0, 0.0) == 300.0
    sched.trigger("intro points changed")
    sched.trigger("intro points changed")
    decision = sched.decide(301.0, 0.0)
    assert decision.publish and decision.reasons == ("intro points changed",)
    sched.published(301.0)
    assert sched.pending == []
    assert sched.decide(901.0, 301.0).reasons == ("refresh interval",)


def test_schedule_wakeups_when_never_published_or_aging() -> None:
    sched = PublishSchedule()
    sched.published(0.0)
    assert sched.sleep_for(0.0, None) == 30.0  # never published: recheck every 30 s
    assert sched.decide(30.0, None).publish  # and publish each time
    assert sched.sleep_for(100.0, 0.0) == 500.0
    assert sched.sleep_for(451.0, 0.0) == 60.0  # age > max/2: recheck every 60 s


def test_schedule_emergency_when_descriptor_too_old() -> None:
    sched = PublishSchedule()
    sched.published(1000.0)
    assert not sched.decide(1500.0, 600.0).emergency
    decision = sched.decide(1501.0, 600.0)
    assert decision.publish and decision.emergency and decision.age == 901.0


async def test_publish_loop_forces_emergency_republish(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime(start=0.0, max_sleeps=12)
    # Succeeds once, then the control port is blocked for good.
    pub = Publisher([BOTH_OK] + [BOTH_FAIL] * 20)
    state = PublishState()
    with pytest.raises(StopLoop):
        await run_publish_loop(
            pub.publish_once,
            pub.reconnect,
            lambda: True,
            state,
            PublishSchedule(),
            clock=time.clock,
            sleep=time.sleep,
            wait=time.sleep,
            rand=lambda: 0.0,
        )
    # t=0 ok; t=600 fails (+5+10+20 retries); wake every 60 s once age > 450 s; at t=935
    # the descriptor is 935 s old: emergency republish.
    assert time.sleeps[:9] == [600, 5, 10, 20, 60, 60, 60, 60, 60]
    assert (
        messages(caplog, logging.WARNING).count(
            "Descriptor age 935s exceeds maximum, forcing emergency republish"
        )
        == 1
    )
    # The emergency publish goes through the same retries (5, 10, 20 s).
    assert time.sleeps[9:] == [5, 10, 20]
    assert pub.calls == 1 + 4 + 4


async def test_publish_loop_standby_never_publishes() -> None:
    time = FakeTime(start=0.0, max_sleeps=5)
    pub = Publisher([])
    schedule = PublishSchedule()
    schedule.trigger("tor restarted")
    with pytest.raises(StopLoop):
        await run_publish_loop(
            pub.publish_once,
            pub.reconnect,
            lambda: True,
            PublishState(),
            schedule,
            clock=time.clock,
            sleep=time.sleep,
            wait=time.sleep,
            is_publisher=lambda: False,
        )
    assert pub.calls == 0
    assert schedule.pending == []


async def test_trigger_wakes_the_wait_early() -> None:
    schedule = PublishSchedule()
    trigger = PublishTrigger(schedule)
    asyncio.get_running_loop().call_soon(trigger.fire, "new time period")
    await asyncio.wait_for(trigger.wait(600), timeout=5)
    assert schedule.pending == ["new time period"]
    assert schedule.decide(10.0, 5.0).reasons == ("new time period", "refresh interval")


def test_a_node_carrying_pow_params_publishes_only_the_first_descriptor() -> None:
    # docs/pow.md section 5: the intro points read from tor's first descriptor are bound to its
    # blinded key; tor's own second descriptor is left in place.
    assert periods_to_publish(carries_pow=True) == ("current",)
    assert periods_to_publish(carries_pow=False) == ("current", "next")
    state = PublishState()
    assert state.record({"current": OK}, 100.0)
    assert state.to_status()["current"] == 100.0
    assert state.to_status()["next"] is None
