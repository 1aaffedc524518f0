"""A coordinator as a process, for the network-namespace test (``python -m`` inside ``ip netns``).

Usage: ``python -m tests.cluster_net.node_runner <settings.json>`` with keys ``node_id``,
``priority``, ``listen``, ``peers``, ``token_path``, ``state_dir``, ``max_lifetime``. Prints one
JSON status line every 0.1 s (role, who it believes publishes, live peers). On SIGTERM it sends
lease_release if it publishes and exits 0; it also exits on its own after ``max_lifetime``
seconds, so a crashed test cannot leave it behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import ClusterKey
from rustbalance.config.addresses import parse_endpoint
from rustbalance.config.schema import CoordinationConfig

STATUS_EVERY_SECS = 0.1


def _identity(data: bytes) -> bytes:
    return data


async def main(settings: dict[str, Any], token: bytes) -> int:
    config = CoordinationConfig(
        cluster_token_path=Path(settings["token_path"]),
        listen=parse_endpoint(settings["listen"]),
        peers=tuple(parse_endpoint(p) for p in settings["peers"]),
        heartbeat_interval_secs=settings["interval"],
        heartbeat_timeout_secs=settings["timeout"],
        takeover_grace_secs=settings["grace"],
    )
    node: Coordinator[bytes] = Coordinator(
        node_id=settings["node_id"],
        priority=settings["priority"],
        publisher_eligible=True,
        config=config,
        key=ClusterKey(token),
        state_dir=Path(settings["state_dir"]),
        encode_intro_point=_identity,
        decode_intro_point=_identity,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while True:
            status = {
                "node_id": node.node_id,
                "role": node.role.value,
                "publisher": node.publisher(),
                "live": [p.node_id for p in node.live_peers()],
                "heartbeats_received": node.counters.heartbeats_received,
            }
            sys.stdout.write(json.dumps(status) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(STATUS_EVERY_SECS)

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
    doc = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    sys.exit(asyncio.run(main(doc, Path(doc["token_path"]).read_bytes())))
