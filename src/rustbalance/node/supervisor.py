"""Structured concurrency for the daemon's long-running tasks (system.md W14, Phase 2.5).

The original ended the process with exit code 0 when any task died and had no signal handling.
Here every task runs inside one :class:`asyncio.TaskGroup`:

- a task that raises, or returns while no shutdown was asked for, has failed;
- a failed task marked ``restartable`` is started again after a backoff (WARN);
- any other failed task ends the whole group: ERROR naming the task, shutdown hooks run, and
  :meth:`Supervisor.run` returns 1 so the process exits non-zero and systemd restarts it;
- SIGTERM / SIGINT log "Received SIGTERM" (or SIGINT), run the shutdown hooks (lease release,
  proxy drain, ...) each within its time bound while the tasks still run, cancel the tasks, log
  "Shutdown complete" and return 0.

The supervisor records each task's failure streak (node/health.py ``TaskRecord``), which the
systemd watchdog ping reads.

:func:`run_daemon` is a daemon's whole life around it (start-up that a signal can interrupt,
supervision, clean-up) and the one place that decides the exit code. Every way of stopping (a
signal after start-up, a signal during start-up, a fatal task failure) ends within one budget
(``stop_budget``: the hooks' bounds plus the clean-up's), which systemd is told when the
shutdown begins (``stopping``); a step that overruns is cut off and the process exits anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from rustbalance.errors import RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.health import DEFAULT_RESTART_BUDGET, TaskRecord
from rustbalance.node.publish_policy import backoff
from rustbalance.node.startup import StartupError

log = logging.getLogger(__name__)
# run_daemon's start-up lines have always come from the daemon.
daemon_log = logging.getLogger(DAEMON_LOGGER)

EXIT_OK = 0
EXIT_TASK_FAILED = 1
# run_daemon's bound on a whole shutdown when the caller gives none.
DEFAULT_STOP_BUDGET = 30.0


@dataclass(frozen=True)
class TaskSpec:
    """A named long-running coroutine; ``run`` is called again for every restart."""

    name: str
    run: Callable[[], Awaitable[None]]
    restartable: bool = False
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    # A run that lasted this long was healthy: the next failure starts the backoff afresh.
    stable_after: float = 60.0
    # Failing (without a stable run) for longer than this makes the node unhealthy: the
    # systemd watchdog ping is withheld (node/health.py).
    restart_budget: float = DEFAULT_RESTART_BUDGET


@dataclass(frozen=True)
class ShutdownHook:
    """Work to do on an orderly shutdown (e.g. release the lease, drain the proxy)."""

    name: str
    run: Callable[[], Awaitable[None]]
    timeout: float = 5.0


class TaskFailed(RustBalanceError):
    """A non-restartable task raised or returned; the daemon must exit non-zero."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(f"task '{task}' failed: {reason}")
        self.task = task
        self.reason = reason


