"""node/mesh.py without tor: the peers file, secret files, start-up errors and add_peer into a
real Coordinator (its UDP socket on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import ClusterKey
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.config import Config, parse_config
from rustbalance.node.join import PeerInfo
from rustbalance.node.mesh import (
    Mesh,
    MeshError,
    load_mesh_peers,
    mesh_peers_json,
    mesh_wants_cluster,
    read_mesh_peers,
    read_private_secret,
)

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
