"""node/mesh.py without tor: the responder on a key holder, the interceptor on every node,
admissions into a real Coordinator (UDP on 127.0.0.x), WireGuard peers that follow the
membership (finding 8 of issue 16), and concurrent joins through a real proxy."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import time
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cluster.authority import Statement
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME, Coordinator
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.config import Config, parse_config
from rustbalance.crypto.keys import write_seed_key_file
from rustbalance.node.cluster_link import prepare_membership
from rustbalance.node.join import JOIN_PATH, JoinRequest, parse_join_answer
from rustbalance.node.mesh import Mesh, mesh_wants_cluster, wireguard_peers
from rustbalance.proxy import ProxySettings, ReverseProxy, Target
from tests.trust import MASTER, grant, node_key, now_ms, record, revocation, signed, wg_key

SECRET = b"\x05" * 32


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, name: str = "node-a", host: str = "127.0.0.8", *, join: bool = True,
            key: bool = True, peers: list[str] | None = None) -> Config:  # fmt: skip
    """A node's config: coordination on ``host`` (a /24 in 127/8 stands in for the tunnel)."""
    work = tmp_path / name
    work.mkdir(exist_ok=True)
    wg = work / "wg.key"
    if not wg.exists():
        wg.write_text(generate_private_key() + "\n")
        wg.chmod(0o600)
    if key and not (work / "master.key").exists():
        write_seed_key_file(MASTER, work / "master.key")
    doc: dict[str, object] = {
        "node": {"id": name, "state_dir": str(work / "state")}
        | ({} if key else {"identity_mode": "instance", "publisher_eligible": False}),
        "master": {"identity_key_path": "master.key"}
        if key
        else {"onion_address": MASTER.onion_address},
        "target": {"address": "127.0.0.1:1"},
        "coordination": {
            "listen": f"{host}:{_free_udp_port(host)}",
            "peers": peers or [],
            "heartbeat_interval_secs": 0.3,
            "heartbeat_timeout_secs": 1.0,
            "takeover_grace_secs": 0.5,
        },
        "wireguard": {
            "private_key_path": "wg.key",
            "address": f"{host}/24",
            "endpoint": f"203.0.113.{host.rsplit('.', 1)[1]}:51820",
        },
        "join": {"enabled": join},
    }
    return parse_config(tomli_w.dumps(doc), work)


def _coordinator(config: Config, mesh: Mesh) -> Coordinator[bytes]:
    prepared = prepare_membership(
        config, MASTER.public_key, MASTER if mesh.master_key else None, now_ms()
    )
    return Coordinator(
        node_id=config.node.id,
        node_key=prepared.node_key,
        membership=prepared.membership,
        config=config.coordination,
        state_dir=config.node.state_dir,
        encode_intro_point=bytes,
        decode_intro_point=bytes,
        on_members=mesh.members_changed,
    )


def _joiner(name: str, tunnel: str = "127.0.0.20") -> Statement:
    return signed(record(name, eligible=False, tunnel=tunnel, coordination=f"{tunnel}:51821",
                         endpoint="198.51.100.7:51820", grant_id=b"\x07" * 16,
                         grant_expires_at=int(time.time()) + 3600))  # fmt: skip


