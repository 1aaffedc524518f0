"""Is the node healthy enough to ping systemd's watchdog? (pure; issue 17)

``WatchdogSec=`` restarts a unit whose main process stops pinging. A ping that only shows the
event loop runs lets a node whose parts are broken go on for ever; so the ping is withheld
(node/sdnotify.py ``run_watchdog_pings``) while :meth:`WatchdogHealth.problem` names a problem:

- a supervised task has been failing (restart after restart, never running for its
  ``stable_after``) for longer than its restart budget: restarting the whole node is the next
  thing to try;
- tor's control session has not worked for longer than the daemon's own tor watchdog needs to
  notice a dead or hung tor and restart it once (:func:`control_budget`): the tor watchdog gets
  its chance first, systemd's is the next;
- the tor watchdog gave up (its consecutive restarts failed, node/watchdog.py ``MSG_GIVE_UP``).

:class:`TaskRecord` is the supervisor's record of its tasks' failure streaks (it writes,
the health check reads). Times are monotonic seconds, passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rustbalance.node.watchdog import TOR_HUNG_INTERVALS, WatchdogPolicy

__all__ = [
    "DEFAULT_RESTART_BUDGET",
    "HealthPolicy",
    "TaskHealth",
    "TaskRecord",
    "WatchdogHealth",
    "control_budget",
]

# How long a supervised task may keep failing before the node as a whole is restarted: with
# the supervisor's backoff (1, 2, 4, ... s, at most 60 s) that is several restarts of it.
DEFAULT_RESTART_BUDGET = 180.0


class _Spec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def stable_after(self) -> float: ...

    @property
    def restart_budget(self) -> float: ...


@dataclass(frozen=True)
class TaskHealth:
    name: str
    # Monotonic time of the first failure since the task last ran stably; None = healthy.
    failing_since: float | None
    budget: float


@dataclass
class TaskRecord:
    """Failure streaks of the supervised tasks (written by the supervisor)."""

    _started: dict[str, float] = field(default_factory=dict)
    _failing_since: dict[str, float] = field(default_factory=dict)

    def started(self, name: str, now: float) -> None:
        self._started[name] = now

    def failed(self, name: str, now: float) -> None:
        self._failing_since.setdefault(name, now)

    def health(self, specs: Sequence[_Spec], now: float) -> tuple[TaskHealth, ...]:
        result = []
        for spec in specs:
            since = self._failing_since.get(spec.name)
            started = self._started.get(spec.name)
            stable = started is not None and now - started >= spec.stable_after
            if since is not None and started is not None and started > since and stable:
                # Running stably since its last restart: the streak is over.
                del self._failing_since[spec.name]
                since = None
            result.append(TaskHealth(spec.name, since, spec.restart_budget))
        return tuple(result)


def control_budget(policy: WatchdogPolicy) -> float:
    """How long tor's control session may be down before systemd should step in: what the
    tor watchdog needs to call tor hung (``TOR_HUNG_INTERVALS`` intervals), see it at its next
    check, restart it (at most ``restart_timeout``) and let it settle."""
    interval = policy.check_interval
    return TOR_HUNG_INTERVALS * interval + interval + policy.restart_timeout + policy.settle


@dataclass(frozen=True)
class HealthPolicy:
    control_budget: float


class WatchdogHealth:
    """The decision, with the one piece of state it needs: when tor's control session last
    worked (the caller reports what it sees at each check)."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self._control_seen: float | None = None

    def problem(
        self,
        now: float,
        *,
        tasks: Sequence[TaskHealth],
        control_up: bool,
        tor_gave_up: bool,
    ) -> str | None:
        """None when healthy, else why (one line, for the log)."""
        if control_up or self._control_seen is None:
            # The first check counts as seen: start-up waited for the control session.
            self._control_seen = now
        if tor_gave_up:
            return "the tor watchdog cannot restart tor"
        for task in tasks:
            if task.failing_since is not None and now - task.failing_since > task.budget:
                return (
                    f"task '{task.name}' has been failing for {now - task.failing_since:.0f} s "
                    f"(restart budget {task.budget:.0f} s)"
                )
        silent = now - self._control_seen
        if silent > self.policy.control_budget:
            return f"tor's control session has not worked for {self.policy.control_budget:.0f} s"
        return None
