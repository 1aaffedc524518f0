"""A third node joins a two-node cluster, and all three WireGuard tunnels carry coordination
(issue 16, finding 8): wireguard-go in three network namespaces on one bridge.

node-a is what ``rustbalance init`` makes (it holds the master key and admits joiners); node-b
and node-c are what ``rustbalance join`` makes with node-a's token (no master key: instances).
Each node runs the daemon's cluster half (tests/ops/mesh_runner.py: the node's own config, the
Mesh with its WireGuard interface, the Coordinator, the proxy with the join interceptor) in its
namespace, coordinating over the tunnel addresses only. The joins are the real ``rustbalance
join`` in the joiner's namespace; a SOCKS5 server in node-a's namespace stands in for tor and
delivers them to node-a's proxy (a daemon in a namespace cannot reach the private Tor network).

node-c is admitted by node-a alone. Before issue 16 node-b never learnt its WireGuard key: the
tunnel b <-> c never formed. Now node-c's master-signed record spreads with the membership,
node-b's mesh adds it, and every pair shakes hands and hears the other's heartbeats.

Namespaces, interfaces and processes are removed by name and PID at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rustbalance.cluster.wireguard import public_key_of
from tests.cluster_net.support import wait_until

REPO = Path(__file__).resolve().parents[2]
TAG = f"{os.getpid() % 100000}"
NAMES = ("a", "b", "c")
HUB = f"rbth-{TAG}"
NS = {n: f"rbt{n}-{TAG}" for n in NAMES}
WG_IF = {n: f"rbt{n}{TAG}" for n in NAMES}  # wireguard-go's socket path is global
_NET = 20 + os.getpid() % 200
UNDERLAY = {n: f"10.233.{_NET}.{i + 1}" for i, n in enumerate(NAMES)}
TUNNEL_NETWORK = f"10.234.{_NET}.0/24"
PASSPHRASE = "a long passphrase for the mesh test"
SOCKS_PORT = 1080
PROXY_PORT = 18080
TIMINGS = {"heartbeat_interval_secs": 1, "heartbeat_timeout_secs": 3, "takeover_grace_secs": 2}
STEP = 60.0


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def _ns(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return _sh("ip", "netns", "exec", name, *argv)


@contextlib.contextmanager
def _bridged_namespaces() -> Iterator[None]:
    """A hub namespace with a bridge, and each node's namespace on it through a veth pair."""
    try:
        _sh("ip", "netns", "add", HUB)
        _ns(HUB, "ip", "link", "add", "br0", "type", "bridge")
        _ns(HUB, "ip", "link", "set", "br0", "up")
        for n in NAMES:
            _sh("ip", "netns", "add", NS[n])
            _ns(NS[n], "ip", "link", "set", "lo", "up")
            _sh("ip", "link", "add", f"u{n}{TAG}", "netns", NS[n], "type", "veth",
                "peer", "name", f"h{n}{TAG}", "netns", HUB)  # fmt: skip
            _ns(HUB, "ip", "link", "set", f"h{n}{TAG}", "master", "br0", "up")
            _ns(NS[n], "ip", "address", "add", f"{UNDERLAY[n]}/24", "dev", f"u{n}{TAG}")
            _ns(NS[n], "ip", "link", "set", f"u{n}{TAG}", "up")
        yield
    finally:
        for name in (*NS.values(), HUB):
            # Deleting a namespace deletes its veth ends and any interface inside it.
            _sh("ip", "netns", "del", name, check=False)


@dataclass
class Process:
    """A process in a namespace (``ip netns exec`` execs it: the PID is its own)."""

    name: str
    process: asyncio.subprocess.Process
    last: dict[str, Any] = field(default_factory=dict)

    async def follow(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)

    async def stop(self) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return int(self.process.returncode or 0)


class Spawner:
    """Processes in namespaces, their status lines followed; all stopped by ``close``."""

    def __init__(self) -> None:
        self.started: list[Process] = []
        self.followers: list[asyncio.Task[None]] = []

    async def spawn(self, key: str, ns: str, *argv: str, log: Path) -> Process:
        with log.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, sys.executable, *argv,
                cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )  # fmt: skip
        started = Process(key, process)
        self.started.append(started)
        self.followers.append(asyncio.create_task(started.follow()))
        return started

    async def close(self) -> None:
        for process in self.started:
            await process.stop()
        for task in self.followers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _edit(config: Path, node: str) -> None:
    """The test's own settings on a config init/join wrote: a unique interface, wireguard-go,
    short timings, no metrics port."""
    doc = tomllib.loads(config.read_text())
    doc["wireguard"].update({"interface": WG_IF[node], "mode": "userspace", "enabled": True})
    doc["coordination"].update(TIMINGS)
    doc["metrics"] = {"enabled": False}
    config.write_text(tomli_w.dumps(doc))


