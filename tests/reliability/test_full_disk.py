"""Fault matrix: the disk holding ``node.state_dir`` is full.

A real full disk, not a mock: the node's state directory is a 256 KiB tmpfs (mounted for the
test, we run as root; always unmounted) filled to the last byte. The node is a real
``rustbalance run`` in cluster mode on the private Tor network; its peers are coordinator
processes (tests/cluster_net/node_runner.py, holding the same master key) so that it learns a
new member while the disk is full and must save ``cluster_members.json``.

Expected: the daemon keeps running and serving the master address; it logs a clear, rate-limited
WARNING naming the file and "No space left on device"; the members file on disk is still the last
complete version (written atomically: temp file, fsync, rename; the temp file is removed when
the write fails), with no temp files left behind; ``rustbalance status`` still answers (its
socket lives on the full disk too). Once space is free again the file is saved at the next
coordinator tick with the new member.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rustbalance.cluster.membership import Membership
from rustbalance.crypto.keys import IdentityKey
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from tests.node_e2e import running_node
from tests.node_e2e.cluster_helpers import free_udp_ports, wait_for
from tests.reliability.helpers import Runner, mounted_tmpfs, write_master_key
from tests.torhelpers import get_with_retries

INTERVAL, TIMEOUT, GRACE = 1.0, 3.0, 3.0
PEERS_FILE = "cluster_members.json"


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` until ENOSPC; the filler file's path."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with filler.open("wb", buffering=0) as fh:
        for _ in range(100_000):  # bounded: 400 MB, far more than the tmpfs holds
            try:
                fh.write(block)  # tmpfs allocates whole pages: 4 KiB blocks fill it exactly
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    assert os.statvfs(directory).f_bavail == 0
    return filler


def _saved_members(path: Path, master: IdentityKey) -> set[str]:
    """The node ids of the members file as written (empty while it does not exist)."""
    if not path.exists():
        return set()
    membership = Membership(master.public_key)
    membership.load_json(path.read_text(), int(time.time() * 1000))
    return {r.node_id for r in membership.members()}


def _runner(work: Path, name: str, listen: int, peers: list[int], master: Path) -> Runner:
    return Runner(
        work,
        name,
        {
            "node_id": name,
            "priority": 50,
            "listen": f"127.0.0.1:{listen}",
            "peers": [f"127.0.0.1:{p}" for p in peers],
            "master_key_path": str(master),
            "node_key_path": str(work / f"{name}.node.key"),
            "interval": INTERVAL,
            "timeout": TIMEOUT,
            "grace": GRACE,
            "skew_tolerance": 5.0,
            "max_lifetime": 600.0,
        },
    )


@pytest.mark.tor
async def test_full_state_disk_keeps_serving_and_never_corrupts_the_members_file(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    work = tmp_path / "node"
    work.mkdir()
    master = IdentityKey.generate(secrets.token_bytes)
    master_file = write_master_key(tmp_path / "master.key", master)
    port_a, port_b, port_c = free_udp_ports(3)
    peer_b = _runner(tmp_path, "node-b", port_b, [port_a], master_file)
    peer_c = _runner(tmp_path, "node-c", port_c, [port_a], master_file)
    overrides: dict[str, dict[str, object]] = {
        "node": {"node_key_path": str(tmp_path / "node-a.node.key")},
        "coordination": {
            "listen": f"127.0.0.1:{port_a}",
            "peers": [f"127.0.0.1:{port_b}"],
            "heartbeat_interval_secs": INTERVAL,
            "heartbeat_timeout_secs": TIMEOUT,
            "takeover_grace_secs": GRACE,
        },
        "publish": {"upload_timeout_secs": 15},
    }
    with mounted_tmpfs(work / "state", "256k") as state:
        peers_file = state / PEERS_FILE
        try:
            peer_b.start()
            with running_node(
                tor_network, work, "node-a", overrides=overrides, master=master
            ) as node:
                client = await asyncio.to_thread(tor_client_factory)
                socks = client.socks_address
                assert socks is not None
                await asyncio.to_thread(node.wait_line, r"^Published", 180)
                await asyncio.to_thread(
                    wait_for,
                    lambda: _saved_members(peers_file, master) == {"node-a", "node-b"},
                    30,
                    "the members file to be written",
                )
                saved = peers_file.read_text()
                body = await get_with_retries(socks, node.address, isolation="disk-before")
                assert body.strip() == "hello from node-a-target"

                filler = _fill(state)
                full_at = time.time()
                peer_c.start()  # a new member: the node must save the members file again
                warning = await asyncio.to_thread(
                    node.wait_line,
                    rf"cannot save {peers_file}: .*No space left on device",
                    60,
                    after=full_at,
                )
                assert warning.level == "WARNING"
                doc = await asyncio.to_thread(node.process.status)
                assert {p["node_id"]: p["alive"] for p in doc["peers"]} == {
                    "node-b": True,
                    "node-c": True,
                }
                # The last complete file, untouched; no temp file left on the full disk. (keys/:
                # the instance key, a cluster node's default identity mode.)
                assert peers_file.read_text() == saved
                assert sorted(p.name for p in state.iterdir()) == sorted(
                    [PEERS_FILE, "filler", "keys", "status.sock"]
                )
                body = await get_with_retries(socks, node.address, isolation="disk-full")
                assert body.strip() == "hello from node-a-target"
                assert node.process.poll() is None
                # Rate-limited: one line per minute, not one per coordinator tick.
                lines = node.lines(r"cannot save .*No space left", after=full_at)
                assert len(lines) == 1, lines

                filler.unlink()
                freed_at = time.monotonic()
                await asyncio.to_thread(
                    wait_for,
                    lambda: "node-c" in _saved_members(peers_file, master),
                    30,
                    "the members file to be saved once space is free",
                )
                resumed = time.monotonic() - freed_at
                assert _saved_members(peers_file, master) == {"node-a", "node-b", "node-c"}
                assert node.process.poll() is None
                print(
                    f"\nfull disk: warning {warning.at - full_at:.1f} s after the new peer, "
                    f"members file saved {resumed:.1f} s after space was freed"
                )
        finally:
            peer_b.stop()
            peer_c.stop()
