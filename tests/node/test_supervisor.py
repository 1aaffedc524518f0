"""node/supervisor.py: task failure semantics in-process, signals against a real subprocess."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rustbalance.node.supervisor import ShutdownHook, Supervisor, TaskFailed, TaskSpec

LOGGER = "rustbalance.node.supervisor"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def forever() -> None:
    await asyncio.Event().wait()


async def test_failing_task_ends_group_with_exit_1(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    events: list[str] = []

    async def other() -> None:
        try:
            await forever()
        finally:
            events.append("other cancelled")

    async def publish() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def hook() -> None:
        events.append("hook")

    supervisor = Supervisor(
        [TaskSpec("proxy", other), TaskSpec("publish", publish)],
        [ShutdownHook("release lease", hook)],
    )
    assert await asyncio.wait_for(supervisor.run(), 5) == 1
    assert events == ["other cancelled", "hook"]
    assert messages(caplog, logging.ERROR) == [
        "Task 'publish' failed: RuntimeError: boom",
        "Exiting with status 1: task 'publish' failed",
    ]
    assert "Shutdown complete" not in messages(caplog, logging.INFO)


async def test_task_that_returns_is_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def quits() -> None:
        return None

    supervisor = Supervisor([TaskSpec("heartbeat", quits), TaskSpec("proxy", forever)])
    assert await asyncio.wait_for(supervisor.run(), 5) == 1
    assert messages(caplog, logging.ERROR)[0] == "Task 'heartbeat' failed: exited unexpectedly"


async def test_restartable_task_restarts_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    runs = 0
    delays: list[float] = []
    supervisor: Supervisor

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ConnectionError("control port closed")
        supervisor.request_shutdown("test done")
        await forever()

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    supervisor = Supervisor(
        [TaskSpec("intro refresh", flaky, restartable=True)],
        clock=lambda: 0.0,
        sleep=fake_sleep,
        rand=lambda: 0.0,
    )
    assert await asyncio.wait_for(supervisor.run(), 5) == 0
    assert runs == 4
    assert delays == [1.0, 2.0, 4.0]
    assert supervisor.restarts == {"intro refresh": 3}
    assert messages(caplog, logging.WARNING)[0] == (
        "Task 'intro refresh' failed: ConnectionError: control port closed; "
        "restarting in 1.0s (restart 1)"
    )


async def test_backoff_resets_after_a_stable_run() -> None:
    now = 0.0
    runs = 0
    delays: list[float] = []
    supervisor: Supervisor

    async def flaky() -> None:
        nonlocal runs, now
        runs += 1
        if runs == 3:
            now += 120  # this run was healthy for two minutes before failing
        if runs <= 3:
            raise ConnectionError("lost")
        supervisor.request_shutdown("test done")

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    supervisor = Supervisor(
        [TaskSpec("t", flaky, restartable=True, stable_after=60)],
        clock=lambda: now,
        sleep=fake_sleep,
        rand=lambda: 0.0,
    )
    assert await asyncio.wait_for(supervisor.run(), 5) == 0
    assert delays == [1.0, 2.0, 1.0]


async def test_orderly_shutdown_runs_hooks_before_cancelling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    events: list[str] = []
    proxy_running = True

    async def proxy() -> None:
        nonlocal proxy_running
        try:
            await forever()
        finally:
            proxy_running = False

    async def drain() -> None:
        events.append(f"drain (proxy running: {proxy_running})")

    async def stuck() -> None:
        await forever()

    async def broken() -> None:
        raise OSError("socket gone")

    supervisor = Supervisor(
        [TaskSpec("proxy", proxy)],
        [
            ShutdownHook("proxy drain", drain),
            ShutdownHook("lease release", stuck, timeout=0.05),
            ShutdownHook("wireguard cleanup", broken),
        ],
    )
    asyncio.get_running_loop().call_soon(supervisor.request_shutdown, "test")
    assert await asyncio.wait_for(supervisor.run(), 5) == 0
    assert events == ["drain (proxy running: True)"]
    assert not proxy_running
    assert messages(caplog, logging.WARNING) == [
        "Shutdown step 'lease release' timed out after 0.05s",
        "Shutdown step 'wireguard cleanup' failed: socket gone",
    ]
    assert messages(caplog, logging.INFO) == ["Shutdown complete"]


async def test_task_returning_during_shutdown_is_not_a_failure() -> None:
    supervisor: Supervisor

    async def server() -> None:
        supervisor.request_shutdown("SIGTERM")
        await asyncio.sleep(0)
        # returns because the drain closed it

    supervisor = Supervisor([TaskSpec("proxy", server), TaskSpec("other", forever)])
    assert await asyncio.wait_for(supervisor.run(), 5) == 0
    assert supervisor.shutdown_reason == "SIGTERM"


def test_duplicate_names_rejected_and_error_type() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([TaskSpec("a", forever), TaskSpec("a", forever)])
    assert str(TaskFailed("publish", "exited unexpectedly")) == (
        "task 'publish' failed: exited unexpectedly"
    )


# --- real signals to a subprocess -----------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from rustbalance.node.supervisor import ShutdownHook, TaskSpec, run_supervised

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    MODE = sys.argv[1]

    async def serve():
        print("READY", flush=True)
        if MODE == "fail":
            raise RuntimeError("listener died")
        await asyncio.Event().wait()

    async def drain():
        print("drained", flush=True)

    async def slow():
        await asyncio.sleep(60)

    sys.exit(asyncio.run(run_supervised(
        [TaskSpec("proxy", serve)],
        [ShutdownHook("proxy drain", drain, timeout=3.0),
         ShutdownHook("slow", slow, timeout=0.2)],
    )))
    """
)


