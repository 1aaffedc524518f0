"""The deployment path: two network namespaces joined by a veth pair, a userspace WireGuard
interface in each (configured by cluster/wireguard.py), and a coordinator process in each that
talks over the tunnel addresses only. The tunnel goes down and up; the interface of one side is
rebuilt from its saved peers file (a reboot). Namespaces, interfaces and processes are removed
by name and PID at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rustbalance.cluster.wireguard import (
    WireGuardError,
    WireGuardInterface,
    WireGuardMode,
    WireGuardPeer,
    generate_private_key,
    load_or_create_private_key,
    public_key_of,
)
from tests.cluster_net.support import GRACE, INTERVAL, TIMEOUT, wait_until
from tests.reliability.helpers import write_master_key

REPO = Path(__file__).resolve().parents[2]
TAG = f"{os.getpid() % 100000}"
NS = {"a": f"rbcn-a-{TAG}", "b": f"rbcn-b-{TAG}"}
VETH = {"a": f"rbva{TAG}", "b": f"rbvb{TAG}"}
WG_IF = {"a": f"rbwa{TAG}", "b": f"rbwb{TAG}"}  # distinct: wireguard-go's socket path is global
UNDERLAY = {"a": "10.231.77.1", "b": "10.231.77.2"}
TUNNEL = {"a": "10.232.77.1", "b": "10.232.77.2"}
WG_PORT = 51820
COORD_PORT = 51821
LIFETIME = 120  # the runners exit on their own after this, whatever happens to the test


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=15)


def in_ns(name: str, *argv: str) -> None:
    sh("ip", "netns", "exec", NS[name], *argv)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    try:
        for name in ("a", "b"):
            sh("ip", "netns", "add", NS[name])
            in_ns(name, "ip", "link", "set", "lo", "up")
        sh(
            "ip", "link", "add", VETH["a"], "netns", NS["a"], "type", "veth",
            "peer", "name", VETH["b"], "netns", NS["b"],
        )  # fmt: skip
        for name in ("a", "b"):
            in_ns(name, "ip", "address", "add", f"{UNDERLAY[name]}/30", "dev", VETH[name])
            in_ns(name, "ip", "link", "set", VETH[name], "up")
        yield
    finally:
        for name in ("a", "b"):
            # Deleting a namespace deletes the veth end and any interface inside it.
            subprocess.run(["ip", "netns", "del", NS[name]], capture_output=True, timeout=15)


@dataclass
class Runner:
    name: str
    process: asyncio.subprocess.Process
    last: dict[str, Any] = field(default_factory=dict)
    lines: int = 0

    async def follow(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.last = json.loads(line)
            self.lines += 1

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()

    @property
    def role(self) -> str | None:
        return self.last.get("role")


@contextlib.asynccontextmanager
async def runners(tmp_path: Path) -> AsyncIterator[dict[str, Runner]]:
    master_path = write_master_key(tmp_path / "master.key")
    started: dict[str, Runner] = {}
    followers: list[asyncio.Task[None]] = []
    try:
        for name, priority, other in (("a", 1, "b"), ("b", 2, "a")):
            settings = {
                "node_id": f"node-{name}",
                "priority": priority,
                "listen": f"{TUNNEL[name]}:{COORD_PORT}",
                "peers": [f"{TUNNEL[other]}:{COORD_PORT}"],
                "master_key_path": str(master_path),
                "node_key_path": str(tmp_path / f"node-{name}.key"),
                "state_dir": str(tmp_path / f"state-{name}"),
                "interval": INTERVAL,
                "timeout": TIMEOUT,
                "grace": GRACE,
                "max_lifetime": LIFETIME,
            }
            path = tmp_path / f"runner-{name}.json"
            path.write_text(json.dumps(settings))
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", NS[name],
                sys.executable, "-m", "tests.cluster_net.node_runner", str(path),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            runner = Runner(name, process)
            started[name] = runner
            followers.append(asyncio.create_task(runner.follow()))
        yield started
    finally:
        for runner in started.values():
            await runner.stop()
        for task in followers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def interface(
    name: str, keys: dict[str, str], tmp_path: Path, with_peer: bool
) -> WireGuardInterface:
    other = "b" if name == "a" else "a"
    peers = (
        [WireGuardPeer(public_key_of(keys[other]), TUNNEL[other], f"{UNDERLAY[other]}:{WG_PORT}")]
        if with_peer
        else []
    )
    return WireGuardInterface(
        WG_IF[name],
        private_key=keys[name],
        listen_port=WG_PORT,
        address=f"{TUNNEL[name]}/24",
        peers=peers,
        netns=NS[name],
        peers_file=tmp_path / f"wg-peers-{name}.json",
    )


def one_publisher(r: dict[str, Runner], expected: str) -> bool:
    a, b = r["a"].last, r["b"].last
    roles = sorted(x.get("role", "") for x in (a, b))
    return (
        roles == ["publisher", "standby"] and a.get("publisher") == b.get("publisher") == expected
    )


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_namespaces_over_userspace_wireguard(tmp_path: Path) -> None:
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    pids: list[int] = []
    with namespaces():
        wg = {name: interface(name, keys, tmp_path, with_peer=True) for name in ("a", "b")}
        try:
            for w in wg.values():
                await w.up()
                # No kernel module here (tor.md 13.1): the userspace fallback, tracked by PID.
                assert w.mode is WireGuardMode.USERSPACE
                assert w.userspace_pid is not None
                pids.append(w.userspace_pid)
                cmdline = _cmdline(w.userspace_pid)
                assert b"wireguard-go" in cmdline and keys["a"].encode() not in cmdline
            saved = tmp_path / "wg-peers-a.json"
            assert stat.S_IMODE(saved.stat().st_mode) == 0o600
            assert keys["a"] not in saved.read_text() and keys["b"] not in saved.read_text()

            async with runners(tmp_path) as r:
                took = await wait_until(
                    lambda: one_publisher(r, "node-a"), TIMEOUT + GRACE + 8, "one publisher"
                )
                print(f"\nnetns over WireGuard: agreed on node-a after {took:.2f} s")
                handshakes = await wg["a"].latest_handshakes()
                assert handshakes[public_key_of(keys["b"])] > 0
                assert r["b"].last["live"] == ["node-a"]

                # Tunnel down: both sides alone, b takes over after timeout + grace.
                await wg["a"].set_link(False)
                took = await wait_until(
                    lambda: r["a"].role == r["b"].role == "publisher",
                    TIMEOUT + GRACE + INTERVAL + 3,
                    "each side to publish alone",
                )
                print(f"tunnel down: node-b published after {took:.2f} s")
                await wg["a"].set_link(True)
                took = await wait_until(
                    lambda: one_publisher(r, "node-a"), TIMEOUT + 8, "agreement after link up"
                )
                print(f"tunnel up: one publisher again after {took:.2f} s")

                # A "reboot" of a's interface: rebuilt with no peers given, from the saved file.
                await wg["a"].down()
                assert not _pid_alive(pids[0])
                wg["a"] = interface("a", keys, tmp_path, with_peer=False)
                await wg["a"].up()
                assert [p.tunnel_ip for p in wg["a"].peers] == [TUNNEL["b"]]
                assert wg["a"].userspace_pid is not None
                pids.append(wg["a"].userspace_pid)
                heard = r["b"].last["heartbeats_received"]
                took = await wait_until(
                    lambda: r["b"].last["heartbeats_received"] >= heard + 3,
                    TIMEOUT + 8,
                    "heartbeats over the rebuilt tunnel",
                )
                print(f"interface rebuilt from its peers file: heartbeats flow after {took:.2f} s")
                handshakes = await wg["a"].latest_handshakes()
                assert handshakes[public_key_of(keys["b"])] > 0
                await wait_until(lambda: one_publisher(r, "node-a"), TIMEOUT, "agreement")
                assert r["a"].lines > 0 and r["b"].lines > 0
            for runner in r.values():
                assert runner.process.returncode == 0
        finally:
            for w in wg.values():
                await w.down()
    for pid in pids:
        assert not _pid_alive(pid)
    listing = _netns_list()
    assert NS["a"] not in listing and NS["b"] not in listing


def test_peer_rules_keys_and_persistence(tmp_path: Path) -> None:
    key = generate_private_key()
    assert len(public_key_of(key)) == 44
    peers_file = tmp_path / "peers.json"
    w = WireGuardInterface(
        "rbwtest0", private_key=key, listen_port=51820, address="10.9.0.1/24", peers_file=peers_file
    )
    assert key not in repr(w)
    p1 = WireGuardPeer(public_key_of(generate_private_key()), "10.9.0.2", "192.0.2.1:51820")
    asyncio.run(w.add_peer(p1))  # not up: recorded and saved only
    other = public_key_of(generate_private_key())
    with pytest.raises(WireGuardError, match="already belongs"):
        asyncio.run(w.add_peer(WireGuardPeer(other, "10.9.0.2")))  # the /32 hijack of W4
    with pytest.raises(WireGuardError, match="our own"):
        asyncio.run(w.add_peer(WireGuardPeer(other, "10.9.0.1")))
    with pytest.raises(WireGuardError):
        WireGuardPeer("not-a-key", "10.9.0.3")
    assert stat.S_IMODE(peers_file.stat().st_mode) == 0o600
    restored = WireGuardInterface(
        "rbwtest0", private_key=key, listen_port=51820, address="10.9.0.1/24", peers_file=peers_file
    )
    restored._load_peers_file()
    assert restored.peers == (p1,)
    asyncio.run(restored.remove_peer(p1.public_key))
    assert json.loads(peers_file.read_text())["peers"] == []

    key_path = tmp_path / "wg.key"
    created = load_or_create_private_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_or_create_private_key(key_path) == created
    key_path.chmod(0o644)
    with pytest.raises(WireGuardError, match="readable"):
        load_or_create_private_key(key_path)
