"""A RustBalance node on the private Tor network, run as an operator runs it.

:func:`write_node_config` writes a managed-mode config whose ``tor.extra_torrc`` joins the
private network; :class:`NodeProcess` runs ``rustbalance run --config ...`` as a subprocess
(stopped by PID) and reads its log and ``rustbalance status``. Used by the demo
(``rustbalance.demo``), :mod:`rustbalance.testnet.cluster` and the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rustbalance.errors import RustBalanceError

__all__ = ["NodeProcess", "write_node_config"]

_PASSWORD_ENV = "RUSTBALANCE_TOR_PASSWORD"  # noqa: S105 (a variable name)


# ----------------------------------------------------------------------------- config


def _toml(value: object) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_node_config(
    path: Path,
    *,
    node_id: str,
    key_file: Path,
    master_address: str,
    target: str,
    work_dir: Path,
    extra_torrc: Sequence[str] = (),
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """Write a managed-mode single-node config; ``overrides`` adds or replaces keys per section
    (a value of None removes the key)."""
    sections: dict[str, dict[str, object]] = {
        "node": {
            "id": node_id,
            "state_dir": work_dir / "state",
            "status_socket": work_dir / "state" / "status.sock",
        },
        "master": {"identity_key_path": key_file, "onion_address": master_address},
        "target": {"address": target},
        "tor": {"mode": "managed", "data_dir": work_dir / "tor", "extra_torrc": list(extra_torrc)},
        "proxy": {"listen_port": 0},
        # Off so two nodes on one machine never share the metrics port (tests that want
        # /metrics set [metrics] listen to a free port).
        "metrics": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        table = sections.setdefault(section, {})
        table.update(values)
        for key in [k for k, v in values.items() if v is None]:
            del table[key]
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"
        for name, values in sections.items()
    )
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the node


class NodeProcess:
    """``rustbalance run`` as a subprocess; its stdout and stderr go to ``log_path``."""

    def __init__(
        self, config_path: Path, log_path: Path, *, module: str = "rustbalance.cli.main"
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        # The entry point run with ``python -m`` (testnet/previous_release.py: an older one).
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RustBalanceError("node not started")
        return self.proc.pid

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != _PASSWORD_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log_fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    self.module,
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                env=env,
                # Its own process group: a Ctrl-C in the terminal reaches the demo, which then
                # stops the node by PID with SIGTERM (an orderly shutdown, not a double signal).
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern``; raise if the node exits or time runs out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            code = self.poll()
            if code is not None:
                raise RustBalanceError(
                    f"node exited with code {code} before logging {pattern!r}:\n"
                    + "\n".join(self.log_text().splitlines()[-30:])
                )
            if time.monotonic() >= deadline:
                raise RustBalanceError(f"node did not log {pattern!r} within {timeout:.0f} s")
            time.sleep(0.25)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``rustbalance <args>`` (e.g. ``status``) as the operator would."""
        return subprocess.run(
            [sys.executable, "-m", "rustbalance.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--config", str(self.config_path), "--format", "json")
        if result.returncode != 0:
            raise RustBalanceError(f"rustbalance status failed: {result.stderr.strip()}")
        doc = json.loads(result.stdout)
        if not isinstance(doc, dict):
            raise RustBalanceError("rustbalance status: not a JSON object")
        return doc

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the node by PID and wait; SIGKILL if it outlives ``timeout``. Exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return int(proc.returncode)
