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

:class:`~rustbalance.testnet.node.NodeProcess` and its config writer come from ``testnet/``
(the end-to-end tests use them too); ``testnet/`` never imports this module.
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
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.errors import RustBalanceError
from rustbalance.testnet.apps import NamedHTTPServer, http_get_via_tor
from rustbalance.testnet.node import NodeProcess, write_node_config

__all__ = ["main"]

ROUNDS_ENV = "RB_DEMO_ROUNDS"
# The node publishes within about a minute on the private network (tor bootstrap, intro
# circuits, first publish); the first fetch may need a few more tries.
NODE_READY_TIMEOUT = 240.0
FETCH_TIMEOUT = 30.0


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
