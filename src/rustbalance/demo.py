"""``make demo`` / ``python -m rustbalance.demo``: a RustBalance node on a private Tor network.

Everything runs on 127.0.0.1 under one temporary directory:

1. a private Tor network (3 authorities, relays, a client; tor.md §13);
2. a sample target app: HTTP on 127.0.0.1 answering with a page that names itself;
3. a fresh master key and a node config whose ``tor.extra_torrc`` holds the lines that make
   the node's managed tor join the private network;
4. the node itself, as a subprocess (``python -m rustbalance.cli.main run --config ...``),
   exactly as an operator runs it;
5. a Tor client that fetches ``http://<master>.onion/`` every few seconds, printing the answer
   and a summary of ``rustbalance status``.

Ctrl-C (or SIGTERM) stops everything the demo started, by PID. ``--rounds N`` (or
``RB_DEMO_ROUNDS=N``) stops after N successful fetches and exits 0, so tests can run it; every
wait is bounded.

:class:`NodeProcess` and :func:`write_node_config` are also used by the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.errors import RustBalanceError
from rustbalance.testnet.apps import NamedHTTPServer, http_get_via_tor

__all__ = ["NodeProcess", "main", "write_node_config"]

ROUNDS_ENV = "RB_DEMO_ROUNDS"
# The node publishes within about a minute on the private network (tor bootstrap, intro
# circuits, first publish); the first fetch may need a few more tries.
NODE_READY_TIMEOUT = 240.0
FETCH_TIMEOUT = 30.0
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
        # Off so two nodes on one machine never fight over port 9100 (tests that want /metrics
        # set [metrics] listen to a free port).
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

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
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
                    "rustbalance.cli.main",
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


# ----------------------------------------------------------------------------- the target app


def _summary(doc: Mapping[str, Any]) -> str:
    tor = doc.get("tor", {})
    ips = doc.get("intro_points", {})
    pub = doc.get("last_publish", {})
    proxy = doc.get("proxy", {})
    now = time.time()

    def ago(value: object) -> str:
        return f"{now - value:.0f}s ago" if isinstance(value, int | float) else "never"

    return (
        f"status: {doc.get('mode')}/{doc.get('role')}, tor "
        f"{'running' if tor.get('running') else 'DOWN'} ({tor.get('restarts')} restarts), "
        f"intro points {ips.get('own')} own / {ips.get('published')} published, "
        f"published current {ago(pub.get('current'))}, next {ago(pub.get('next'))}, "
        f"proxied {proxy.get('total')} connections"
    )


# ----------------------------------------------------------------------------- main


class _Stop(Exception):
    """SIGTERM asked the demo to stop."""


def _say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _wait_ready(node: NodeProcess, address: str) -> float:
    """Show progress until the node published (or time runs out); seconds since its start."""
    assert node.started_at is not None
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    milestones = [
        (r"ready after [0-9.]+ s", "node's tor bootstrapped"),
        (r"Intro points available after \d+s", "tor built its intro points"),
        (r"Published descriptor for", f"master descriptor published for {address}"),
    ]
    shown = 0
    last_dot = 0.0
    while shown < len(milestones):
        text = node.log_text()
        while shown < len(milestones) and re.search(milestones[shown][0], text):
            _say(f"  ... {milestones[shown][1]} ({time.monotonic() - node.started_at:.1f} s)")
            shown += 1
        if shown == len(milestones):
            break
        if node.poll() is not None:
            raise RustBalanceError(f"the node exited with code {node.poll()}; see {node.log_path}")
        if time.monotonic() >= deadline:
            raise RustBalanceError(f"node not ready within {NODE_READY_TIMEOUT:.0f} s")
        if time.monotonic() - last_dot >= 10:
            _say(f"  waiting ({time.monotonic() - node.started_at:.0f} s)")
            last_dot = time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - node.started_at


def run_demo(work: Path, rounds: int | None, interval: float) -> int:
    from rustbalance.testnet import PrivateTorNetwork  # heavy; only the demo needs it

    network = PrivateTorNetwork(work / "tornet", n_relays=4)
    app: NamedHTTPServer | None = None
    node: NodeProcess | None = None
    try:
        _say(f"starting a private Tor network on 127.0.0.1 in {work} ...")
        network.start()
        _say(f"network ready after {network.ready_seconds:.1f} s")
        app = NamedHTTPServer("the RustBalance demo app", html=True)
        _say(f"sample target app on 127.0.0.1:{app.port}")

        master = IdentityKey.generate(secrets.token_bytes)
        key_file = work / "master.key"
        write_seed_key_file(master, key_file)
        address = master.onion_address
        node_dir = work / "node"
        node_dir.mkdir()
        config = write_node_config(
            work / "config.toml",
            node_id="demo-node",
            key_file=key_file,
            master_address=address,
            target=f"127.0.0.1:{app.port}",
            work_dir=node_dir,
            extra_torrc=network.client_torrc_lines(),
        )
        _say(f"master address {address}")
        node = NodeProcess(config, work / "node.log")
        node.start()
        _say(f"node started: pid {node.pid}, config {config}, log {node.log_path}")
        took = _wait_ready(node, address)
        _say(f"node ready {took:.1f} s after start")

        visitor = network.add_client("demovisitor")
        assert visitor.socks_address is not None
        socks_host, socks_port = visitor.socks_address
        _say(f"visitor Tor client ready (SOCKS {socks_host}:{socks_port})")
        ok = 0
        attempt = 0
        first_answer: float | None = None
        # Bounded even without --rounds' limit on successes: a fixed cap on attempts.
        max_attempts = (rounds * 10 + 30) if rounds is not None else 10**9
        while (rounds is None or ok < rounds) and attempt < max_attempts:
            attempt += 1
            began = time.monotonic()
            try:
                status, body = asyncio.run(
                    http_get_via_tor(
                        visitor.socks_address,
                        address,
                        isolation=f"demo{attempt}",
                        timeout=FETCH_TIMEOUT,
                    )
                )
            except Exception as exc:  # python-socks raises its own types
                _say(f"fetch {attempt}: not reachable yet ({type(exc).__name__}: {exc})")
            else:
                text = re.sub(r"<[^>]+>", " ", body).split()
                took = time.monotonic() - began
                _say(f"fetch {attempt}: HTTP {status} in {took:.1f} s: {' '.join(text)}")
                if status == 200:
                    ok += 1
                    if first_answer is None and node.started_at is not None:
                        first_answer = time.monotonic() - node.started_at
                        _say(f"master address answered {first_answer:.1f} s after node start")
            with contextlib.suppress(RustBalanceError, json.JSONDecodeError):
                _say(_summary(node.status()))
            if node.poll() is not None:
                _say(f"the node exited with code {node.poll()}; see {node.log_path}")
                return 1
            if rounds is None or ok < rounds:
                time.sleep(interval)
        if rounds is not None and ok < rounds:
            _say(f"only {ok} of {rounds} fetches succeeded in {attempt} attempts")
            return 1
        return 0
    except (_Stop, KeyboardInterrupt):
        _say("stopping")
        return 0
    finally:
        if node is not None:
            code = node.stop()
            _say(f"node stopped (exit code {code})")
        if app is not None:
            app.close()
        network.stop()
        _say("network stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rustbalance.demo", description=__doc__)
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ[ROUNDS_ENV]) if os.environ.get(ROUNDS_ENV) else None,
        help=f"stop after N successful fetches (env {ROUNDS_ENV}); default: until Ctrl-C",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between fetches")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")

    def on_sigterm(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="rustbalance-demo-"))
    code = 1
    try:
        code = run_demo(work, args.rounds, args.interval)
        return code
    except RustBalanceError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        if args.keep or code != 0:
            # Keep the logs of a failed run (node.log, tornet/nodes/*/tor.log).
            _say(f"work directory kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
