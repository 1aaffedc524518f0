"""node/watchdog.py: Phase 1.2 tor watchdog, pure core and async loop with a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest

from rustbalance.errors import TorProcessError
from rustbalance.node.watchdog import (
    Action,
    TorWatchdog,
    WatchdogPolicy,
    restart_method_name,
    run_tor_watchdog,
)

LOGGER = "rustbalance.node.watchdog"
DOWN = "Tor process is not running, attempting restart"
GIVE_UP = "Tor cannot be restarted, manual intervention required"


class StopLoop(Exception):
    pass


class FakeTime:
    def __init__(self, max_sleeps: int) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.max_sleeps = max_sleeps
        self.events: list[str] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if len(self.sleeps) >= self.max_sleeps:
            raise StopLoop
        self.sleeps.append(seconds)
        self.events.append(f"sleep {seconds:g}")
        self.now += seconds


class SystemTor:
    """Named like the real class so the INFO line says 'systemctl'."""

    def __init__(self, time: FakeTime, running: Iterable[bool], restarts: Iterable[bool]) -> None:
        self.time = time
        self._running = iter(running)
        self._restarts = iter(restarts)
        self.restart_calls = 0

    async def is_running(self) -> bool:
        self.time.events.append("check")
        return next(self._running)

    async def restart(self) -> None:
        self.restart_calls += 1
        self.time.events.append("restart")
        if not next(self._restarts):
            raise TorProcessError("systemctl restart tor@default failed: exit 1")


class ManagedTor(SystemTor):
    pass


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and (level is None or r.levelno == level)
    ]


# --- pure core ------------------------------------------------------------------------------


def test_core_healthy_tor_needs_nothing() -> None:
    dog = TorWatchdog()
    decision = dog.on_check(True, 0.0)
    assert decision.action is Action.HEALTHY
    assert [(x.level, x.message) for x in decision.logs] == [
        (logging.DEBUG, "Tor process is running")
    ]


def test_core_down_restart_success_counts_restart() -> None:
    dog = TorWatchdog()
    decision = dog.on_check(False, 0.0)
    assert decision.action is Action.RESTART
    assert [(x.level, x.message) for x in decision.logs] == [(logging.WARNING, DOWN)]
    assert not dog.stats().running
    logs = dog.on_restart_result(True, 2.0, "systemctl")
    assert [(x.level, x.message) for x in logs] == [(logging.INFO, "Tor restarted via systemctl")]
    stats = dog.stats()
    assert (stats.running, stats.restarts, stats.failures, stats.last_restart_at) == (
        True,
        1,
        0,
        2.0,
    )


def test_core_error_from_third_consecutive_failure_and_reset_when_healthy() -> None:
    dog = TorWatchdog()
    levels = []
    for i in range(3):
        assert dog.on_check(False, i * 15.0).action is Action.RESTART
        logs = dog.on_restart_result(False, i * 15.0 + 1, error="boom")
        levels.append([x.level for x in logs])
    assert levels == [[logging.WARNING], [logging.WARNING], [logging.WARNING, logging.ERROR]]
    assert dog.stats().consecutive_failures == 3
    assert dog.stats().failures == 3
    decision = dog.on_check(True, 60.0)
    assert decision.action is Action.HEALTHY
    assert decision.logs[0].level == logging.DEBUG
    assert "resetting restart failure counter (was 3)" in decision.logs[0].message
    assert dog.stats().consecutive_failures == 0
    assert dog.stats().failures == 3  # the total stays for metrics


def test_core_at_most_three_attempts_per_five_minute_window() -> None:
    dog = TorWatchdog()
    for t in (0.0, 15.0, 30.0):
        assert dog.on_check(False, t).action is Action.RESTART
        dog.on_restart_result(False, t + 1, error="boom")
    skipped = dog.on_check(False, 45.0)
    assert skipped.action is Action.SKIP
    assert skipped.logs[0].level == logging.WARNING
    assert skipped.logs[0].message == (
        "Tor process is not running; restart skipped: 3 attempts in the last 300s, "
        "next attempt possible in 255s"
    )
    assert dog.on_check(False, 299.0).action is Action.SKIP
    # The first attempt (t=0) leaves the sliding window at t=300.
    assert dog.on_check(False, 300.0).action is Action.RESTART
    assert dog.on_check(False, 301.0).action is Action.SKIP
    assert dog.stats().skipped == 3


def test_core_successful_restarts_also_count_toward_the_window() -> None:
    dog = TorWatchdog()
    for t in (0.0, 30.0, 60.0):
        assert dog.on_check(False, t).action is Action.RESTART
        dog.on_restart_result(True, t, "systemctl")
    assert dog.on_check(False, 90.0).action is Action.SKIP


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        WatchdogPolicy(check_interval=0)
    with pytest.raises(ValueError, match="at least 1"):
        WatchdogPolicy(max_attempts=0)


def test_restart_method_names() -> None:
    t = FakeTime(0)
    assert restart_method_name(SystemTor(t, [], [])) == "systemctl"
    assert restart_method_name(ManagedTor(t, [], [])) == "managed process"
    assert restart_method_name(object(), "systemctl (tor@default)") == "systemctl (tor@default)"

    class WithLastMethod:
        last_method = "service tor restart"

    assert restart_method_name(WithLastMethod()) == "service"


# --- async loop -----------------------------------------------------------------------------


async def test_loop_restarts_dead_tor_settles_then_reapplies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    time = FakeTime(max_sleeps=3)
    tor = SystemTor(time, running=[True, False, True], restarts=[True])

    async def reapply() -> None:
        time.events.append("reapply")

    dog = TorWatchdog()
    with pytest.raises(StopLoop):
        await run_tor_watchdog(
            tor, clock=time.clock, sleep=time.sleep, on_restarted=reapply, watchdog=dog
        )
    # Check every 15 s; after a restart wait 10 s, then re-apply the onion service.
    assert time.events == [
        "check",
        "sleep 15",
        "check",
        "restart",
        "sleep 10",
        "reapply",
        "sleep 15",
        "check",
    ]
    assert messages(caplog, logging.WARNING) == [DOWN]
    assert messages(caplog, logging.INFO) == ["Tor restarted via systemctl"]
    assert dog.stats().restarts == 1


async def test_loop_managed_tor_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime(max_sleeps=1)
    with pytest.raises(StopLoop):
        await run_tor_watchdog(
            ManagedTor(time, [False], [True]), clock=time.clock, sleep=time.sleep
        )
    assert messages(caplog, logging.INFO) == ["Tor restarted via managed process"]


async def test_loop_gives_up_loudly_and_caps_attempts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    time = FakeTime(max_sleeps=5)
    tor = SystemTor(time, running=[False] * 6, restarts=[False] * 3)
    dog = TorWatchdog()
    with pytest.raises(StopLoop):
        await run_tor_watchdog(tor, clock=time.clock, sleep=time.sleep, watchdog=dog)
    assert tor.restart_calls == 3  # at most 3 attempts per 5 minutes
    assert time.sleeps == [15, 15, 15, 15, 15]  # no settle after a failed restart
    assert messages(caplog, logging.ERROR) == [GIVE_UP]
    warnings = messages(caplog, logging.WARNING)
    assert warnings[:6] == [
        DOWN,
        "Tor restart failed (1 consecutive): systemctl restart tor@default failed: exit 1",
        DOWN,
        "Tor restart failed (2 consecutive): systemctl restart tor@default failed: exit 1",
        DOWN,
        "Tor restart failed (3 consecutive): systemctl restart tor@default failed: exit 1",
    ]
    assert all("restart skipped" in w for w in warnings[6:])
    assert len(warnings) == 9
    assert (dog.stats().failures, dog.stats().skipped) == (3, 3)


async def test_loop_resets_counter_when_tor_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    time = FakeTime(max_sleeps=2)
    tor = SystemTor(time, running=[False, True, True], restarts=[False])
    dog = TorWatchdog()
    with pytest.raises(StopLoop):
        await run_tor_watchdog(tor, clock=time.clock, sleep=time.sleep, watchdog=dog)
    assert "Tor process is running; resetting restart failure counter (was 1)" in messages(
        caplog, logging.DEBUG
    )
    assert dog.stats().consecutive_failures == 0


async def test_loop_retries_reapply_after_it_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime(max_sleeps=3)
    tor = SystemTor(time, running=[False, True], restarts=[True])
    calls = 0

    async def reapply() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("control port not up yet")

    with pytest.raises(StopLoop):
        await run_tor_watchdog(tor, clock=time.clock, sleep=time.sleep, on_restarted=reapply)
    assert calls == 2
    assert messages(caplog, logging.ERROR) == [
        "Re-applying the onion service after a Tor restart failed: control port not up yet"
    ]


async def test_loop_treats_failing_check_as_down(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    time = FakeTime(max_sleeps=1)

    class BrokenCheck(SystemTor):
        async def is_running(self) -> bool:
            raise OSError("systemctl not found")

    tor = BrokenCheck(time, [], [True])
    with pytest.raises(StopLoop):
        await run_tor_watchdog(tor, clock=time.clock, sleep=time.sleep)
    assert messages(caplog, logging.WARNING) == [
        "Checking whether tor runs failed: systemctl not found",
        DOWN,
    ]
    assert tor.restart_calls == 1
