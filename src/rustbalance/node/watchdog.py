"""Tor process watchdog (Phase 1.2): a pure state machine and a thin asyncio loop.

Every ``check_interval`` (15 s) the loop asks tor whether it runs. When it is down:

- WARN "Tor process is not running, attempting restart", then restart it;
- on success INFO "Tor restarted via <method>", wait ``settle`` (10 s, let tor bootstrap), then
  call ``on_restarted`` (the daemon re-applies the onion service and event subscriptions: anything
  set over the control port is gone after a restart, system.md W7);
- a failed restart increments a consecutive-failure counter; from 3 consecutive failures on, ERROR
  "Tor cannot be restarted, manual intervention required";
- at most 3 restart attempts per 5-minute sliding window, to prevent a restart storm; a further
  attempt is skipped with a WARN until the window frees.

When tor is healthy the consecutive-failure counter resets (DEBUG log).

:class:`GuardedTor` is the daemon's tor as the watchdog sees it: not "down" while the daemon
stops it on purpose, and down when its process lives but its control port has not given a
working session for ``TOR_HUNG_INTERVALS`` watchdog intervals (a hung tor: SIGSTOP, a deadlock,
swapped out; system.md §12).

The core (:class:`TorWatchdog`) takes the time as an argument and returns log lines; the shell
(:func:`run_tor_watchdog`) does the I/O, so the core is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from rustbalance.node import DAEMON_LOGGER
from rustbalance.tor.process import ManagedTor, TorProcess

log = logging.getLogger(__name__)
# GuardedTor's lines have always come from the daemon.
daemon_log = logging.getLogger(DAEMON_LOGGER)

MSG_DOWN = "Tor process is not running, attempting restart"
MSG_GIVE_UP = "Tor cannot be restarted, manual intervention required"
# A tor whose process lives but whose control port has not given us a working session for this
# many watchdog intervals is hung: the watchdog restarts it. Two intervals, so one slow
# reconnect (commands time out after 10 s) is never mistaken for it.
TOR_HUNG_INTERVALS = 2.0


class TorLike(Protocol):
    """What the watchdog needs from a tor process (ManagedTor / SystemTor match structurally)."""

    async def is_running(self) -> bool: ...

    async def restart(self) -> object:
        """Restart tor; raise on failure. A ``str`` result names the method used."""
        ...


@dataclass(frozen=True)
class WatchdogPolicy:
    """Phase 1.2 numbers; configurable for tests and operators."""

    check_interval: float = 15.0
    settle: float = 10.0
    max_attempts: int = 3
    window: float = 300.0
    give_up_after: int = 3
    # A restart that hangs must not stall the watchdog forever.
    restart_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.check_interval <= 0 or self.settle < 0 or self.window <= 0:
            raise ValueError("watchdog intervals must be positive")
        if self.max_attempts < 1 or self.give_up_after < 1 or self.restart_timeout <= 0:
            raise ValueError("watchdog limits must be at least 1")


class Action(Enum):
    HEALTHY = "healthy"
    RESTART = "restart"
    SKIP = "skip"  # down, but the restart budget of the window is used up


@dataclass(frozen=True)
class LogLine:
    level: int
    message: str


@dataclass(frozen=True)
class Decision:
    action: Action
    logs: tuple[LogLine, ...]


@dataclass(frozen=True)
class WatchdogStats:
    """Counters for status and metrics."""

    running: bool
    restarts: int
    failures: int
    consecutive_failures: int
    skipped: int
    last_restart_at: float | None


@dataclass
class TorWatchdog:
    """Pure Phase 1.2 state machine; ``now`` is a monotonic time in seconds."""

    policy: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    running: bool = True
    restarts: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    skipped: int = 0
    last_restart_at: float | None = None
    _attempts: deque[float] = field(default_factory=deque)

    def _prune(self, now: float) -> None:
        while self._attempts and now - self._attempts[0] >= self.policy.window:
            self._attempts.popleft()

    def on_check(self, running: bool, now: float) -> Decision:
        """Tor's state was observed at ``now``; decide what to do."""
        self.running = running
        if running:
            if self.consecutive_failures:
                line = LogLine(
                    logging.DEBUG,
                    "Tor process is running; resetting restart failure counter "
                    f"(was {self.consecutive_failures})",
                )
                self.consecutive_failures = 0
            else:
                line = LogLine(logging.DEBUG, "Tor process is running")
            return Decision(Action.HEALTHY, (line,))
        self._prune(now)
        if len(self._attempts) >= self.policy.max_attempts:
            self.skipped += 1
            wait = self.policy.window - (now - self._attempts[0])
            return Decision(
                Action.SKIP,
                (
                    LogLine(
                        logging.WARNING,
                        "Tor process is not running; restart skipped: "
                        f"{self.policy.max_attempts} attempts in the last "
                        f"{self.policy.window:.0f}s, next attempt possible in {wait:.0f}s",
                    ),
                ),
            )
        self._attempts.append(now)
        return Decision(Action.RESTART, (LogLine(logging.WARNING, MSG_DOWN),))

    def on_restart_result(
        self, ok: bool, now: float, method: str = "", error: str = ""
    ) -> tuple[LogLine, ...]:
        """The restart attempt started by :meth:`on_check` finished."""
        if ok:
            self.running = True
            self.restarts += 1
            self.consecutive_failures = 0
            self.last_restart_at = now
            return (LogLine(logging.INFO, f"Tor restarted via {method}"),)
        self.failures += 1
        self.consecutive_failures += 1
        logs = [
            LogLine(
                logging.WARNING,
                f"Tor restart failed ({self.consecutive_failures} consecutive): {error}",
            )
        ]
        if self.consecutive_failures >= self.policy.give_up_after:
            logs.append(LogLine(logging.ERROR, MSG_GIVE_UP))
        return tuple(logs)

    def stats(self) -> WatchdogStats:
        return WatchdogStats(
            running=self.running,
            restarts=self.restarts,
            failures=self.failures,
            consecutive_failures=self.consecutive_failures,
            skipped=self.skipped,
            last_restart_at=self.last_restart_at,
        )


