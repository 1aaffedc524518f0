"""init -> run -> join over the master onion -> run: a 2-node cluster on the private Tor network.

Everything is the operator's path, as subprocesses: ``rustbalance init`` writes node A's keys and
config (secrets from files, never argv), ``rustbalance run`` starts A (managed tor joined to the
session's private network through ``tor.extra_torrc``), ``rustbalance join`` on B decrypts the
join token and POSTs the join through a tor client's SOCKS port to the master onion, where A's
proxy answers it; ``rustbalance run`` on B then forms the cluster with A.

Coordination runs over loopback: the tunnel network is a /24 inside 127.0.0.0/8 (every address
of it is local on Linux), so the tunnel addresses the responder assigns are reachable without
WireGuard (``--no-wireguard``; tests/ops/test_mesh_wireguard_netns.py brings the interface up
from the config in a network namespace). Through the master onion the test also checks the
refusals (wrong path, wrong grant secret, no grant -> 404; a malformed field with a valid grant
-> 400; the 6th admission in 5 minutes -> 404) and that a repeated join is answered as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from python_socks.async_.asyncio import Proxy

from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.identity import NodeKey, load_node_key
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wireguard import public_key_of
from rustbalance.config import load_config
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.deploy.join_token import JoinPayload, decode
from rustbalance.node.join import JOIN_PATH, JoinRequest, parse_join_answer
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.apps import NamedHTTPServer, http_get_via_tor
from rustbalance.testnet.node import NodeProcess
from rustbalance.tor.process import pick_free_ports, pid_is_alive

pytestmark = pytest.mark.tor

PASSPHRASE = "a long enough join token passphrase"
# Managed tor bootstrap + first publish (see tests/node_e2e): generous for a busy machine.
READY_TIMEOUT = 240.0
# The first request through the onion may wait for the descriptor and a rendezvous circuit.
FIRST_REQUEST_ATTEMPTS = 12
FIRST_REQUEST_TIMEOUT = 60.0
# Shorter than the defaults so the cluster forms (and a lone node settles) within seconds.
COORDINATION = {
    "heartbeat_interval_secs": 2,
    "heartbeat_timeout_secs": 6,
    "takeover_grace_secs": 4,
}


def _cli(
    *args: str, stdin: str | None = None, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def _tunnel_network() -> str:
    # A /24 of loopback nobody else on the machine is likely to use (per test process).
    pid = os.getpid()
    return f"127.{100 + pid % 100}.{(pid // 100) % 250 + 1}.0/24"


def _adjust(config_path: Path, network: PrivateTorNetwork, metrics_port: int) -> None:
    """What an operator of this private network changes after init/join: tor joins the test
    network (its DirAuthority lines), metrics on a free port, faster heartbeats."""
    doc: dict[str, Any] = tomllib.loads(config_path.read_text())
    doc["tor"]["extra_torrc"] = list(network.client_torrc_lines())
    doc["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    doc["coordination"].update(COORDINATION)
    doc.setdefault("publish", {})["upload_timeout_secs"] = 15
    config_path.write_text(tomli_w.dumps(doc))


@contextlib.contextmanager
def _node(config: Path, log: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(config, log)
    process.start()
    try:
        yield process
    finally:
        tor_pids = [int(p) for p in re.findall(r"started tor pid (\d+)", process.log_text())]
        process.stop()
        for pid in tor_pids:
            # The managed tor exits with the daemon; make sure, by PID.
            if pid_is_alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == "tor":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _wait(predicate: Callable[[], bool], limit: float, what: str, logs: list[NodeProcess]) -> float:
    began = time.monotonic()
    while not predicate():
        for node in logs:
            if node.poll() is not None:
                tail = "\n".join(node.log_text().splitlines()[-30:])
                raise AssertionError(f"a node exited while waiting for {what}:\n{tail}")
        if time.monotonic() - began > limit:
            tails = "\n---\n".join("\n".join(n.log_text().splitlines()[-20:]) for n in logs)
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}:\n{tails}")
        time.sleep(1.0)
    return time.monotonic() - began


def _status(node: NodeProcess) -> dict[str, Any] | None:
    try:
        return node.status()
    except Exception:
        return None


async def _post(
    socks: tuple[str, int], host: str, path: str, body: bytes, *, isolation: str
) -> tuple[int, bytes]:
    """One HTTP POST through tor (fresh circuit per ``isolation``); (status, body)."""
    proxy = Proxy.from_url(f"socks5://{isolation}:x@{socks[0]}:{socks[1]}", rdns=True)
    async with asyncio.timeout(FIRST_REQUEST_TIMEOUT):
        sock = await proxy.connect(host, 80, timeout=FIRST_REQUEST_TIMEOUT)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            raw = b""
            while chunk := await reader.read(1 << 16):
                raw += chunk
        finally:
            writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split(b" ")[1]), payload


def _post_retrying(socks: tuple[str, int], host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """The first request: the onion may not be reachable for the client yet (bounded)."""
    last: Exception | None = None
    for attempt in range(FIRST_REQUEST_ATTEMPTS):
        try:
            return asyncio.run(_post(socks, host, path, body, isolation=f"first{attempt}"))
        except Exception as exc:  # python-socks raises its own types
            last = exc
            time.sleep(5)
    raise AssertionError(f"the master onion never answered: {last!r}")


def _request(
    node_id: str,
    payload: JoinPayload,
    *,
    key: NodeKey | None = None,
    wg_key: bytes | None = None,
    secret: bytes | None = None,
    endpoint: str = "127.0.0.1:51820",
) -> tuple[JoinRequest, bytes]:
    """A join request with the token's grant, signed with ``key`` (a new one by default)."""
    key = key or NodeKey.generate()
    request = JoinRequest(
        node_id=node_id,
        node_key=key.public,
        wg_public_key=wg_key or secrets.token_bytes(32),
        wg_endpoint=endpoint,
        coordination_port=51821,
        priority=20,
        request_time=int(time.time()),
        grant=payload.grant,
        grant_secret=secret or payload.grant_secret,
    )
    return request, request.to_json(key)


