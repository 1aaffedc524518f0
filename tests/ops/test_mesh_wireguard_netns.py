"""The daemon brings WireGuard up from its config (wireguard-go), admits a join into it, and a
restarted daemon re-applies the persisted peer.

``rustbalance run`` runs inside a network namespace the test creates (WireGuard needs
CAP_NET_ADMIN and must not touch the host's interfaces). Its managed tor cannot reach the
private network from there, so the daemon stays in start-up (waiting for tor's bootstrap) —
but by then the two things under test are already running, in the daemon's own order: the
WireGuard interface (before coordination or tor) and the reverse proxy with the join
interceptor. The join is POSTed to that proxy inside the namespace, which is what tor does
with a request arriving over the master onion; the request's secret goes to curl in a 0600
config file (``curl -K``), never on a command line. SIGTERM during start-up must still take the
interface down; the namespace, processes and files are removed by name and PID at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.config import Config, parse_config
from rustbalance.crypto.keys import load_identity_key
from rustbalance.deploy.join_token import decode
from rustbalance.node import mesh as mesh_module
from rustbalance.node.join import JOIN_PATH, JoinRequest, parse_join_answer
from rustbalance.node.mesh import Mesh
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.tor.process import pid_is_alive
from tests.trust import MASTER, node_key, now_ms, record, signed

pytestmark = pytest.mark.tor

REPO = Path(__file__).resolve().parents[2]
TAG = f"{os.getpid() % 100000}"
NS = f"rbmesh-{TAG}"
IFNAME = f"rbm{TAG}"  # wireguard-go's control socket path is global: unique per run
NETWORK = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}.0/24"
PASSPHRASE = "another long join token passphrase"
PROXY_PORT = 18080  # inside the namespace: nothing else listens there
STEP_TIMEOUT = 60.0


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def _ns(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _sh("ip", "netns", "exec", NS, *argv, check=check)


@contextlib.contextmanager
def _namespace() -> Iterator[None]:
    _sh("ip", "netns", "add", NS)
    try:
        _ns("ip", "link", "set", "lo", "up")
        yield
    finally:
        # Deleting the namespace deletes any interface left inside it.
        _sh("ip", "netns", "del", NS, check=False)


class _Daemon:
    """``rustbalance run`` inside the namespace, stopped by PID."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "RUSTBALANCE_TOR_PASSWORD"}
        env["PYTHONUNBUFFERED"] = "1"
        with log.open("ab") as handle:
            # `ip netns exec` execs the command: the PID is the daemon's own.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", NS, sys.executable, "-m", "rustbalance.cli.main",
                 "run", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, env=env,
                start_new_session=True, cwd=REPO,
            )  # fmt: skip
        self.offset = log.stat().st_size if log.exists() else 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            match = re.search(pattern, self.text()[after:])
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the daemon's log:\n{self.text()}")
            time.sleep(0.2)

    def stop(self) -> int:
        tor_pids = [int(p) for p in re.findall(r"started tor pid (\d+)", self.text())]
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in tor_pids:
            if pid_is_alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == "tor":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return int(self.proc.returncode)


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def _wireguard_go_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"wireguard-go") and IFNAME.encode() in argv:
                    found.append(int(entry.name))
    return found


def _wg_dump() -> list[list[str]]:
    return [line.split("\t") for line in _ns("wg", "show", IFNAME, "dump").stdout.splitlines()]