def run_script(
    tmp_path: Path, mode: str, sig: signal.Signals | None, source: str = SCRIPT
) -> tuple[int, str, str]:
    script = tmp_path / "daemon.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        prefix = ""
        if sig is not None:
            # Wait until the handlers are installed and the task runs; nothing else is printed
            # before the signal, so the buffered readline cannot swallow later output.
            prefix = proc.stdout.readline()
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        out = prefix + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_gives_orderly_shutdown_and_exit_0(tmp_path: Path, sig: signal.Signals) -> None:
    code, out, err = run_script(tmp_path, "serve", sig)
    assert code == 0, err
    assert out == "READY\ndrained\n"
    lines = err.splitlines()
    assert lines[0] == f"INFO Received {sig.name}"
    assert "WARNING Shutdown step 'slow' timed out after 0.2s" in lines
    assert lines[-1] == "INFO Shutdown complete"


def test_task_failure_makes_the_process_exit_non_zero(tmp_path: Path) -> None:
    code, out, err = run_script(tmp_path, "fail", None)
    assert code == 1
    assert out == "READY\ndrained\n"  # shutdown hooks still run
    assert "ERROR Task 'proxy' failed: RuntimeError: listener died" in err
    assert err.splitlines()[-1] == "ERROR Exiting with status 1: task 'proxy' failed"


# --- run_daemon: start-up, supervision, clean-up, exit code ----------------------------------

DAEMON_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from rustbalance.node.startup import StartupError
    from rustbalance.node.supervisor import ShutdownHook, TaskSpec, run_daemon

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    MODE = sys.argv[1]

    async def start():
        if MODE == "bad-config":
            raise StartupError("invalid config x.toml: node.id: is required", 2)
        if MODE == "slow-start":
            print("STARTING", flush=True)
            await asyncio.sleep(60)

    async def close():
        print("closed", flush=True)

    async def serve():
        print("READY", flush=True)
        await asyncio.Event().wait()

    async def drain():
        print("drained", flush=True)

    sys.exit(asyncio.run(run_daemon(
        start, close, lambda: [TaskSpec("proxy", serve)],
        lambda: [ShutdownHook("proxy drain", drain, timeout=3.0)],
    )))
    """
)


def test_a_start_up_error_exits_with_its_code_after_clean_up(tmp_path: Path) -> None:
    code, out, err = run_script(tmp_path, "bad-config", None, DAEMON_SCRIPT)
    assert code == 2
    assert out == "closed\n"
    assert err.splitlines() == [
        "ERROR Start-up failed: invalid config x.toml: node.id: is required"
    ]


def test_a_signal_during_start_up_stops_it_cleanly(tmp_path: Path) -> None:
    code, out, err = run_script(tmp_path, "slow-start", signal.SIGTERM, DAEMON_SCRIPT)
    assert code == 0, err
    assert out == "STARTING\nclosed\n"
    assert err.splitlines() == ["INFO Received SIGTERM during start-up", "INFO Shutdown complete"]


def test_a_started_daemon_runs_hooks_then_cleans_up(tmp_path: Path) -> None:
    code, out, err = run_script(tmp_path, "serve", signal.SIGINT, DAEMON_SCRIPT)
    assert code == 0, err
    assert out == "READY\ndrained\nclosed\n"
    assert err.splitlines() == ["INFO Received SIGINT", "INFO Shutdown complete"]