def restart_method_name(tor: object, result: object = None) -> str:
    """How tor was restarted, for the INFO line ("systemctl", "managed process")."""
    if isinstance(result, str) and result:
        return result
    named = getattr(tor, "restart_method", None)
    if isinstance(named, str) and named:
        return named
    # SystemTor records the command that worked, e.g. "systemctl restart tor@default" or
    # "service tor restart"; Phase 1.2's line names only the tool ("via systemctl").
    last = getattr(tor, "last_method", None)
    if isinstance(last, str) and last:
        return last.split()[0]
    kind = type(tor).__name__
    if kind == "SystemTor":
        return "systemctl"
    if kind == "ManagedTor":
        return "managed process"
    return kind


def _emit(logs: tuple[LogLine, ...]) -> None:
    for line in logs:
        log.log(line.level, line.message)


async def run_tor_watchdog(
    tor: TorLike,
    policy: WatchdogPolicy | None = None,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    on_restarted: Callable[[], Awaitable[None]] | None = None,
    watchdog: TorWatchdog | None = None,
) -> None:
    """Watch tor forever (Phase 1.2). Pass ``watchdog`` to read its counters elsewhere."""
    dog = watchdog if watchdog is not None else TorWatchdog(policy or WatchdogPolicy())
    pol = dog.policy
    reapply_pending = False
    while True:
        try:
            running = await tor.is_running()
        except Exception as exc:  # a failing check means we cannot trust tor is up
            log.warning("Checking whether tor runs failed: %s", exc)
            running = False
        decision = dog.on_check(running, clock())
        _emit(decision.logs)
        if decision.action is Action.RESTART:
            try:
                result = await asyncio.wait_for(tor.restart(), pol.restart_timeout)
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    reason = f"restart timed out after {pol.restart_timeout:.0f}s"
                _emit(dog.on_restart_result(False, clock(), error=reason))
            else:
                _emit(dog.on_restart_result(True, clock(), restart_method_name(tor, result)))
                # Phase 1.2: let tor bootstrap before touching it again.
                await sleep(pol.settle)
                reapply_pending = True
        if reapply_pending and dog.running and on_restarted is not None:
            try:
                await on_restarted()
            except Exception as exc:
                # The service is not configured on the new tor: retry at the next check.
                log.error("Re-applying the onion service after a Tor restart failed: %s", exc)
            else:
                reapply_pending = False
        elif on_restarted is None:
            reapply_pending = False
        await sleep(pol.check_interval)


class GuardedTor:
    """The watchdog's view of tor: during shutdown tor is stopped on purpose, so it must not
    be "restarted" by the watchdog; ``running`` is the last observed state for status."""

    def __init__(
        self,
        tor: TorProcess,
        *,
        connected: Callable[[], bool] | None = None,
        hung_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tor = tor
        self.shutting_down = False
        self.running = True
        # Lost control port (system.md §12): the process runs, the control port does not answer.
        self._connected = connected
        self._hung_after = hung_after
        self._clock = clock
        self._disconnected_since: float | None = None

    @property
    def last_method(self) -> str | None:
        method = getattr(self.tor, "last_method", None)
        return method if isinstance(method, str) else None

    async def is_running(self) -> bool:
        if self.shutting_down:
            return True
        alive = await self.tor.is_running()
        if alive and self._hung():
            alive = False
        self.running = alive
        return self.running

    def _hung(self) -> bool:
        """True once the control session has been down for ``hung_after`` s while the
        process lives (its commands time out, so the controller keeps reconnecting)."""
        if self._connected is None or self._hung_after is None or self._connected():
            self._disconnected_since = None
            return False
        now = self._clock()
        if self._disconnected_since is None:
            self._disconnected_since = now
            return False
        silent = now - self._disconnected_since
        if silent < self._hung_after:
            return False
        daemon_log.warning(
            "Tor is running but its control port has not answered for %.0f s: treating it as hung",
            silent,
        )
        return True

    async def restart(self) -> str | None:
        if self.shutting_down:
            return None
        await self.tor.restart()
        self.running = True
        self._disconnected_since = None
        if isinstance(self.tor, ManagedTor):
            return "managed process"
        return self.last_method