def test_daemon_brings_up_wireguard_admits_a_join_and_restores_it(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    passfile = _private(tmp_path / "passphrase", PASSPHRASE + "\n")
    init = subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "init",
         "--config-dir", str(tmp_path / "conf"), "--state-dir", str(tmp_path / "state"),
         "--node-id", "node-a", "--endpoint", "192.0.2.1:51820", "--target", "127.0.0.1:1",
         "--tor-mode", "managed", "--proxy-port", str(PROXY_PORT), "--tunnel-network", NETWORK,
         "--passphrase-file", str(passfile), "--non-interactive"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    payload = decode(
        (tmp_path / "conf" / "join-token.txt").read_text().strip(), PASSPHRASE, now=int(time.time())
    )
    config = tmp_path / "conf" / "config.toml"
    doc: dict[str, Any] = tomllib.loads(config.read_text())
    assert doc["wireguard"]["enabled"] is True  # init turns it on
    doc["wireguard"].update({"interface": IFNAME, "mode": "userspace"})
    # The private network's lines, so the namespaced tor never even tries the public network.
    doc["tor"]["extra_torrc"] = list(tor_network.client_torrc_lines())
    doc["tor"]["bootstrap_timeout_secs"] = 300
    doc["metrics"] = {"enabled": False}
    config.write_text(tomli_w.dumps(doc))
    own_ip = NETWORK.rsplit(".", 1)[0] + ".1"

    joiner_raw = secrets.token_bytes(32)
    joiner_key = base64.b64encode(joiner_raw).decode()
    request = JoinRequest(
        node_id="node-b",
        node_key=node_key("node-b").public,
        wg_public_key=joiner_raw,
        wg_endpoint="192.0.2.2:51820",
        coordination_port=51821,
        priority=20,
        request_time=int(time.time()),
        grant=payload.grant,
        grant_secret=payload.grant_secret,
    )
    _private(tmp_path / "join.json", request.to_json(node_key("node-b")).decode())
    curl_config = _private(
        tmp_path / "curl.conf",
        f'url = "http://127.0.0.1:{PROXY_PORT}{JOIN_PATH}"\n'
        'request = "POST"\nheader = "Content-Type: application/json"\n'
        f'data-binary = "@{tmp_path / "join.json"}"\nsilent\nmax-time = 20\n'
        f'write-out = "\\n%{{http_code}}"\n',
    )
    master = load_identity_key(tmp_path / "conf" / "master.key")

    with _namespace():
        # --- first run: the interface comes up from the config; a join lands in it -----------
        daemon = _Daemon(config, tmp_path / "node.log")
        try:
            daemon.wait_log(rf"WireGuard {IFNAME} up \(userspace\), address {own_ip}/24, 0 peers")
            daemon.wait_log(r"Proxy listening on")
            [interface] = _wg_dump()[:1]
            assert interface[2] == "51820"  # listen port from wireguard.listen_port
            assert f"inet {own_ip}/24" in _ns("ip", "-4", "address", "show", IFNAME).stdout
            assert len(_wireguard_go_pids()) == 1
            answer = _ns("curl", "-K", str(curl_config))
            body_text, _, http_code = answer.stdout.rpartition("\n")
            assert http_code == "200", answer.stdout
            joined = parse_join_answer(body_text.encode(), master.public_key, request, now_ms())
            assert [p.node_id for p in joined.peers()] == ["node-a"]
            peers = {row[0]: row for row in _wg_dump()[1:]}
            assert peers[joiner_key][3] == f"{joined.tunnel_address}/32"  # allowed-ips
            assert peers[joiner_key][2] == "192.0.2.2:51820"  # endpoint
            members_file = tmp_path / "state" / MEMBERS_FILE_NAME
            for _ in range(50):  # saved at the coordinator's next tick
                if members_file.exists() and "node-b" in _saved(members_file, master.public_key):
                    break
                time.sleep(0.1)
            assert _saved(members_file, master.public_key) == {"node-a", "node-b"}
            assert members_file.stat().st_mode & 0o777 == 0o600
            # The grant's secret stays out of the log.
            assert payload.grant_secret.hex() not in daemon.text()
        finally:
            code = daemon.stop()
        assert code == 0, daemon.text()
        assert _ns("ip", "link", "show", IFNAME, check=False).returncode != 0
        assert _wireguard_go_pids() == []

        # --- restart: the persisted peer is re-applied -----------------------------------
        offset = len(daemon.text())
        again = _Daemon(config, tmp_path / "node.log")
        try:
            again.wait_log(
                rf"WireGuard {IFNAME} up \(userspace\), address {own_ip}/24, 1 peers", offset
            )
            peers = {row[0]: row for row in _wg_dump()[1:]}
            assert peers[joiner_key][3] == f"{joined.tunnel_address}/32"
            assert peers[joiner_key][2] == "192.0.2.2:51820"
        finally:
            code = again.stop()
        assert code == 0
        assert _ns("ip", "link", "show", IFNAME, check=False).returncode != 0
    log = (tmp_path / "node.log").read_text()
    assert payload.grant_secret.hex() not in log
    assert json.loads((tmp_path / "state" / MEMBERS_FILE_NAME).read_text())["version"] == 1


def _saved(path: Path, master_public: bytes) -> set[str]:
    membership = Membership(master_public)
    membership.load_json(path.read_text(), now_ms())
    return {r.node_id for r in membership.members()}


WATCH_IF = f"rbw{TAG}"


class _Members:
    """What the Mesh reads of the coordinator: its membership (here node-a and node-b)."""

    def __init__(self) -> None:
        self.membership = Membership(MASTER.public_key)
        for content in (
            record("node-a", tunnel="10.77.0.1"),
            record("node-b", tunnel="10.77.0.2", endpoint="192.0.2.2:51820"),
        ):
            self.membership.apply(signed(content), now_ms())


def _watch_config(tmp_path: Path) -> Config:
    _private(tmp_path / "wg.key", generate_private_key() + "\n")
    doc = {
        "node": {"id": "node-a", "state_dir": "state"},
        "master": {"identity_key_path": "master.key"},
        "target": {"address": "127.0.0.1:1"},
        "wireguard": {
            "enabled": True,
            "interface": WATCH_IF,
            "mode": "userspace",
            "private_key_path": "wg.key",
            "address": "10.77.0.1/24",
        },
    }
    return parse_config(tomli_w.dumps(doc), tmp_path)


async def test_a_crashed_wireguard_go_is_brought_back_with_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervised watcher: wireguard-go killed by PID (a real crash, made on demand) takes
    the interface with it; the watcher rebuilds it with the saved peer and says so (WARNING
    when it finds it gone, INFO when it is back)."""
    monkeypatch.setattr(mesh_module, "WIREGUARD_WATCH_SECS", 0.5)
    caplog.set_level(logging.INFO, logger="rustbalance")
    with _namespace():
        mesh = Mesh(_watch_config(tmp_path), netns=NS)
        await mesh.start(_Members())  # type: ignore[arg-type]
        watcher = asyncio.create_task(mesh.watch_wireguard())
        try:
            assert mesh.interface is not None and mesh.interface.userspace_pid is not None
            first_pid = mesh.interface.userspace_pid
            os.kill(first_pid, signal.SIGKILL)
            deadline = time.monotonic() + STEP_TIMEOUT
            while True:
                pid = mesh.interface.userspace_pid
                if pid not in (None, first_pid):
                    dump = _ns("wg", "show", WATCH_IF, "dump", check=False).stdout.splitlines()
                    # up() applies the peers, then the address: wait for both (seen under
                    # load: the peer was there, the address not yet).
                    address = _ns("ip", "-4", "address", "show", WATCH_IF, check=False).stdout
                    if (
                        len(dump) == 2
                        and dump[1].split("\t")[3] == "10.77.0.2/32"
                        and "inet 10.77.0.1/24" in address
                    ):
                        break
                assert time.monotonic() < deadline, "the interface did not come back"
                await asyncio.sleep(0.2)
            for _ in range(50):  # the log line follows the rebuild in the same task
                if f"WireGuard {WATCH_IF} recovered with 1 peer(s)" in caplog.text:
                    break
                await asyncio.sleep(0.1)
            gone = [r for r in caplog.records if "disappeared: bringing it up again" in r.message]
            assert gone and gone[0].levelno == logging.WARNING
            assert f"WireGuard {WATCH_IF} recovered with 1 peer(s)" in caplog.text
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await mesh.close()
        assert _ns("ip", "link", "show", WATCH_IF, check=False).returncode != 0
