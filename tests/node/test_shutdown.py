"""Every shutdown path ends within one budget, below ``TimeoutStopSec=`` (issue 17).

Before: the hooks alone could take 1 + 3 + (drain + 6) + 20 = 33 s with the defaults, the
clean-up after them had no bound at all, and neither had a stop during start-up. Now the
daemon's steps come from one budget (:func:`~rustbalance.node.daemon.Daemon.stop_budget`,
14 s with the defaults), ``run_daemon`` holds the whole shutdown (hooks and clean-up, or the
clean-up of an interrupted start) to it, and the unit's ``TimeoutStopSec=`` is above it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rustbalance.config import parse_config
from rustbalance.node.daemon import Daemon
from rustbalance.node.sdnotify import SystemdNotifier
from tests.node.fakes import master_key

REPO = Path(__file__).resolve().parents[2]
SRC = str(REPO / "src")
UNIT = (REPO / "deploy" / "rustbalance.service").read_text()


def timeout_stop_sec() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)$", UNIT, re.MULTILINE)
    assert match, "the unit sets TimeoutStopSec="
    return float(match.group(1))


def daemon(tmp_path: Path, extra: str = "") -> Daemon:
    config = parse_config(
        f'[node]\nid = "node-a"\nstate_dir = "{tmp_path}/state"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:8000"\n' + extra,
        tmp_path,
    )
    return Daemon(config, master_key(), notifier=SystemdNotifier(env={}))


def test_the_default_budget_is_below_timeout_stop_sec(tmp_path: Path) -> None:
    node = daemon(tmp_path)
    budget = node.stop_budget()
    steps = {hook.name: hook.timeout for hook in node.hooks()}
    # Lease release 2 s, drain 3 s + 1, tor 5 s (SIGTERM, then SIGKILL), clean-up 2 s.
    assert steps == {"leave cluster": 2.0, "drain proxy": 4.0, "stop tor": 5.0}
    assert budget == sum(steps.values()) + 2.0 == 13.0
    assert budget + 5.0 <= timeout_stop_sec() <= 30.0
    # The managed tor is killed within its step.
    assert node.runtime.tor_stop_timeout < steps["stop tor"]


def test_a_longer_drain_makes_a_longer_budget(tmp_path: Path) -> None:
    # systemd is told (EXTEND_TIMEOUT_USEC with STOPPING=1), so the unit need not change.
    node = daemon(tmp_path, "[proxy]\ndrain_timeout_secs = 30\n")
    assert node.stop_budget() == 13.0 + 27.0


SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys
    from rustbalance.node.supervisor import ShutdownHook, TaskSpec, run_daemon

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    MODE = sys.argv[1]

    async def start():
        if MODE == "slow-start":
            print("STARTING", flush=True)
            await asyncio.sleep(60)

    async def close():
        await asyncio.sleep(60)  # a clean-up that hangs

    async def serve():
        print("READY", flush=True)
        await asyncio.Event().wait()

    async def hang():
        await asyncio.sleep(60)

    def stopping(budget):
        print(f"STOPPING {budget}", flush=True)

    sys.exit(asyncio.run(run_daemon(
        start, close, lambda: [TaskSpec("proxy", serve)],
        lambda: [ShutdownHook("drain", hang, timeout=0.5)],
        stop_budget=1.5, stopping=stopping,
    )))
    """
)


def run_until_exit(tmp_path: Path, mode: str) -> tuple[int, str, str, float]:
    script = tmp_path / "daemon.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, first + out, err, took


def test_a_hanging_clean_up_after_a_stop_ends_within_the_budget(tmp_path: Path) -> None:
    code, out, err, took = run_until_exit(tmp_path, "serve")
    assert out == "READY\nSTOPPING 1.5\n"
    assert took < 1.5 + 1.0, (took, err)
    assert code == 0, err
    assert "WARNING Shutdown step 'drain' timed out after 0.5s" in err.splitlines()
    assert "WARNING Shutdown did not finish within its 1.5 s budget; exiting" in err.splitlines()


def test_a_stop_during_start_up_ends_within_the_budget(tmp_path: Path) -> None:
    code, out, err, took = run_until_exit(tmp_path, "slow-start")
    assert out == "STARTING\nSTOPPING 1.5\n"
    assert took < 1.5 + 1.0, (took, err)
    assert code == 0, err
    assert err.splitlines()[0] == "INFO Received SIGTERM during start-up"
