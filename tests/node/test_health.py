"""node/health.py: the systemd watchdog ping means "healthy", not only "the loop runs".

Before issue 17 the ping showed only that the event loop was alive: a component failing over
and over, or a tor that the daemon's own tor watchdog could not bring back, went on forever
under an active unit. Now the ping is withheld (and systemd restarts the unit after
``WatchdogSec``) when a supervised task has been failing for longer than its restart budget,
when tor's control session has not worked for longer than the tor watchdog needs to detect
and restart a dead or hung tor, or when the tor watchdog gave up. Pure decisions with the time
passed in, and the supervisor's record of its tasks.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from rustbalance.node.health import (
    HealthPolicy,
    TaskHealth,
    TaskRecord,
    WatchdogHealth,
    control_budget,
)
from rustbalance.node.sdnotify import SystemdNotifier, run_watchdog_pings
from rustbalance.node.supervisor import Supervisor, TaskSpec
from rustbalance.node.watchdog import WatchdogPolicy

POLICY = HealthPolicy(control_budget=200.0)


def healthy_task(name: str = "publish") -> TaskHealth:
    return TaskHealth(name, failing_since=None, budget=180.0)


# --- the pure decision ---------------------------------------------------------------------------


def test_healthy_when_tasks_run_and_tor_answers() -> None:
    health = WatchdogHealth(POLICY)
    assert health.problem(0.0, tasks=[healthy_task()], control_up=True, tor_gave_up=False) is None
    assert health.problem(500.0, tasks=[healthy_task()], control_up=True, tor_gave_up=False) is None


def test_a_task_failing_longer_than_its_budget_is_unhealthy() -> None:
    health = WatchdogHealth(POLICY)
    failing = TaskHealth("publish", failing_since=100.0, budget=180.0)
    assert health.problem(280.0, tasks=[failing], control_up=True, tor_gave_up=False) is None
    assert health.problem(280.5, tasks=[failing], control_up=True, tor_gave_up=False) == (
        "task 'publish' has been failing for 180 s (restart budget 180 s)"
    )


def test_a_control_session_down_longer_than_the_tor_watchdogs_recovery_is_unhealthy() -> None:
    health = WatchdogHealth(POLICY)
    assert health.problem(10.0, tasks=[], control_up=True, tor_gave_up=False) is None
    # Down: the tor watchdog gets its chance first (hung detection + restart + bootstrap).
    assert health.problem(100.0, tasks=[], control_up=False, tor_gave_up=False) is None
    assert health.problem(210.0, tasks=[], control_up=False, tor_gave_up=False) is None
    assert health.problem(210.5, tasks=[], control_up=False, tor_gave_up=False) == (
        "tor's control session has not worked for 200 s"
    )
    # Back: healthy again at once.
    assert health.problem(211.0, tasks=[], control_up=True, tor_gave_up=False) is None


def test_a_tor_watchdog_that_gave_up_is_unhealthy_at_once() -> None:
    health = WatchdogHealth(POLICY)
    assert health.problem(1.0, tasks=[], control_up=False, tor_gave_up=True) == (
        "the tor watchdog cannot restart tor"
    )


def test_the_control_budget_is_what_the_tor_watchdog_needs_to_recover() -> None:
    # Hung after 2 intervals, noticed at the next check, one restart (its timeout), settle.
    policy = WatchdogPolicy(check_interval=15.0, settle=10.0, restart_timeout=150.0)
    assert control_budget(policy) == 2 * 15.0 + 15.0 + 150.0 + 10.0


# --- the supervisor's record --------------------------------------------------------------------


def test_a_failure_streak_starts_at_the_first_failure_and_ends_after_a_stable_run() -> None:
    record = TaskRecord()
    record.started("publish", 0.0)
    assert record.health([TaskSpec("publish", forever)], 10.0)[0].failing_since is None
    record.failed("publish", 10.0)
    record.started("publish", 12.0)
    record.failed("publish", 20.0)  # a short run: the streak goes on
    record.started("publish", 25.0)
    (health,) = record.health([TaskSpec("publish", forever, stable_after=60.0)], 30.0)
    assert (health.failing_since, health.budget) == (10.0, 180.0)
    # Running for stable_after since its last start: the streak is over.
    (health,) = record.health([TaskSpec("publish", forever, stable_after=60.0)], 85.0)
    assert health.failing_since is None


async def forever() -> None:
    await asyncio.Event().wait()


async def test_the_supervisor_records_its_tasks_streaks() -> None:
    failures = 0

    async def flaky() -> None:
        nonlocal failures
        failures += 1
        raise RuntimeError("listener died")

    now = [100.0]
    record = TaskRecord()
    specs = [TaskSpec("proxy", flaky, restartable=True), TaskSpec("ok", forever)]

    async def sleep(_delay: float) -> None:
        now[0] += 1.0
        await asyncio.sleep(0)

    supervisor = Supervisor(specs, clock=lambda: now[0], sleep=sleep, record=record)
    run = asyncio.ensure_future(supervisor.run())
    for _ in range(200):
        await asyncio.sleep(0)
        if failures >= 3:
            break
    supervisor.request_shutdown("test")
    assert await run == 0
    proxy, ok = record.health(specs, now[0])
    assert proxy.failing_since == 100.0
    assert ok.failing_since is None


# --- the ping -----------------------------------------------------------------------------------


async def test_the_ping_is_withheld_with_the_reason_while_unhealthy(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[str] = []

    class Notifier(SystemdNotifier):
        def watchdog(self) -> bool:
            sent.append("WATCHDOG=1")
            return True

    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "2000000"})
    problems = iter([None, "task 'publish' has been failing for 181 s", None])
    sleeps = 0

    async def sleep(_delay: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 3:
            raise asyncio.CancelledError

    caplog.set_level(logging.WARNING)
    with pytest.raises(asyncio.CancelledError):
        await run_watchdog_pings(notifier, sleep=sleep, problem=lambda: next(problems))
    assert sent == ["WATCHDOG=1", "WATCHDOG=1"]
    assert caplog.messages == [
        "Withholding the systemd watchdog ping (systemd restarts the node if this lasts): "
        "task 'publish' has been failing for 181 s"
    ]
