"""node/mesh.py without tor: the peers file, secret files, start-up errors and add_peer into a
real Coordinator (its UDP socket on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import ClusterKey
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.config import Config, parse_config
from rustbalance.node.join import JoinRequest, PeerInfo, parse_join_answer
from rustbalance.node.mesh import (
    Mesh,
    MeshError,
    load_mesh_peers,
    mesh_peers_json,
    mesh_wants_cluster,
    read_mesh_peers,
    read_private_secret,
)
from rustbalance.proxy import ProxySettings, ReverseProxy, Target

KEY = base64.b64encode(b"\x05" * 32).decode()
PEER = PeerInfo("node-b", "127.0.0.9:51821", KEY, "203.0.113.9:51820", "127.0.0.9")
SECRET = "s" * 43
TOKEN = "t" * 43


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.8", 0))
        return int(sock.getsockname()[1])


def _private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _config(tmp_path: Path, *, join: bool = True) -> Config:
    _private(tmp_path / "join.secret", SECRET + "\n")
    _private(tmp_path / "cluster.token", TOKEN + "\n")
    _private(tmp_path / "wg.key", generate_private_key() + "\n")
    doc = {
        "node": {"id": "node-a", "state_dir": str(tmp_path / "state")},
        "master": {"identity_key_path": "master.key"},
        "target": {"address": "127.0.0.1:1"},
        "coordination": {
            "cluster_token_path": "cluster.token",
            "listen": f"127.0.0.8:{_free_udp_port()}",
        },
        "wireguard": {
            "private_key_path": "wg.key",
            "address": "127.0.0.8/24",
            "endpoint": "203.0.113.8:51820",
        },
        "join": {"enabled": join, "secret_path": "join.secret"},
    }
    return parse_config(tomli_w.dumps(doc), tmp_path)


def test_peers_file_round_trip_and_strictness() -> None:
    text = mesh_peers_json([PEER])
    assert load_mesh_peers(text) == (PEER,)
    doc = json.loads(text)
    for broken, message in [
        ("[]", "exactly 'version' and 'peers'"),
        ("{", "not valid JSON"),
        (json.dumps({**doc, "version": 2}), "unsupported version 2"),
        (json.dumps({**doc, "peers": [doc["peers"][0]] * 2}), "listed twice"),
        (json.dumps({**doc, "peers": [{**doc["peers"][0], "tunnel_address": "x"}]}), "peers[0]"),
        (json.dumps({**doc, "peers": [{**doc["peers"][0], "extra": "1"}]}), "peers[0]"),
    ]:
        with pytest.raises(MeshError, match=message.replace("[", r"\[")):
            load_mesh_peers(broken)


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    path = _private(tmp_path / "secret", SECRET + "\n", 0o644)
    with pytest.raises(MeshError, match="mode 0644 lets others read it") as info:
        read_private_secret(path, "join secret")
    assert SECRET not in str(info.value)
    path.chmod(0o600)
    assert read_private_secret(path, "join secret") == SECRET
    os.symlink(path, tmp_path / "link")
    with pytest.raises(MeshError, match="cannot read"):
        read_private_secret(tmp_path / "link", "join secret")


async def test_start_builds_the_responder_and_add_peer_persists_into_the_coordinator(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    assert mesh_wants_cluster(config)
    coordinator: Coordinator[bytes] = Coordinator.from_config(
        config, ClusterKey(TOKEN.encode()), encode_intro_point=bytes, decode_intro_point=bytes
    )
    mesh = Mesh(config)
    await mesh.start(coordinator)
    assert mesh.responder is not None and mesh.interface is None  # wireguard.enabled = false
    assert mesh.responder.self_info.tunnel_address == "127.0.0.8"
    assert mesh.interceptor() is not None
    await mesh.add_peer(PEER)
    assert mesh.status() == {
        "joins_enabled": True,
        "joins_admitted": 0,  # added directly here, not through the responder
        "tunnel_address": "127.0.0.8",
        "wireguard": None,
        "peers": ["node-b"],
    }
    assert read_mesh_peers(config.wireguard.peers_path or Path()) == (PEER,)
    assert {p.node_id: p.address for p in coordinator.peers.known_peers()} == {
        "node-b": "127.0.0.9:51821"
    }
    # The coordinator saves it with its learned peers on its first tick.
    task = asyncio.create_task(coordinator.run())
    try:
        for _ in range(50):
            if (config.node.state_dir / "cluster_peers.json").exists():
                break
            await asyncio.sleep(0.1)
        saved = json.loads((config.node.state_dir / "cluster_peers.json").read_text())
        assert saved["peers"] == [{"node_id": "node-b", "address": "127.0.0.9:51821"}]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # A restarted mesh reads it back and hands it to the (new) coordinator.
    again = Mesh(config)
    second: Coordinator[bytes] = Coordinator.from_config(
        config, ClusterKey(TOKEN.encode()), encode_intro_point=bytes, decode_intro_point=bytes
    )
    await again.start(second)
    assert again.peers == (PEER,)
    assert [p.node_id for p in second.peers.known_peers()] == ["node-b"]


async def test_start_errors_are_config_problems(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (tmp_path / "join.secret").chmod(0o640)
    with pytest.raises(MeshError, match=r"join secret .* lets others read it") as info:
        await Mesh(config).start(None)
    assert info.value.config_problem
    (tmp_path / "join.secret").chmod(0o600)
    _private(tmp_path / "join.secret", "short\n")
    with pytest.raises(MeshError, match="join_secret must be at least 32 characters"):
        await Mesh(config).start(None)
    _private(tmp_path / "join.secret", SECRET)
    state = tmp_path / "state"
    state.mkdir()
    _private(state / "wireguard_peers.json", "{not json")
    with pytest.raises(
        MeshError, match=r"wireguard_peers\.json: mesh peers file is not valid JSON"
    ):
        await Mesh(config).start(None)
    # Without [join], a broken peers file does not make the node a cluster member by itself
    # (the daemon then reports the file when it starts the mesh).
    assert not mesh_wants_cluster(_config(tmp_path, join=False))
    _private(state / "wireguard_peers.json", mesh_peers_json([PEER]))
    assert mesh_wants_cluster(_config(tmp_path, join=False))


async def test_concurrent_joins_through_the_proxy_are_admitted_once_each(tmp_path: Path) -> None:
    """Nine joiners race each other over real connections into a real proxy: the mesh's
    interceptor, its add_peer (peers file written in a thread, the coordinator) and the
    responder's rate limit all see interleaved requests. One joiner asks twice at once.

    Expected: exactly 5 admissions (the default rate limit), each with its own tunnel
    address; the rest a 404 that looks like any other wrong path; the joiner that asked
    twice gets the same address both times if both were answered 200; the peers file, the
    mesh's peers and the coordinator hold exactly the admitted nodes, nothing half-added."""
    config = _config(tmp_path)
    coordinator: Coordinator[bytes] = Coordinator.from_config(
        config, ClusterKey(TOKEN.encode()), encode_intro_point=bytes, decode_intro_point=bytes
    )
    mesh = Mesh(config)
    await mesh.start(coordinator)
    interceptor = mesh.interceptor()
    assert interceptor is not None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = int(closed.getsockname()[1])
    settings = ProxySettings(
        target=Target("127.0.0.1", dead_port, is_onion=False), listen_port=0, drain_timeout=1
    )

    def join_body(n: int) -> bytes:
        key = base64.b64encode(bytes([0x40 + n]) * 32).decode()
        request = JoinRequest(f"joiner-{n}", TOKEN, key, "198.51.100.7:51820", 51821, 0)
        return dataclasses.replace(request, request_time=int(time.time())).to_json()

    async def post(port: int, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"POST /.rb/{SECRET} HTTP/1.1\r\nHost: x.onion\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, answer = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), answer

    bodies = [join_body(n) for n in range(8)] + [join_body(3)]  # joiner-3 asks twice
    proxy = ReverseProxy(settings, interceptor=interceptor)
    await proxy.start()
    try:
        results = await asyncio.gather(*(post(proxy.port, body) for body in bodies))
    finally:
        await proxy.close(1)
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 404}, statuses
    answered: dict[str, set[str]] = {}
    for (status, answer), body in zip(results, bodies, strict=True):
        if status == 200:
            node = json.loads(body)["node_id"]
            answered.setdefault(node, set()).add(parse_join_answer(answer).tunnel_address)
    assert len(answered) == 5, statuses  # the rate limit, whatever the interleaving
    assert all(len(addresses) == 1 for addresses in answered.values()), answered
    addresses = [next(iter(a)) for a in answered.values()]
    assert len(set(addresses)) == 5 and "127.0.0.8" not in addresses
    assert {peer.node_id for peer in mesh.peers} == set(answered)
    saved = read_mesh_peers(config.wireguard.peers_path or Path())
    assert {peer.node_id: peer.tunnel_address for peer in saved} == {
        node: next(iter(a)) for node, a in answered.items()
    }
    assert {p.node_id for p in coordinator.peers.known_peers()} == set(answered)
    assert mesh.status()["joins_admitted"] == 5