def _members(path: Path, master_public: bytes) -> list[str]:
    membership = Membership(master_public)
    membership.load_json(path.read_text(), int(time.time() * 1000))
    return [r.node_id for r in membership.members()]


def _metric(text: str, name: str) -> float:
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return sum(float(v) for v in found)


def _curl(port: int) -> str:
    result = subprocess.run(
        ["curl", "-sf", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_init_run_join_forms_a_two_node_cluster(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    network = _tunnel_network()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    passfile = _private_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    target_a, target_b = NamedHTTPServer("node-a-target"), NamedHTTPServer("node-b-target")
    proxy_a, proxy_b, metrics_a, metrics_b = pick_free_ports(4)
    try:
        # --- init node A ------------------------------------------------------------------
        init = _cli(
            "init", "--config-dir", str(a_dir / "conf"), "--state-dir", str(a_dir / "state"),
            "--node-id", "node-a", "--endpoint", "127.0.0.1:51820",
            "--target", f"127.0.0.1:{target_a.port}", "--tor-mode", "managed",
            "--proxy-port", str(proxy_a), "--tunnel-network", network, "--no-wireguard",
            "--token-uses", "6", "--passphrase-file", str(passfile), "--non-interactive",
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        master = re.search(r"Master onion address: (\S+)", init.stdout)
        assert master is not None
        address = master.group(1)
        master_public = decode_onion_address(address)
        token_file = a_dir / "conf" / "join-token.txt"
        payload = decode(token_file.read_text().strip(), PASSPHRASE, now=int(time.time()))
        secret = payload.grant_secret.hex()
        assert payload.master_key_seed is None  # by default a joiner gets no master key
        assert secret not in init.stdout + init.stderr
        config_a = a_dir / "conf" / "config.toml"
        _adjust(config_a, tor_network, metrics_a)

        client = tor_client_factory()
        assert client.socks_address is not None
        socks = client.socks_address

        with _node(config_a, a_dir / "node.log") as node_a:

            def a_ready() -> bool:
                doc = _status(node_a)
                return bool(doc and doc["ready"] and doc["role"] == "publisher")

            took = _wait(a_ready, READY_TIMEOUT, "node A to publish", [node_a])
            print(f"node A published {took:.1f} s after start")
            assert "Answering joins over the master onion" in node_a.log_text()

            # --- refusals through the master onion ---------------------------------------
            status, body = _post_retrying(
                socks, address, "/.rb/wrong", _request("prober", payload)[1]
            )
            assert (status, body) == (404, b'{"error":"not found"}')
            wrong_secret = asyncio.run(
                _post(socks, address, JOIN_PATH,
                      _request("prober", payload, secret=b"\x01" * 32)[1], isolation="t")
            )  # fmt: skip
            assert wrong_secret == (404, b'{"error":"not found"}')
            bad_body = asyncio.run(
                _post(socks, address, JOIN_PATH, b'{"v": 2, "node_id":', isolation="b")
            )
            assert bad_body == (404, b'{"error":"not found"}')  # no valid grant: no details
            malformed = json.loads(_request("p", payload)[1])
            malformed["coordination_port"] = 0
            bad_port = asyncio.run(
                _post(socks, address, JOIN_PATH, json.dumps(malformed).encode(), isolation="p")
            )
            assert bad_port[0] == 400 and b"coordination_port" in bad_port[1]
            # The target never saw any of them.
            assert target_a.hits == 0

            # --- join node B over the onion ------------------------------------------------
            began = time.monotonic()
            join = _cli(
                "join", "--config-dir", str(b_dir / "conf"), "--state-dir", str(b_dir / "state"),
                "--node-id", "node-b", "--endpoint", "127.0.0.1:51830",
                "--target", f"127.0.0.1:{target_b.port}", "--tor-mode", "managed",
                "--proxy-port", str(proxy_b), "--no-wireguard",
                "--tor-socks", f"{socks[0]}:{socks[1]}",
                "--token-file", "-", "--passphrase-file", str(passfile), "--non-interactive",
                stdin=token_file.read_text(),
            )  # fmt: skip
            join_secs = time.monotonic() - began
            assert join.returncode == 0, join.stderr
            print(f"rustbalance join took {join_secs:.1f} s")
            assert secret not in join.stdout + join.stderr
            tunnel = re.search(r"tunnel address (\S+), 1 other members", join.stdout)
            assert tunnel is not None, join.stdout
            assert "instance (no master key, never publishes)" in join.stdout
            config_b = b_dir / "conf" / "config.toml"
            text_b = config_b.read_text()
            assert secret not in text_b
            loaded_b = load_config(config_b)
            assert str(loaded_b.coordination.listen) == f"{tunnel.group(1)}:51821"
            a_listen = f"{network.rsplit('.', 1)[0]}.1:51821"
            assert [str(p) for p in loaded_b.coordination.peers] == [a_listen]
            assert not loaded_b.join.enabled and not loaded_b.wireguard.enabled
            assert loaded_b.node.identity_mode == "instance"
            assert loaded_b.master.identity_key_path is None
            assert not (b_dir / "conf" / "master.key").exists()
            assert _members(b_dir / "state" / MEMBERS_FILE_NAME, master_public) == [
                "node-a",
                "node-b",
            ]
            assert _members(a_dir / "state" / MEMBERS_FILE_NAME, master_public) == [
                "node-a",
                "node-b",
            ]

            # A repeat by B (same keys) is answered as before, and does not count.
            b_key = load_node_key(b_dir / "conf" / "node.key")
            b_wg = public_key_of((b_dir / "conf" / "wireguard.key").read_text().strip())
            repeat_request, repeat_body = _request(
                "node-b", payload, key=b_key, wg_key=base64.b64decode(b_wg),
                endpoint="127.0.0.1:51830",
            )  # fmt: skip
            repeat = asyncio.run(_post(socks, address, JOIN_PATH, repeat_body, isolation="repeat"))
            assert repeat[0] == 200
            answer = parse_join_answer(repeat[1], master_public, repeat_request,
                                       int(time.time() * 1000))  # fmt: skip
            assert answer.tunnel_address == tunnel.group(1)

            # --- a flood: 4 more admissions, then the rate limit's silent 404 -----------
            statuses = [
                asyncio.run(
                    _post(socks, address, JOIN_PATH, _request(f"flood-{i}", payload)[1],
                          isolation=f"flood{i}")
                )[0]
                for i in range(6)
            ]  # fmt: skip
            assert statuses == [200, 200, 200, 200, 404, 404], statuses
            assert len(_members(a_dir / "state" / MEMBERS_FILE_NAME, master_public)) == 6

            # --- run node B: the two form a cluster ---------------------------------------
            _adjust(config_b, tor_network, metrics_b)
            with _node(config_b, b_dir / "node.log") as node_b:

                def formed() -> bool:
                    docs = [_status(node_a), _status(node_b)]
                    if any(d is None for d in docs):
                        return False
                    a_doc, b_doc = docs
                    assert a_doc is not None and b_doc is not None
                    a_peers = {p["node_id"]: p["alive"] for p in a_doc["peers"]}
                    b_peers = {p["node_id"]: p["alive"] for p in b_doc["peers"]}
                    roles = sorted([a_doc["role"], b_doc["role"]])
                    return (
                        a_doc["mode"] == b_doc["mode"] == "multi"
                        and a_peers.get("node-b") is True
                        and b_peers.get("node-a") is True
                        and roles == ["publisher", "standby"]
                        and bool(b_doc["intro_points"]["own_auth_keys"])
                    )

                took = _wait(formed, READY_TIMEOUT, "the 2-node cluster", [node_a, node_b])
                print(f"cluster formed {took:.1f} s after node B started")
                a_doc, b_doc = node_a.status(), node_b.status()
                # Both agree on who publishes; the flood's fake joiners never came alive.
                assert a_doc["cluster"]["publisher"] == b_doc["cluster"]["publisher"]
                assert not any(p["alive"] for p in a_doc["peers"] if p["node_id"] != "node-b")
                assert a_doc["mesh"]["joins_admitted"] == 5  # node-b and the 4 admitted floods
                assert a_doc["mesh"]["tunnel_address"] == f"{network.rsplit('.', 1)[0]}.1"
                # node-b learnt the floods' admissions from node-a (the membership spreads).
                b_members = {m["node_id"] for m in b_doc["cluster"]["members"]}
                assert b_members == {"node-a", "node-b", *(f"flood-{i}" for i in range(4))}
                keys = {m["node_id"]: m["holds_master_key"] for m in b_doc["cluster"]["members"]}
                assert keys["node-a"] is True and keys["node-b"] is False
                text = _cli("status", "--config", str(config_b)).stdout
                assert "node-a" in text

                # --- /metrics moves -------------------------------------------------------
                first = [_curl(metrics_a), _curl(metrics_b)]
                for i in range(2):
                    status, _ = asyncio.run(
                        http_get_via_tor(socks, address, isolation=f"get{i}", timeout=60)
                    )
                    assert status == 200
                time.sleep(7)  # > the daemon's metrics refresh (5 s) and 2 heartbeats
                second = [_curl(metrics_a), _curl(metrics_b)]
                sent, total = (
                    "rustbalance_heartbeats_sent_total",
                    "rustbalance_proxy_connections_total",
                )
                for name, before, after in zip("AB", first, second, strict=True):
                    print(
                        f"node {name}: heartbeats sent {_metric(before, sent):.0f} -> "
                        f"{_metric(after, sent):.0f}, proxy connections "
                        f"{_metric(before, total):.0f} -> {_metric(after, total):.0f}"
                    )
                    assert _metric(after, sent) > _metric(before, sent)
                assert sum(_metric(t, total) for t in second) >= 2 + sum(
                    _metric(t, total) for t in first
                )
                assert _metric(second[0], "rustbalance_peers_alive") == 1

        # --- a restart keeps the mesh: A, alone, still knows node-b from its saved peers ----
        with _node(config_a, a_dir / "node-restart.log") as again:

            def knows_b() -> bool:
                doc = _status(again)
                return bool(doc and "node-b" in {p["node_id"] for p in doc["peers"]})

            _wait(knows_b, READY_TIMEOUT, "the restarted node A to list node-b", [again])
            assert re.search(
                r"Answering joins .*\(tunnel network \S+, 6 members\)", again.log_text()
            )
    finally:
        target_a.close()
        target_b.close()


def test_join_token_damaged_is_refused_before_any_network(tmp_path: Path) -> None:
    """A damaged join token is a one-line error and writes nothing (no tor needed: the token
    is checked before the join is attempted)."""
    passfile = _private_file(tmp_path / "passphrase", PASSPHRASE + "\n")
    init = _cli(
        "init", "--config-dir", str(tmp_path / "conf"), "--state-dir", str(tmp_path / "state"),
        "--node-id", "node-a", "--endpoint", "127.0.0.1:51820", "--target", "127.0.0.1:1",
        "--passphrase-file", str(passfile), "--non-interactive",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    token = (tmp_path / "conf" / "join-token.txt").read_text().strip()
    damaged = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    join = _cli(
        "join", "--config-dir", str(tmp_path / "conf2"), "--node-id", "node-b",
        "--endpoint", "127.0.0.1:51830", "--token-file", "-",
        "--passphrase-file", str(passfile), "--non-interactive",
        stdin=damaged,
    )  # fmt: skip
    assert join.returncode == 2  # an input problem (cli/main.py)
    assert join.stderr.count("\n") == 1 and "rustbalance: error:" in join.stderr
    assert not (tmp_path / "conf2").exists()