async def test_a_key_holder_answers_joins_and_admits_into_its_coordinator(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert mesh_wants_cluster(config)
    mesh = Mesh(config, master_key=MASTER)
    coordinator = _coordinator(config, mesh)
    await mesh.start(coordinator)
    assert mesh.responder is not None and mesh.interface is None  # wireguard.enabled = false
    assert mesh.interceptor() is not None
    await mesh.admit(_joiner("node-b"))
    assert coordinator.membership.member("node-b") is not None
    assert mesh.status() == {
        "joins_enabled": True,
        "joins_admitted": 0,  # admitted directly here, not through the responder
        "tunnel_address": "127.0.0.8",
        "wireguard": None,
        "peers": ["node-b"],
    }
    # The coordinator saves it with the membership on its first tick (0600).
    task = asyncio.create_task(coordinator.run())
    try:
        members = config.node.state_dir / MEMBERS_FILE_NAME
        for _ in range(50):
            if members.exists() and "node-b" in _saved(members):
                break
            await asyncio.sleep(0.1)
        assert _saved(members) == {"node-a", "node-b"}
        assert members.stat().st_mode & 0o777 == 0o600
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # A refused admission (a revoked key) raises: the interceptor then answers 500.
    coordinator.membership.apply(revocation("node-c", at_ms=now_ms()), now_ms())
    with pytest.raises(Exception, match="refused"):
        await mesh.admit(signed(record("node-c", issued_at_ms=now_ms() - 10)))


def _saved(path: Path) -> set[str]:
    membership = Membership(MASTER.public_key)
    membership.load_json(path.read_text(), now_ms())
    return {r.node_id for r in membership.members()}


async def test_a_node_without_joins_or_without_the_master_key_admits_nobody(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, join=False)
    mesh = Mesh(config, master_key=MASTER)
    await mesh.start(None)
    assert mesh.responder is None and mesh.interceptor() is not None  # answers /.rb with 404
    with pytest.raises(Exception, match=r"join.enabled: only a node holding the master key"):
        _config(tmp_path, "node-k", key=False, join=True)


def test_wireguard_peers_are_the_members_inside_the_tunnel_network() -> None:
    """Finding 5 of issue 16, on every node: a member whose tunnel address is outside the
    network (a master-key holder's mistake) never becomes an allowed-ips entry."""
    import ipaddress

    members = [
        record("node-a", tunnel="10.99.0.1"),
        record("node-b", tunnel="10.99.0.2", endpoint="192.0.2.2:51820"),
        record("node-c", tunnel="192.168.1.1"),
        record("node-d"),  # no WireGuard identity (a tunnel managed elsewhere)
        record("node-e", tunnel="10.99.0.255"),  # the broadcast address
    ]
    peers = wireguard_peers(members, "node-a", ipaddress.IPv4Network("10.99.0.0/24"))
    assert [(p.tunnel_ip, p.endpoint) for p in peers.values()] == [("10.99.0.2", "192.0.2.2:51820")]


async def test_a_node_admitted_by_one_member_reaches_every_members_wireguard_peers(
    tmp_path: Path,
) -> None:
    """Finding 8 of issue 16: with 3+ nodes, a node admitted by one member was unknown to the
    others' tunnels. Its signed record now spreads with the membership and every mesh adds it.
    (The WireGuard interfaces themselves run in tests/ops/test_trust_e2e.py, in network
    namespaces.)"""
    a_config = _config(tmp_path, "node-a", "127.0.0.8")
    b_config = _config(
        tmp_path, "node-b", "127.0.0.9", join=False, peers=[str(a_config.coordination.listen)]
    )
    meshes, coordinators = [], []
    for config in (a_config, b_config):
        mesh = Mesh(config, master_key=MASTER)
        coordinator = _coordinator(config, mesh)
        await mesh.start(coordinator)
        meshes.append(mesh)
        coordinators.append(coordinator)
    tasks = [asyncio.create_task(c.run()) for c in coordinators]
    try:
        for _ in range(60):
            if all(len(c.live_peers()) == 1 for c in coordinators):
                break
            await asyncio.sleep(0.1)
        assert all(len(c.live_peers()) == 1 for c in coordinators)
        changed = meshes[1]._members_changed
        changed.clear()
        await meshes[0].admit(_joiner("node-c", "127.0.0.30"))  # admitted by node-a only
        c_key = base64.b64encode(wg_key("node-c")).decode()
        for _ in range(40):
            if c_key in meshes[1]._wanted_peers():
                break
            await asyncio.sleep(0.1)
        wanted = meshes[1]._wanted_peers()
        assert {p.tunnel_ip for p in wanted.values()} == {"127.0.0.8", "127.0.0.30"}
        assert changed.is_set()  # the watcher is woken to apply it
        assert "node-c" in meshes[1].status()["peers"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_concurrent_joins_through_the_proxy_are_admitted_once_each(tmp_path: Path) -> None:
    """Nine joiners race each other over real connections into a real proxy: the mesh's
    interceptor, its admit callback (the coordinator's membership) and the responder's rate
    limit all see interleaved requests. One joiner asks twice at once.

    Expected: exactly 5 admissions (the default rate limit), each with its own tunnel
    address; the rest a 404 that looks like any other refusal; the joiner that asked twice
    gets the same address both times if both were answered 200; the membership holds exactly
    the admitted nodes, and the grant's use count says so."""
    config = _config(tmp_path)
    mesh = Mesh(config, master_key=MASTER)
    coordinator = _coordinator(config, mesh)
    await mesh.start(coordinator)
    interceptor = mesh.interceptor()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = int(closed.getsockname()[1])
    settings = ProxySettings(
        target=Target("127.0.0.1", dead_port, is_onion=False), listen_port=0, drain_timeout=1
    )
    many = grant(SECRET, max_uses=20)

    def request(n: int) -> JoinRequest:
        return JoinRequest(
            node_id=f"joiner-{n}",
            node_key=node_key(f"joiner-{n}").public,
            wg_public_key=wg_key(f"joiner-{n}"),
            wg_endpoint="198.51.100.7:51820",
            coordination_port=51821,
            priority=20,
            request_time=int(time.time()),
            grant=many.data,
            grant_secret=SECRET,
        )

    async def post(port: int, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"POST {JOIN_PATH} HTTP/1.1\r\nHost: x.onion\r\nContent-Length: {len(body)}"
                "\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, answer = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), answer

    numbers = [*range(8), 3]  # joiner-3 asks twice
    bodies = [request(n).to_json(node_key(f"joiner-{n}")) for n in numbers]
    proxy = ReverseProxy(settings, interceptor=interceptor)
    await proxy.start()
    try:
        results = await asyncio.gather(*(post(proxy.port, body) for body in bodies))
    finally:
        await proxy.close(1)
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 404}, statuses
    answered: dict[str, set[str]] = {}
    for (status, answer), n in zip(results, numbers, strict=True):
        if status == 200:
            req = dataclasses.replace(request(n), request_time=0)
            parsed = parse_join_answer(answer, MASTER.public_key, req, now_ms())
            answered.setdefault(req.node_id, set()).add(parsed.tunnel_address)
    assert len(answered) == 5, statuses  # the rate limit, whatever the interleaving
    assert all(len(addresses) == 1 for addresses in answered.values()), answered
    addresses = [next(iter(a)) for a in answered.values()]
    assert len(set(addresses)) == 5 and "127.0.0.8" not in addresses
    members = {r.node_id for r in coordinator.membership.members()}
    assert members == {"node-a", *answered}
    assert coordinator.membership.grant_uses(many.content.grant_id) == set(answered)  # type: ignore[union-attr]
    assert mesh.status()["joins_admitted"] == 5