def _join(tmp_path: Path, node: str) -> subprocess.CompletedProcess[str]:
    """The real `rustbalance join` in the joiner's namespace, through the SOCKS stand-in."""
    return _ns(
        NS[node], sys.executable, "-m", "rustbalance.cli.main", "join",
        "--config-dir", str(tmp_path / f"conf-{node}"),
        "--state-dir", str(tmp_path / f"state-{node}"),
        "--node-id", f"node-{node}", "--endpoint", f"{UNDERLAY[node]}:51820",
        "--target", "127.0.0.1:1", "--tor-mode", "managed",
        "--tor-socks", f"{UNDERLAY['a']}:{SOCKS_PORT}", "--join-attempts", "3",
        "--token-file", str(tmp_path / "conf-a" / "join-token.txt"),
        "--passphrase-file", str(tmp_path / "pass"), "--non-interactive",
    )  # fmt: skip


def _wg_key(tmp_path: Path, node: str) -> str:
    return public_key_of((tmp_path / f"conf-{node}" / "wireguard.key").read_text().strip())


async def test_a_third_node_joins_and_all_three_tunnels_carry_coordination(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces)")
    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE)
    passfile.chmod(0o600)
    init = _sh(
        sys.executable, "-m", "rustbalance.cli.main", "init",
        "--config-dir", str(tmp_path / "conf-a"), "--state-dir", str(tmp_path / "state-a"),
        "--node-id", "node-a", "--endpoint", f"{UNDERLAY['a']}:51820", "--target", "127.0.0.1:1",
        "--tor-mode", "managed", "--proxy-port", str(PROXY_PORT),
        "--tunnel-network", TUNNEL_NETWORK, "--token-uses", "2",
        "--passphrase-file", str(passfile), "--non-interactive",
        check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    _edit(tmp_path / "conf-a" / "config.toml", "a")
    with _bridged_namespaces():
        spawner = Spawner()
        try:
            spawn = spawner.spawn
            socks = await spawn(
                "socks", NS["a"], "-m", "tests.ops.fake_socks", UNDERLAY["a"], str(SOCKS_PORT),
                str(PROXY_PORT), log=tmp_path / "socks.log",
            )  # fmt: skip
            runners: dict[str, Process] = {}
            runners["a"] = await spawn(
                "a", NS["a"], "-m", "tests.ops.mesh_runner", str(tmp_path / "conf-a/config.toml"),
                log=tmp_path / "node-a.log",
            )  # fmt: skip
            await wait_until(lambda: bool(runners["a"].last), STEP, "node-a up", 0.2)
            await wait_until(lambda: socks.process.returncode is None, 1, "socks", 0.1)

            # node-b joins the one-node cluster and forms a two-node one with node-a.
            joined = await asyncio.to_thread(_join, tmp_path, "b")
            assert joined.returncode == 0, joined.stderr
            assert "Admitted by node-a" in joined.stdout
            _edit(tmp_path / "conf-b" / "config.toml", "b")
            runners["b"] = await spawn(
                "b", NS["b"], "-m", "tests.ops.mesh_runner", str(tmp_path / "conf-b/config.toml"),
                log=tmp_path / "node-b.log",
            )  # fmt: skip
            took = await wait_until(
                lambda: (
                    runners["a"].last.get("live") == ["node-b"]
                    and runners["b"].last.get("live") == ["node-a"]
                ),
                STEP,
                "node-a and node-b to coordinate over their tunnel",
                0.2,
            )
            print(f"\ntwo nodes coordinate over WireGuard {took:.1f} s after node-b started")

            # node-c joins through node-a only.
            joined = await asyncio.to_thread(_join, tmp_path, "c")
            assert joined.returncode == 0, joined.stderr
            _edit(tmp_path / "conf-c" / "config.toml", "c")
            runners["c"] = await spawn(
                "c", NS["c"], "-m", "tests.ops.mesh_runner", str(tmp_path / "conf-c/config.toml"),
                log=tmp_path / "node-c.log",
            )  # fmt: skip

            def full_mesh() -> bool:
                for n in NAMES:
                    last = runners[n].last
                    others = sorted(f"node-{o}" for o in NAMES if o != n)
                    if last.get("live") != others or len(last.get("wg_peers", [])) != 2:
                        return False
                    shaken = last.get("handshakes", {})
                    keys = [_wg_key(tmp_path, o) for o in NAMES if o != n]
                    if not all(shaken.get(k, 0) > 0 for k in keys):
                        return False
                return True

            took = await wait_until(full_mesh, STEP, "all three tunnels to carry coordination", 0.2)
            print(f"three nodes over three tunnels {took:.1f} s after node-c started")
            for n in NAMES:
                assert runners[n].last["members"] == ["node-a", "node-b", "node-c"]
            # node-b coordinates with node-c over the tunnel node-a's admission created.
            heard = runners["b"].last["heartbeats_received"]
            await wait_until(
                lambda: runners["b"].last["heartbeats_received"] >= heard + 4, STEP, "heartbeats"
            )
            assert not runners["b"].last["rejected"]
            codes = [await runners[n].stop() for n in NAMES]
            assert codes == [0, 0, 0], [(tmp_path / f"node-{n}.log").read_text() for n in NAMES]
        finally:
            await spawner.close()
        for n in NAMES:
            assert _sh("ip", "netns", "exec", NS[n], "ip", "link", "show", WG_IF[n],
                       check=False).returncode != 0  # fmt: skip
