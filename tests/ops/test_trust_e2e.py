"""Cluster trust end to end on the private Tor network (issue 16).

Three admitted nodes with the default coordination timings (5/15/15 s): node-a and node-b hold
the master key (each admits itself) and answer joins, node-c is an instance without the master
key, admitted beforehand as ``rustbalance join`` leaves a node (its own node key, and its
admission record signed with the master key in its members file). Then, in file order:

- the three serve the master address, and every node lists the same three members;
- an attacker process holding the cluster token and join secret of the protocol v2 cluster this
  one was, an *expired* join token, a real node's (public) record and keys of its own, throws
  everything it has at every node's coordination port and at the master onion's join path: no
  node's state changes (members, roles, term, publisher, live peers), it gets a 404 without any
  endpoint for every join, and the master address keeps answering throughout;
- ``rustbalance cluster revoke node-c`` on node-a: node-c's intro points leave the descriptor
  the HSDirs serve within the heartbeat timeout, node-c learns it was revoked, and nobody
  lists it any more.

The WireGuard half (a third node joining a two-node cluster, all three tunnels carrying
coordination, wireguard-go in network namespaces) is tests/ops/test_trust_mesh_netns.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.crypto.keys import load_identity_key
from rustbalance.deploy.join_token import Argon2Params, JoinPayload, encode_with_passphrase
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.network import FetchError, fetch_descriptor, read_network_view
from tests.node_e2e.cluster_helpers import RunningCluster, running_cluster, wait_for
from tests.torhelpers import get_with_retries
from tests.trust import admit_keyless_node

pytestmark = pytest.mark.tor

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT = 15.0  # the default coordination.heartbeat_timeout_secs
PASSPHRASE = "an expired token's passphrase"


def _admit_node_c(work: Path, listen_port: int) -> dict[str, dict[str, object]]:
    """node-c as `rustbalance join` leaves a node without the master key: an instance with its
    node key and its master-signed record in its members file."""
    key_path = work / "node-c" / "node.key"
    admit_keyless_node(
        load_identity_key(work / "master.key"),
        "node-c",
        key_path=key_path,
        state_dir=work / "node-c" / "state",
        coordination=f"127.0.0.1:{listen_port}",
        priority=30,
    )
    return {
        "node": {
            "identity_mode": "instance",
            "publisher_eligible": False,
            "node_key_path": str(key_path),
        },
        "master": {"identity_key_path": None},  # no master key on this node
    }


def _answering_joins(work: Path, index: int) -> dict[str, dict[str, object]]:
    """node-a and node-b hold the master key and answer joins (as `rustbalance init` sets a
    node up; the tunnel itself is not managed here: coordination stays on 127.0.0.1)."""
    name = ("node-a", "node-b")[index]
    key = work / name / "wireguard.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(generate_private_key() + "\n")
    return {
        "wireguard": {
            "private_key_path": str(key),
            "address": f"10.99.0.{index + 1}/24",
            "endpoint": f"192.0.2.{index + 1}:51820",
        },
        "join": {"enabled": True},
    }


@pytest.fixture(scope="module")
def cluster(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCluster]:
    work = tmp_path_factory.mktemp("trust")

    def sections(index: int, listen_port: int) -> Mapping[str, Mapping[str, object]]:
        if index == 2:
            return _admit_node_c(work / "cluster", listen_port)
        return _answering_joins(work / "cluster", index)

    with running_cluster(tor_network, work / "cluster", sections=sections) as running:
        running.wait_formed()
        yield running


@pytest.fixture(scope="module")
def visitor(tor_network: PrivateTorNetwork) -> Iterator[TorInstance]:
    client = tor_network.add_client(f"trustvisitor{os.getpid() % 100000}")
    try:
        yield client
    finally:
        tor_network.remove(client)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def _members(doc: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    return sorted(
        (m["node_id"], m["fingerprint"], m["holds_master_key"]) for m in doc["cluster"]["members"]
    )


def _snapshot(cluster: RunningCluster) -> dict[str, object]:
    """Everything an attacker would like to change, per node."""
    out: dict[str, object] = {}
    for name, doc in cluster.statuses().items():
        assert doc is not None, name
        out[name] = (
            doc["role"],
            doc["cluster"]["term"],
            doc["cluster"]["publisher"],
            _members(doc),
            sorted(p["node_id"] for p in doc["peers"] if p["alive"]),
        )
    return out


def _rejected(cluster: RunningCluster) -> dict[str, int]:
    return {
        name: sum(doc["cluster"]["rejected"].values())
        for name, doc in cluster.statuses().items()
        if doc is not None
    }


async def _fetch_auth_keys(client: TorInstance, address: str) -> set[str] | None:
    conn = await ControlConnection.connect(client.control_address)
    try:
        view = await read_network_view(conn)
        decoded = await fetch_descriptor(conn, address, view, timeout=20)
    except FetchError:
        return None
    finally:
        await conn.close()
    return {p.auth_key.hex() for p in decoded.intro_points}


async def test_three_admitted_nodes_serve_the_master_address(
    cluster: RunningCluster, visitor: TorInstance
) -> None:
    docs = cluster.statuses()
    expected = _members(docs["node-a"])  # type: ignore[arg-type]
    assert [(n, k) for n, _, k in expected] == [
        ("node-a", True),
        ("node-b", True),
        ("node-c", False),
    ]
    for doc in docs.values():
        assert doc is not None and _members(doc) == expected
        assert doc["cluster"]["revoked"] is False
    assert docs["node-c"]["instance_onion_address"]  # type: ignore[index]
    assert not (cluster.node("node-c").work_dir / "master.key").exists()
    socks = visitor.socks_address
    assert socks is not None
    body = await get_with_retries(socks, cluster.address, isolation="trust-first")
    assert body.startswith("hello from node-")
    # `rustbalance cluster members` on node-a: from the running daemon, with fingerprints.
    config = str(cluster.node("node-a").work_dir / "config.toml")
    listed = await asyncio.to_thread(
        _cli, "cluster", "members", "--config", config, "--format", "json"
    )
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    rows = {row["node_id"]: row for row in json.loads(out)["members"]}
    assert json.loads(out)["source"] == "the running daemon"
    assert rows["node-c"]["holds_master_key"] is False and rows["node-c"]["live"] is True
    assert rows["node-a"]["role"] == "publisher"


async def test_an_attacker_with_the_old_token_or_an_expired_join_token_changes_nothing(
    cluster: RunningCluster, visitor: TorInstance, tmp_path: Path
) -> None:
    master = load_identity_key(cluster.node("node-a").work_dir.parent / "master.key")
    issued = int(time.time()) - 7200
    expired = JoinPayload.issue(
        master_key=master, issuer_node_id="node-a", now=issued, randbytes=secrets.token_bytes,
        lifetime_secs=3600, max_uses=10,
    )  # fmt: skip
    token = encode_with_passphrase(expired, PASSPHRASE, secrets.token_bytes, Argon2Params(64, 1, 1))
    members = Membership(master.public_key)
    members.load_json((cluster.node("node-c").work_dir / "state" / MEMBERS_FILE_NAME).read_text(),
                      int(time.time() * 1000))  # fmt: skip
    real_record = members.statement_of("node-c")
    assert real_record is not None
    socks = visitor.socks_address
    assert socks is not None
    settings = {
        "ports": [n.listen_port for n in cluster.nodes],
        "node_ids": [n.name for n in cluster.nodes],
        "socks": list(socks),
        "master_onion": cluster.address,
        "old_token": secrets.token_urlsafe(32),
        "old_join_secret": secrets.token_urlsafe(32),
        "expired_token": token,
        "expired_token_issued_at": issued,
        "passphrase": PASSPHRASE,
        "real_record": base64.b64encode(real_record.data).decode(),
        "rounds": 1,
        # Each try reaches a random node (tor picks an intro point); node-c admits nobody, so
        # six tries miss both key holders with probability (1/3)^6 < 0.2 %.
        "join_rounds": 6,
    }
    (tmp_path / "attacker.json").write_text(json.dumps(settings))
    before = _snapshot(cluster)
    rejected_before = _rejected(cluster)

    with (tmp_path / "attacker.log").open("wb") as log:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.ops.trust_attacker", str(tmp_path / "attacker.json"),
            str(tmp_path / "result.json"),
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    answered: list[str] = []
    try:
        # The master keeps answering while the attack runs.
        deadline = time.monotonic() + 300
        while attacker.returncode is None and time.monotonic() < deadline:
            tag = f"during-{len(answered)}"
            answered.append(await get_with_retries(socks, cluster.address, isolation=tag))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attacker.wait(), 2)
    finally:
        if attacker.returncode is None:
            attacker.kill()
        await asyncio.wait_for(attacker.wait(), 30)
    assert attacker.returncode == 0, (tmp_path / "attacker.log").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"\nattacker: {result['datagrams_sent']} datagrams, joins {result['joins']}")

    # No join got anything but the same 404, and no endpoint or address of any node.
    joins = result["joins"]
    assert {j["status"] for j in joins} <= {404, 0}, joins
    assert any(j["status"] == 404 and j["what"] == "expired grant" for j in joins), joins
    assert any(j["status"] == 404 and "v2" in j["what"] for j in joins), joins
    # A node holding the master key received the expired grant and refused it for that reason
    # (the responder enforces the expiry; the 404 alone cannot tell which node answered).
    logs = [cluster.node(n).process.log_text() for n in ("node-a", "node-b")]
    assert any("Refused a join with an expired grant" in text for text in logs)
    for join in joins:
        for leak in ("wg_endpoint", "tunnel", "127.0.0.1", "statements", "record"):
            assert leak not in join["body"], join
    # No node's state changed; they counted what they refused.
    wait_for(
        lambda: all(_rejected(cluster)[n] >= rejected_before[n] + 10 for n in rejected_before),
        30,
        "every node to count the attacker's datagrams",
    )
    assert _snapshot(cluster) == before
    for doc in cluster.statuses().values():
        assert doc is not None
        rejected = doc["cluster"]["rejected"]
        assert (
            rejected["unknown_version"] > 0 and rejected["forged"] + rejected["unknown_sender"] > 0
        )
    assert answered and all(a.startswith("hello from node-") for a in answered)
    assert result["master_get"] == 200


async def test_a_revoked_nodes_intro_points_leave_the_descriptor_within_the_heartbeat_timeout(
    cluster: RunningCluster, visitor: TorInstance
) -> None:
    node_c = cluster.node("node-c")
    # Start from a published descriptor holding node-c's current intro points (bounded).
    revoked_keys: set[str] = set()
    fetched: set[str] | None = None
    for _ in range(30):
        revoked_keys = set(node_c.status()["intro_points"]["own_auth_keys"])
        fetched = await _fetch_auth_keys(visitor, cluster.address)
        if revoked_keys and fetched is not None and fetched & revoked_keys:
            break
        await asyncio.sleep(2)
    assert fetched is not None and fetched & revoked_keys
    kept_keys = set(cluster.node("node-b").status()["intro_points"]["own_auth_keys"])

    started = time.monotonic()
    config = str(cluster.node("node-a").work_dir / "config.toml")
    revoke = await asyncio.to_thread(_cli, "cluster", "revoke", "node-c", "--config", config)
    assert revoke.returncode == 0, revoke.stderr
    assert "node-c is out" in revoke.stdout
    removed_after: float | None = None
    last: set[str] | None = None
    while time.monotonic() - started < 4 * HEARTBEAT_TIMEOUT:  # bounded: each fetch <= 20 s
        last = await _fetch_auth_keys(visitor, cluster.address)
        if last is not None and not last & revoked_keys and last & kept_keys:
            removed_after = time.monotonic() - started
            break
        await asyncio.sleep(0.5)
    assert removed_after is not None, f"revoked node's intro points still published: {last}"
    print(f"\nrevocation: node-c's intro points gone from the HSDirs {removed_after:.1f} s after")
    assert removed_after <= HEARTBEAT_TIMEOUT
    # Everyone agrees, and node-c was told (it stops publishing and coordinating).
    for name in ("node-a", "node-b"):
        doc = cluster.node(name).status()
        assert [m for m, _, _ in _members(doc)] == ["node-a", "node-b"]
        assert "node-c" not in doc["cluster"]["peer_intro_points"]
    await asyncio.to_thread(
        wait_for, lambda: node_c.status()["cluster"]["revoked"] is True, 30, "node-c to learn it"
    )
    assert node_c.status()["role"] == "standby"