class Supervisor:
    """Run tasks until a signal or a fatal task failure; :meth:`run` returns the exit code."""

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        hooks: Sequence[ShutdownHook] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        record: TaskRecord | None = None,
        on_shutdown: Callable[[], None] = lambda: None,
        deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        self._tasks = tuple(tasks)
        self._hooks = tuple(hooks)
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self.record = record if record is not None else TaskRecord()
        # Called once when a shutdown begins (a signal or a fatal failure): tell systemd.
        self._on_shutdown = on_shutdown
        # The loop time by which the shutdown must be over (None: only the hooks' bounds).
        self._deadline = deadline
        self._stop = asyncio.Event()
        self._stopping = False
        self.shutdown_reason: str | None = None
        self.restarts: dict[str, int] = {t.name: 0 for t in tasks}
        self._signals: list[signal.Signals] = []

    @property
    def stopping(self) -> bool:
        return self._stopping

    def request_shutdown(self, reason: str) -> None:
        """Begin an orderly shutdown (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        self.shutdown_reason = reason
        self._on_shutdown()
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            log.warning("Received %s again; shutdown already in progress", sig.name)
            return
        log.info("Received %s", sig.name)
        self.request_shutdown(sig.name)

    def install_signal_handlers(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Route SIGTERM/SIGINT to an orderly shutdown (call from inside the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals.append(sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    async def _supervise(self, spec: TaskSpec) -> None:
        consecutive = 0
        while True:
            started = self._clock()
            self.record.started(spec.name, started)
            try:
                await spec.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    log.debug("Task '%s' ended during shutdown: %s", spec.name, exc)
                    return
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                cause: BaseException | None = exc
            else:
                if self._stopping:
                    return
                reason = "exited unexpectedly"
                cause = None
            self.record.failed(spec.name, self._clock())
            if not spec.restartable:
                log.error("Task '%s' failed: %s", spec.name, reason, exc_info=cause)
                raise TaskFailed(spec.name, reason) from cause
            if self._clock() - started >= spec.stable_after:
                consecutive = 0
            consecutive += 1
            self.restarts[spec.name] += 1
            delay = backoff(consecutive, spec.backoff_base, spec.backoff_cap, self._rand)
            log.warning(
                "Task '%s' failed: %s; restarting in %.1fs (restart %d)",
                spec.name,
                reason,
                delay,
                self.restarts[spec.name],
                exc_info=cause,
            )
            await self._sleep(delay)
            if self._stopping:
                return

    async def _run_hooks(self) -> None:
        loop = asyncio.get_running_loop()
        for hook in self._hooks:
            limit = hook.timeout
            deadline = self._deadline()
            if deadline is not None:
                # Never past the whole shutdown's budget, whatever the step's own bound.
                limit = max(0.0, min(limit, deadline - loop.time()))
            try:
                await asyncio.wait_for(hook.run(), limit)
            except TimeoutError:
                log.warning("Shutdown step '%s' timed out after %gs", hook.name, limit)
            except Exception as exc:
                log.warning("Shutdown step '%s' failed: %s", hook.name, exc)

    async def _shutdown_when_asked(self, tasks: list[asyncio.Task[None]]) -> None:
        await self._stop.wait()
        # Hooks first, while coordination and proxy still run (lease release, drain).
        await self._run_hooks()
        for task in tasks:
            task.cancel()

    async def run(self) -> int:
        """Run every task; return 0 after an orderly shutdown, 1 after a fatal task failure."""
        failure: TaskFailed | None = None
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._supervise(spec), name=spec.name) for spec in self._tasks
                ]
                group.create_task(self._shutdown_when_asked(tasks), name="shutdown")
        except* TaskFailed as failures:
            first = failures.exceptions[0]
            assert isinstance(first, TaskFailed)
            failure = first
        if failure is not None:
            if not self._stopping:
                self._stopping = True
                self._on_shutdown()
            await self._run_hooks()
            log.error("Exiting with status %d: task '%s' failed", EXIT_TASK_FAILED, failure.task)
            return EXIT_TASK_FAILED
        log.info("Shutdown complete")
        return EXIT_OK


async def run_daemon(
    start: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    tasks: Callable[[], Sequence[TaskSpec]],
    hooks: Callable[[], Sequence[ShutdownHook]],
    *,
    stop_budget: float = DEFAULT_STOP_BUDGET,
    stopping: Callable[[float], None] = lambda _budget: None,
    record: TaskRecord | None = None,
) -> int:
    """A daemon's whole life: ``start()``, then supervise ``tasks()`` until SIGTERM/SIGINT or a
    fatal failure, then ``close()``; the process exit code.

    A signal during start-up stops it (exit 0 after ``close``); a :class:`StartupError` is
    logged as "Start-up failed: ..." and its exit code returned (2 config/key, 1 runtime).
    However the shutdown begins, ``stopping(stop_budget)`` is called first and the hooks and
    ``close()`` together end within ``stop_budget`` seconds (what overruns is cancelled)."""
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    assert starting is not None
    interrupted: list[str] = []
    deadline: list[float] = []

    def begin_shutdown() -> None:
        if not deadline:
            deadline.append(loop.time() + stop_budget)
            stopping(stop_budget)

    def stop_start_up(sig: signal.Signals) -> None:
        if interrupted:
            return
        daemon_log.info("Received %s during start-up", sig.name)
        interrupted.append(sig.name)
        begin_shutdown()
        starting.cancel()

    async def bounded_close() -> None:
        if not deadline:
            await close()
            return
        try:
            await asyncio.wait_for(close(), max(0.0, deadline[0] - loop.time()))
        except TimeoutError:
            daemon_log.warning(
                "Shutdown did not finish within its %g s budget; exiting", stop_budget
            )

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_start_up, sig)
    try:
        await start()
    except asyncio.CancelledError:
        if not interrupted:
            raise
        starting.uncancel()
        await bounded_close()
        daemon_log.info("Shutdown complete")
        return EXIT_OK
    except StartupError as exc:
        daemon_log.error("Start-up failed: %s", exc)
        await close()
        return exc.exit_code
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    supervisor = Supervisor(
        tasks(),
        hooks(),
        record=record,
        on_shutdown=begin_shutdown,
        deadline=lambda: deadline[0] if deadline else None,
    )
    supervisor.install_signal_handlers()
    try:
        return await supervisor.run()
    finally:
        supervisor.remove_signal_handlers()
        await bounded_close()


async def run_supervised(tasks: Sequence[TaskSpec], hooks: Sequence[ShutdownHook] = ()) -> int:
    """Install SIGTERM/SIGINT handlers and supervise ``tasks``; the process exit code."""
    supervisor = Supervisor(tasks, hooks)
    supervisor.install_signal_handlers()
    try:
        return await supervisor.run()
    finally:
        supervisor.remove_signal_handlers()
