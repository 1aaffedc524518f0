"""``rustbalance cluster members|revoke|token|rotate-join-secret|upgrade`` in a temporary
folder, and the daemon's side of the inbox (no network, no tor)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cli.main import main
from rustbalance.cluster.authority import JoinPolicy, Revocation, decode_statement
from rustbalance.cluster.coordinator import INBOX_DIR_NAME, MEMBERS_FILE_NAME, Coordinator
from rustbalance.config import load_config
from rustbalance.crypto.keys import write_seed_key_file
from rustbalance.deploy.join_token import decode
from rustbalance.node.cluster_link import prepare_membership
from tests.trust import MASTER, now_ms, record, signed

PASSPHRASE = "correct horse battery staple"


def _node(tmp_path: Path, *, key: bool = True) -> Path:
    """A node's config folder (the master key when ``key``) and its membership file with
    node-a (this node, as the daemon signs itself at start) and node-b."""
    conf = tmp_path / "conf"
    conf.mkdir()
    if key:
        write_seed_key_file(MASTER, conf / "master.key")
    doc: dict[str, object] = {
        "node": {"id": "node-a", "state_dir": str(tmp_path / "state")},
        "master": {"identity_key_path": "master.key", "onion_address": MASTER.onion_address}
        if key
        else {"onion_address": MASTER.onion_address},
        "target": {"address": "127.0.0.1:1"},
        "coordination": {"listen": "127.0.0.1:51821", "peers": ["127.0.0.1:51822"]},
    }
    if not key:
        doc["node"] = {
            **doc["node"],  # type: ignore[dict-item]
            "identity_mode": "instance",
            "publisher_eligible": False,
        }
    (conf / "config.toml").write_text(tomli_w.dumps(doc))
    config = load_config(conf / "config.toml")
    if key:
        prepared = prepare_membership(config, MASTER.public_key, MASTER, now_ms())
        membership = prepared.membership
        membership.apply(signed(record("node-b", tunnel="10.99.0.2")), now_ms())
        (tmp_path / "state").mkdir(exist_ok=True)
        (tmp_path / "state" / MEMBERS_FILE_NAME).write_text(membership.to_json())
    return conf / "config.toml"


def _inbox(tmp_path: Path) -> list[bytes]:
    inbox = tmp_path / "state" / INBOX_DIR_NAME
    return [base64.b64decode(p.read_text()) for p in sorted(inbox.iterdir())]


def test_members_lists_keys_master_key_holders_and_revocations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _node(tmp_path)
    assert main(["cluster", "members", "--config", str(config), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "no daemon answers" in doc["source"]
    rows = {row["node_id"]: row for row in doc["members"]}
    assert set(rows) == {"node-a", "node-b"}
    assert rows["node-a"]["holds_master_key"] and rows["node-a"]["self"]
    assert rows["node-b"]["fingerprint"].startswith("SHA256:")
    assert rows["node-b"]["tunnel_address"] == "10.99.0.2"
    assert main(["cluster", "members", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "Members (2," in text and "holds the master key" in text and "node-b" in text


def test_revoke_signs_a_revocation_for_the_daemon_and_refuses_nonsense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _node(tmp_path)
    args = ["cluster", "revoke", "--config", str(config), "--no-wait"]
    assert main([*args, "node-b"]) == 0
    assert "Revoked node-b (key SHA256:" in capsys.readouterr().out
    [data] = _inbox(tmp_path)
    revocation = decode_statement(data, MASTER.public_key).content
    assert isinstance(revocation, Revocation) and revocation.node_id == "node-b"
    inbox = tmp_path / "state" / INBOX_DIR_NAME
    assert stat.S_IMODE(inbox.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in inbox.iterdir())
    # Input mistakes are exit 2, a state folder that cannot take the statement exit 1
    # (cli/main.py's rule).
    assert main([*args, "node-z"]) == 2
    assert "node-z is not an admitted member" in capsys.readouterr().err
    assert main([*args, "node-a"]) == 2
    assert "does not revoke itself" in capsys.readouterr().err
    for entry in inbox.iterdir():
        entry.unlink()
    inbox.rmdir()
    inbox.write_text("")  # in the way of the inbox folder
    assert main([*args, "node-b"]) == 1
    assert f"cannot write to {inbox}" in capsys.readouterr().err


@pytest.mark.root
def test_root_leaves_statements_that_the_daemons_own_user_can_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """deploy.sh runs the daemon as its own user; an operator runs ``cluster revoke`` as root.
    The inbox and the statement must belong to the daemon's user from their first byte: a
    root-owned file would be deleted unread (the daemon takes every file it finds)."""
    config = _node(tmp_path)
    state = tmp_path / "state"
    daemon_user = (65534, 65534)  # nobody: the owner of the daemon's state folder
    os.chown(state, *daemon_user)
    assert main(["cluster", "revoke", "--config", str(config), "--no-wait", "node-b"]) == 0
    capsys.readouterr()
    inbox = state / INBOX_DIR_NAME
    files = list(inbox.iterdir())
    assert len(files) == 1
    for path in (inbox, *files):
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == daemon_user, path
    assert stat.S_IMODE(files[0].lstat().st_mode) == 0o600


def test_a_node_without_the_master_key_cannot_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _node(tmp_path, key=False)
    for command in (["revoke", "node-b"], ["token", "--raw-token"], ["rotate-join-secret"]):
        assert main(["cluster", command[0], "--config", str(config), *command[1:]]) == 2
        assert "holds no master key" in capsys.readouterr().err


def test_token_issues_a_limited_grant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _node(tmp_path)
    passfile = tmp_path / "pass"
    passfile.write_text(PASSPHRASE)
    args = ["cluster", "token", "--config", str(config), "--passphrase-file", str(passfile)]
    assert main([*args, "--token-uses", "3", "--token-lifetime-hours", "2"]) == 0
    out = capsys.readouterr().out
    token = next(line for line in out.splitlines() if line.startswith("rbj2-"))
    payload = decode(token, PASSPHRASE, now=int(time.time()))
    grant = payload.join_grant
    assert (grant.max_uses, grant.with_master_key) == (3, False)
    assert 7190 <= grant.expires_at - time.time() <= 7200
    assert "3 joins, valid 2 h" in out and payload.master_key_seed is None
    assert main([*args, "--with-master-key"]) == 0
    out = capsys.readouterr().out
    token = next(line for line in out.splitlines() if line.startswith("rbj2-"))
    assert decode(token, PASSPHRASE, now=int(time.time())).master_key_seed == MASTER.seed
    assert "it carries the master key" in out
    assert main([*args, "--token-uses", "0"]) == 2
    assert "--token-uses must be 1-1000" in capsys.readouterr().err


def test_rotate_join_secret_signs_a_join_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _node(tmp_path)
    before = now_ms()
    assert main(["cluster", "rotate-join-secret", "--config", str(config)]) == 0
    assert "void on every node" in capsys.readouterr().out
    [data] = _inbox(tmp_path)
    policy = decode_statement(data, MASTER.public_key).content
    assert isinstance(policy, JoinPolicy) and policy.grants_not_before_ms >= before


async def test_the_daemon_applies_the_inbox_and_deletes_it(tmp_path: Path) -> None:
    """The coordinator's tick takes what the commands left (and nothing unsigned)."""
    config_path = _node(tmp_path)
    assert main(["cluster", "revoke", "--config", str(config_path), "--no-wait", "node-b"]) == 0
    inbox = tmp_path / "state" / INBOX_DIR_NAME
    (inbox / "forged.statement").write_text(base64.b64encode(b"\x02" + bytes(100)).decode())
    (inbox / "garbage.statement").write_text("not base64 at all!")
    config = load_config(config_path)
    prepared = prepare_membership(config, MASTER.public_key, MASTER, now_ms())
    assert prepared.membership.member("node-b") is not None
    coordinator: Coordinator[bytes] = Coordinator(
        node_id="node-a",
        node_key=prepared.node_key,
        membership=prepared.membership,
        config=config.coordination,
        state_dir=config.node.state_dir,
        encode_intro_point=bytes,
        decode_intro_point=bytes,
    )
    await coordinator._tick()
    assert coordinator.membership.member("node-b") is None
    assert [r.node_id for r in coordinator.membership.revocations()] == ["node-b"]
    assert coordinator.counters.statements_refused == 1  # the forged one
    assert list(inbox.iterdir()) == []
    saved = json.loads((tmp_path / "state" / MEMBERS_FILE_NAME).read_text())
    assert len(saved["statements"]) == 2  # node-a's record and the revocation
    await asyncio.sleep(0)


