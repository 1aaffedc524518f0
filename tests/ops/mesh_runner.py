"""The cluster half of ``rustbalance run`` as a process, without tor: for network namespaces.

A daemon inside a network namespace cannot reach the private Tor network (it lives on the
host's loopback), so it would wait for tor's bootstrap forever and never start its
coordinator. This runs what the daemon runs for the cluster, from the node's real config file
and in the daemon's order: the node key and the membership (``prepare_membership``: a node that
holds the master key signs its own record), the :class:`~rustbalance.node.mesh.Mesh`
(WireGuard interface with one peer per admitted member, the join responder on a key holder),
the :class:`~rustbalance.cluster.coordinator.Coordinator`, and the reverse proxy with the mesh's
join interceptor on ``proxy.listen_host:listen_port`` (what tor would connect to). The
coordinator and the WireGuard watcher run in one TaskGroup.

Usage: ``python -m tests.ops.mesh_runner <config.toml>``. Every 0.3 s it prints one JSON line:
node id, role, live peers, members, the interface's peers (tunnel addresses) and their latest
handshakes, rejected datagrams. It exits 0 on SIGTERM (interface down) or after 300 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.config import load_config
from rustbalance.crypto.keys import load_identity_key
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.node.cluster_link import prepare_membership
from rustbalance.node.mesh import Mesh
from rustbalance.proxy import ProxySettings, ReverseProxy, Target

MAX_LIFETIME = 300.0


async def main(config_path: Path) -> int:
    config = load_config(config_path)
    key_path = config.master.identity_key_path
    master = load_identity_key(key_path) if key_path is not None else None
    onion = config.master.onion_address or (master.onion_address if master else "")
    prepared = prepare_membership(
        config, decode_onion_address(onion), master, int(time.time() * 1000)
    )
    mesh = Mesh(config, master_key=master)
    coordinator: Coordinator[bytes] = Coordinator(
        node_id=config.node.id,
        node_key=prepared.node_key,
        membership=prepared.membership,
        config=config.coordination,
        state_dir=config.node.state_dir,
        encode_intro_point=bytes,
        decode_intro_point=bytes,
        on_members=mesh.members_changed,
    )
    await mesh.start(coordinator)
    settings = ProxySettings(
        target=Target("127.0.0.1", 9, is_onion=False),
        listen_host=config.proxy.listen_host,
        listen_port=config.proxy.listen_port,
        drain_timeout=1,
    )
    proxy = ReverseProxy(settings, interceptor=mesh.interceptor())
    await proxy.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while True:
            interface = mesh.interface
            handshakes = await interface.latest_handshakes() if interface is not None else {}
            status = {
                "node_id": coordinator.node_id,
                "role": coordinator.role.value,
                "live": sorted(p.node_id for p in coordinator.live_peers()),
                "members": sorted(r.node_id for r in coordinator.membership.members()),
                "wg_peers": sorted(p.tunnel_ip for p in interface.peers) if interface else [],
                "handshakes": handshakes,
                "heartbeats_received": coordinator.counters.heartbeats_received,
                "rejected": {str(k): v for k, v in coordinator.rejected.items() if v},
            }
            sys.stdout.write(json.dumps(status) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(0.3)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(coordinator.run()),
                group.create_task(mesh.watch_wireguard()),
                group.create_task(report()),
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MAX_LIFETIME)
            await coordinator.shutdown()
            for task in tasks:
                task.cancel()
    finally:
        await proxy.close(1)
        await mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(Path(sys.argv[1]))))
