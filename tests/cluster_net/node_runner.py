"""A cluster coordinator as a process: the network-namespace test runs it inside ``ip netns``, the
clock-skew and full-disk tests under libfaketime or on a tiny filesystem.

Usage: ``python -m tests.cluster_net.node_runner <settings.json>``; the settings name
``node_id``, ``priority``, ``listen``, ``peers``, ``master_key_path`` (the master key's seed
file, 0600: the node admits itself with it, as a daemon that holds the key does),
``node_key_path`` (made when missing), ``interval``, ``timeout``, ``grace`` and
``max_lifetime``, and optionally ``state_dir`` (default: none, nothing saved),
``skew_tolerance`` (default: the config's) and ``status_every`` (default 0.1 s). It runs the
:class:`~rustbalance.cluster.coordinator.Coordinator` the daemon runs (same sealing, clock
checks, election, membership), without tor, and prints one JSON status line every
``status_every`` seconds with what ``rustbalance status`` shows under ``cluster``: role, term,
believed publisher, live peers, counters and rejected datagrams per reason, plus its wall clock.
It exits 0 on SIGTERM (a publisher sends lease_release first) or by itself after
``max_lifetime`` seconds, so a crashed test cannot leave it behind. Log lines (INFO and up) go
to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.identity import load_or_create_node_key
from rustbalance.config.schema import CoordinationConfig
from rustbalance.crypto.keys import load_identity_key
from rustbalance.rules import parse_endpoint
from tests.cluster_net.support import self_admitted


def _identity(data: bytes) -> bytes:
    return data


async def main(settings: dict[str, Any]) -> int:
    optional: dict[str, Any] = {}
    if "skew_tolerance" in settings:
        optional["clock_skew_tolerance_secs"] = settings["skew_tolerance"]
    config = CoordinationConfig(
        listen=parse_endpoint(settings["listen"]),
        peers=tuple(parse_endpoint(p) for p in settings["peers"]),
        heartbeat_interval_secs=settings["interval"],
        heartbeat_timeout_secs=settings["timeout"],
        takeover_grace_secs=settings["grace"],
        **optional,
    )
    state_dir = Path(settings["state_dir"]) if settings.get("state_dir") else None
    master = load_identity_key(settings["master_key_path"])
    key, _ = load_or_create_node_key(Path(settings["node_key_path"]))
    membership = self_admitted(
        settings["node_id"],
        key,
        str(config.listen),
        priority=settings["priority"],
        state_dir=state_dir,
        master=master,
    )
    node: Coordinator[bytes] = Coordinator(
        node_id=settings["node_id"],
        node_key=key,
        membership=membership,
        config=config,
        state_dir=state_dir,
        encode_intro_point=_identity,
        decode_intro_point=_identity,
    )
    every = float(settings.get("status_every", 0.1))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while True:
            status = {
                "node_id": node.node_id,
                "wall": time.time(),
                "role": node.role.value,
                "term": node.term,
                "publisher": node.publisher(),
                "live": [p.node_id for p in node.live_peers()],
                "rejected": {str(k): v for k, v in node.rejected.items() if v},
                "heartbeats_received": node.counters.heartbeats_received,
            }
            sys.stdout.write(json.dumps(status) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(every)

    async with asyncio.TaskGroup() as group:
        runner = group.create_task(node.run())
        reporter = group.create_task(report())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings["max_lifetime"])
        await node.shutdown()
        runner.cancel()
        reporter.cancel()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    doc = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    sys.exit(asyncio.run(main(doc)))