# -- upgrading a protocol v2 config ------------------------------------------------------------

V2_CONFIG = {
    "node": {"id": "node-a", "priority": 10, "publisher_eligible": True, "state_dir": "state"},
    "master": {"identity_key_path": "master.key"},
    "target": {"address": "127.0.0.1:8000"},
    "tor": {"mode": "system"},
    "proxy": {"listen_port": 8080},
    "coordination": {"cluster_token_path": "cluster.token", "listen": "10.99.0.1:51821"},
    "wireguard": {
        "enabled": False,
        "private_key_path": "wireguard.key",
        "address": "10.99.0.1/24",
        "listen_port": 51820,
        "endpoint": "203.0.113.5:51820",
        "peers_path": "state/wireguard_peers.json",
    },
    "join": {"enabled": True, "secret_path": "join.secret", "tunnel_network": "10.99.0.0/24"},
}


def test_upgrade_of_a_key_holder_keeps_the_master_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `rustbalance init` of protocol v2 wrote, upgraded: the v2 keys go, a node key is
    made, the master key (and so the address) stays; the daemon then admits itself."""
    conf = tmp_path / "conf"
    conf.mkdir()
    write_seed_key_file(MASTER, conf / "master.key")
    (conf / "config.toml").write_text(tomli_w.dumps(V2_CONFIG))
    (conf / "wireguard.key").write_text(base64.b64encode(b"\x01" * 32).decode() + "\n")
    (conf / "wireguard.key").chmod(0o600)
    with pytest.raises(Exception, match="cluster upgrade"):
        load_config(conf / "config.toml")
    assert main(["cluster", "upgrade", "--config", str(conf / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert "Removed: coordination.cluster_token_path, join.secret_path, wireguard.peers_path" in out
    config = load_config(conf / "config.toml")
    assert config.master.identity_key_path == conf / "master.key"
    assert stat.S_IMODE((conf / "config.toml.v2").stat().st_mode) == 0o600
    assert tomllib.loads((conf / "config.toml.v2").read_text()) == V2_CONFIG
    prepared = prepare_membership(config, MASTER.public_key, MASTER, now_ms())
    own = prepared.membership.member("node-a")
    assert own is not None and own.holds_master_key and own.publisher_eligible
    assert own.wireguard is not None and own.wireguard.tunnel_address == "10.99.0.1"
    # Once is enough.
    assert main(["cluster", "upgrade", "--config", str(conf / "config.toml")]) == 0
    assert "already a protocol v3 config" in capsys.readouterr().out


def test_upgrade_of_a_node_without_the_master_key_needs_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    v2 = {**V2_CONFIG, "master": {"identity_key_path": "master.key",
                                  "onion_address": MASTER.onion_address}}  # fmt: skip
    (conf / "config.toml").write_text(tomli_w.dumps(v2))  # no master.key file: a standby
    assert main(["cluster", "upgrade", "--config", str(conf / "config.toml")]) == 2
    assert "must admit it" in capsys.readouterr().err
    assert tomllib.loads((conf / "config.toml").read_text()) == v2  # nothing written
    assert not (conf / "config.toml.v2").exists()
