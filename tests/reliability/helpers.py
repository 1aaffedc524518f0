"""Helpers of the reliability suite: coordinator processes, master key files, a tiny tmpfs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file

__all__ = ["LIBFAKETIME", "Runner", "mounted_tmpfs", "write_master_key"]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def write_master_key(path: Path, key: IdentityKey | None = None) -> Path:
    """A master key seed file (0600 from the first byte): the coordinator processes admit
    themselves with it, as daemons that hold the master key do."""
    write_seed_key_file(key or IdentityKey.generate(secrets.token_bytes), path)
    return path


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (we run as root); always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        result = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if result.returncode != 0:  # still busy: detach now, freed when the last user exits
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


class Runner:
    """One coordinator process (tests/cluster_net/node_runner.py); status lines go to a file
    the test reads, log lines to another."""

    def __init__(self, work: Path, name: str, settings: dict[str, Any]) -> None:
        self.name = name
        self.settings_path = work / f"{name}.json"
        self.settings_path.write_text(json.dumps({"status_every": 0.2, **settings}))
        self.out = work / f"{name}.out"
        self.err = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, faketime: str | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        if faketime is not None:
            env["LD_PRELOAD"] = str(LIBFAKETIME)
            env["FAKETIME"] = faketime
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.cluster_net.node_runner",
                    str(self.settings_path),
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def statuses(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Status lines from line number ``since`` on."""
        docs: list[dict[str, Any]] = []
        for line in self.out.read_text().splitlines()[int(since) :]:
            with contextlib.suppress(ValueError):
                docs.append(json.loads(line))
        return docs

    def lines_seen(self) -> int:
        return len(self.out.read_text().splitlines())

    def last(self) -> dict[str, Any] | None:
        docs = self.statuses()
        return docs[-1] if docs else None
