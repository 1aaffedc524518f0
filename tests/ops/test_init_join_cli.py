"""`rustbalance init` / `join` end to end in a temporary folder (no network, no tor)."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rustbalance.cli.init_cmd import CliError, Io, run_init, validated_config
from rustbalance.cli.join_cmd import JoinSettings, joined_config
from rustbalance.cli.main import build_parser, main
from rustbalance.cluster.identity import load_node_key
from rustbalance.config import load_config, parse_config
from rustbalance.config.identity_mode import SHARED_CLUSTER_PROBLEM
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_hidden_service_dir
from rustbalance.deploy.join_token import JoinPayload, decode, token_needs_passphrase
from rustbalance.node.cluster_link import prepare_membership
from rustbalance.node.join import JOIN_PATH, JoinAnswer, JoinRequest, parse_join_answer
from rustbalance.node.mesh import Mesh
from tests.trust import node_key

PASSPHRASE = "correct horse battery staple"
SECRET_FILES = ("master.key", "node.key", "wireguard.key")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


def _init(tmp_path: Path, passfile: Path | None, *extra: str) -> list[str]:
    args = [
        "init",
        "--config-dir",
        str(tmp_path / "conf"),
        "--endpoint",
        "203.0.113.5:51820",
        "--target",
        "127.0.0.1:8000",
        "--node-id",
        "node-a",
        "--state-dir",
        str(tmp_path / "state"),
        "--non-interactive",
    ]
    if passfile is not None:
        args += ["--passphrase-file", str(passfile)]
    return args + list(extra)


def _printed_token(out: str) -> str:
    tokens = [line for line in out.splitlines() if line.startswith("rbj2-")]
    assert len(tokens) == 1
    return tokens[0]


def _printed_address(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("Master onion address: ")]
    assert len(lines) == 1
    return lines[0].removeprefix("Master onion address: ")


def test_init_writes_private_files_a_valid_config_and_a_decodable_token(
    tmp_path: Path,
    passfile: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert main(_init(tmp_path, passfile)) == 0
    out = capsys.readouterr().out
    conf = tmp_path / "conf"
    assert _mode(conf) == 0o700
    names = {p.name for p in conf.iterdir()}
    assert names == {*SECRET_FILES, "config.toml", "join-token.txt"}
    for path in conf.iterdir():
        assert _mode(path) == 0o600, path
    config = load_config(conf / "config.toml")
    key = load_identity_key(conf / "master.key")
    address = _printed_address(out)
    assert address == key.onion_address == config.master.onion_address
    assert config.node.id == "node-a" and config.node.priority == 10
    assert config.tor.mode == "system"
    assert config.node.node_key_path == conf / "node.key"
    assert "node key " + load_node_key(conf / "node.key").fingerprint in out
    # No TCP port to collide with: the proxy's unix socket (issue 17), here in the state folder.
    assert "[proxy]" not in (conf / "config.toml").read_text()
    assert config.proxy.listen_unix == tmp_path / "state" / "proxy.sock"
    assert str(config.coordination.listen) == "10.99.0.1:51821"
    # No sidecar: WireGuard and joins are keys of the one config file.
    assert config.wireguard.enabled and config.join.enabled
    assert str(config.wireguard.address) == "10.99.0.1/24"
    assert str(config.wireguard.endpoint) == "203.0.113.5:51820"
    assert config.wireguard.private_key_path == conf / "wireguard.key"
    assert str(config.join.tunnel_network) == "10.99.0.0/24"
    token = _printed_token(out)
    assert (conf / "join-token.txt").read_text().strip() == token
    payload = decode(token, PASSPHRASE, now=int(time.time()))
    assert payload.master_onion == address
    # By default the token carries no master key and admits one node (issue 16).
    assert payload.master_key_seed is None and not payload.publisher_eligible
    assert payload.join_grant.max_uses == 1
    assert "1 join, valid 24 h" in out
    assert payload.grant_secret.hex() not in out and PASSPHRASE not in out


def test_init_with_a_proxy_port_keeps_tcp(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile, "--no-wireguard", "--proxy-port", "18080")) == 0
    capsys.readouterr()  # the printed token stays out of the test log
    config = load_config(tmp_path / "conf" / "config.toml")
    assert (config.proxy.listen_port, config.proxy.listen_unix) == (18080, None)


def test_init_refuses_to_overwrite_an_existing_node(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile)) == 0
    before = (tmp_path / "conf" / "master.key").read_bytes()
    assert main(_init(tmp_path, passfile)) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "conf" / "master.key").read_bytes() == before
    assert not [p for p in (tmp_path / "conf").iterdir() if p.name.startswith(".")]


def test_init_imports_a_tor_secret_key(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = IdentityKey.generate(os.urandom)
    write_hidden_service_dir(key, tmp_path / "hs")
    tor_key = tmp_path / "hs" / "hs_ed25519_secret_key"
    assert main(_init(tmp_path, passfile, "--import-key", str(tor_key))) == 0
    captured = capsys.readouterr()
    assert _printed_address(captured.out) == key.onion_address
    loaded = load_identity_key(tmp_path / "conf" / "master.key")
    assert loaded.public_key == key.public_key and loaded.expanded == key.expanded
    # By default the token carries no key anyway; asked to, it cannot: tor keeps no seed.
    payload = decode(_printed_token(captured.out), PASSPHRASE, now=int(time.time()))
    assert not payload.publisher_eligible
    assert main(_init(tmp_path / "again", passfile, "--import-key", str(tor_key),
                      "--with-master-key")) == 2  # fmt: skip
    assert "no seed" in capsys.readouterr().err


def test_init_imports_a_pem_key_and_keeps_its_seed(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = Ed25519PrivateKey.generate()
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert main(_init(tmp_path, passfile, "--import-key", str(pem))) == 0
    out = capsys.readouterr().out
    assert _printed_address(out) == IdentityKey.from_seed(seed).onion_address
    assert (tmp_path / "conf" / "master.key").read_bytes() == seed


def test_init_without_required_values_or_passphrase_is_an_error(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _init(tmp_path, passfile)
    no_target = args[: args.index("--target")] + args[args.index("--target") + 2 :]
    assert main(no_target) == 2
    assert "--target is required" in capsys.readouterr().err
    assert main(_init(tmp_path, None)) == 2
    assert "--passphrase-file" in capsys.readouterr().err
    assert not (tmp_path / "conf").exists()


def test_init_asks_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    questions: list[str] = []
    answers = {"endpoint": "203.0.113.9:51820", "Service": "127.0.0.1:9000"}

    def ask(prompt: str) -> str:
        questions.append(prompt)
        return next(v for k, v in answers.items() if k.lower() in prompt.lower())

    io = Io(
        stdin_is_tty=lambda: True,
        ask=ask,
        has_terminal=lambda: True,
        ask_secret=lambda prompt: PASSPHRASE,
    )
    args = build_parser().parse_args(
        [
            "init",
            "--config-dir",
            str(tmp_path / "conf"),
            "--node-id",
            "n1",
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    assert run_init(args, io) == 0
    assert len(questions) == 2
    config = load_config(tmp_path / "conf" / "config.toml")
    assert str(config.target.address) == "127.0.0.1:9000"
    token = _printed_token(capsys.readouterr().out)
    assert decode(token, PASSPHRASE, now=int(time.time())).master_onion


def test_init_prompt_rejects_mismatched_passphrases(tmp_path: Path) -> None:
    replies = iter([PASSPHRASE, PASSPHRASE + "x"])
    io = Io(
        stdin_is_tty=lambda: False,
        has_terminal=lambda: True,
        ask_secret=lambda prompt: next(replies),
    )
    args: argparse.Namespace = build_parser().parse_args(_init(tmp_path, None)[:-1])
    with pytest.raises(CliError, match="differ"):
        run_init(args, io)
    assert not (tmp_path / "conf").exists()


def _join_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "join",
        "--config-dir",
        str(tmp_path / "conf2"),
        "--endpoint",
        "198.51.100.7:51820",
        "--node-id",
        "node-b",
        "--state-dir",
        str(tmp_path / "state2"),
        "--non-interactive",
        *extra,
    ]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answer_from_node_a(conf: Path, payload: JoinPayload, wg_public: str) -> JoinAnswer:
    """node-a's own responder (built from its init config as the daemon does: its node key,
    its own record signed with the master key, the Mesh) answering node-b's request: the
    bytes the daemon's proxy would send back through the onion."""
    config = load_config(conf / "config.toml")
    master = load_identity_key(conf / "master.key")
    prepared = prepare_membership(config, master.public_key, master, int(time.time() * 1000))

    class _Coordinator:
        membership = prepared.membership

    mesh = Mesh(config, master_key=master)
    mesh.coordinator = _Coordinator()  # type: ignore[assignment]
    mesh.responder = mesh._responder()
    request = JoinRequest(
        node_id="node-b",
        node_key=node_key("node-b").public,
        wg_public_key=base64.b64decode(wg_public),
        wg_endpoint="198.51.100.7:51820",
        coordination_port=51821,
        priority=20,
        request_time=0,
        grant=payload.grant,
        grant_secret=payload.grant_secret,
    )
    now = time.time()
    fresh = dataclasses.replace(request, request_time=int(now))
    body = fresh.to_json(node_key("node-b"))
    decision = mesh.responder.handle(
        "POST", JOIN_PATH, [("Content-Length", str(len(body)))], body, now
    )
    assert decision.status == 200, decision.body
    return parse_join_answer(decision.body, master.public_key, fresh, int(now * 1000))


def _settings(tmp_path: Path) -> JoinSettings:
    return JoinSettings(
        config_dir=tmp_path / "conf2",
        state_dir=tmp_path / "state2",
        node_id="node-b",
        priority=20,
        endpoint="198.51.100.7:51820",
        target="127.0.0.1:8001",
        tor_mode="system",
        proxy_port=8080,
        coordination_port=51821,
        wireguard=True,
    )


@pytest.mark.parametrize("standby", [False, True])
def test_joined_config_from_node_a_answer_is_valid(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str], standby: bool
) -> None:
    extra = ("--no-wireguard",) if standby else ("--no-wireguard", "--with-master-key")
    assert main(_init(tmp_path, passfile, *extra)) == 0
    payload = decode(_printed_token(capsys.readouterr().out), PASSPHRASE, now=int(time.time()))
    assert (payload.master_key_seed is None) is standby
    answer = _answer_from_node_a(
        tmp_path / "conf", payload, base64.b64encode(b"\x07" * 32).decode()
    )
    doc = joined_config(_settings(tmp_path), payload, answer)
    text = validated_config(doc, tmp_path / "conf2").decode()
    config = parse_config(text, tmp_path / "conf2")
    assert config.node.id == "node-b" and config.node.priority == 20
    assert config.node.publisher_eligible is not standby
    # A joiner runs instance mode, the mode of a cluster (issue 14), with or without the master
    # key; without it, it admits nobody.
    assert config.node.identity_mode == "instance"
    assert (config.master.identity_key_path is None) is standby
    assert config.join.enabled is not standby
    # The assigned tunnel address is where coordination listens; node-a is the one peer.
    assert str(config.wireguard.address) == f"{answer.tunnel_address}/24"
    assert str(config.coordination.listen) == f"{answer.tunnel_address}:51821"
    assert [str(p) for p in config.coordination.peers] == ["10.99.0.1:51821"]
    assert config.node.node_key_path == tmp_path / "conf2" / "node.key"
    assert payload.grant_secret.hex() not in text


def test_join_without_a_reachable_tor_fails_and_writes_nothing(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile)) == 0
    token = _printed_token(capsys.readouterr().out)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    args = _join_args(tmp_path, "--token-file", str(token_file), "--passphrase-file", str(passfile))
    socks = ["--tor-socks", f"127.0.0.1:{_closed_port()}", "--join-attempts", "1"]
    assert main([*args, *socks]) == 1
    err = capsys.readouterr().err
    assert "rustbalance: error: join failed after 1 attempts: connection failed" in err
    assert token not in err and PASSPHRASE not in err
    assert not (tmp_path / "conf2").exists() and not (tmp_path / "state2").exists()
    assert main([*args, "--join-attempts", "0"]) == 2
    assert "--join-attempts must be 1-60" in capsys.readouterr().err
    # An existing node is refused before it could join a second time with a new key.
    (tmp_path / "state2").mkdir()
    (tmp_path / "state2" / "cluster_members.json").write_text("{}")
    assert main([*args, *socks]) == 2
    assert "cluster_members.json already exists" in capsys.readouterr().err
    assert not (tmp_path / "conf2").exists()


def test_join_positional_passphrase_token_reaches_the_join(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile)) == 0
    token = _printed_token(capsys.readouterr().out)
    socks = ["--tor-socks", f"127.0.0.1:{_closed_port()}", "--join-attempts", "1"]
    assert main(_join_args(tmp_path, token, "--passphrase-file", str(passfile), *socks)) == 1
    # Decoded (a wrong token would fail before): it got as far as tor's SOCKS port.
    assert "join failed after 1 attempts" in capsys.readouterr().err
    assert not (tmp_path / "conf2").exists()


@pytest.mark.parametrize("damage", ["wrong-passphrase", "flipped", "truncated"])
def test_wrong_passphrase_or_damaged_token_writes_nothing(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    assert main(_init(tmp_path, passfile)) == 0
    token = _printed_token(capsys.readouterr().out)
    if damage == "flipped":
        i = len(token) // 2
        token = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    elif damage == "truncated":
        token = token[:-20]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    pass_for_join = passfile
    if damage == "wrong-passphrase":
        pass_for_join = tmp_path / "wrong"
        pass_for_join.write_text("not the right passphrase at all")
    args = _join_args(tmp_path, "--token-file", str(token_file))
    assert main([*args, "--passphrase-file", str(pass_for_join)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "rustbalance: error:" in err
    assert "passphrase" in err or "damaged" in err or "truncated" in err
    assert token not in err and PASSPHRASE not in err
    assert not (tmp_path / "conf2").exists()


def test_raw_token_is_refused_on_argv_and_accepted_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, None, "--raw-token")) == 0
    captured = capsys.readouterr()
    token = _printed_token(captured.out)
    assert not token_needs_passphrase(token)
    assert "shown only this once" in captured.err
    # Not stored: the raw token is the secret itself.
    assert not (tmp_path / "conf" / "join-token.txt").exists()
    assert main(_join_args(tmp_path, token)) == 2
    err = capsys.readouterr().err
    assert "--token-file" in err and token not in err
    assert not (tmp_path / "conf2").exists()
    token_file = tmp_path / "raw"
    token_file.write_text(token)
    socks = ["--tor-socks", f"127.0.0.1:{_closed_port()}", "--join-attempts", "1"]
    assert main(_join_args(tmp_path, "--token-file", str(token_file), *socks)) == 1
    # Accepted from the file: decoded, then the join itself was tried.
    assert "join failed after 1 attempts" in capsys.readouterr().err


def test_join_refuses_the_issuers_node_id(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile)) == 0
    token = _printed_token(capsys.readouterr().out)
    args = _join_args(tmp_path, token, "--passphrase-file", str(passfile))
    args[args.index("node-b")] = "node-a"
    assert main(args) == 2
    assert "issuing node" in capsys.readouterr().err
    assert not (tmp_path / "conf2").exists()


# ----------------------------------------------------------------- issue 14: the identity mode


def test_init_writes_instance_mode_and_refuses_shared(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first node answers joins, so it is part of a cluster: ``instance`` by default,
    written explicitly; ``--identity-mode shared`` is refused in one line naming the fix,
    before anything is written."""
    assert main(_init(tmp_path, passfile, "--identity-mode", "shared")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rustbalance: error: --identity-mode shared: {SHARED_CLUSTER_PROBLEM}"]
    assert not (tmp_path / "conf").exists()
    assert main(_init(tmp_path, passfile)) == 0
    # Read what init printed: its join token must not reach any captured log (secret scan).
    assert _printed_token(capsys.readouterr().out)
    text = (tmp_path / "conf" / "config.toml").read_text()
    assert 'identity_mode = "instance"' in text
    assert load_config(tmp_path / "conf" / "config.toml").identity_mode == "instance"


def test_join_writes_instance_mode_and_refuses_shared_before_joining(
    tmp_path: Path, passfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_init(tmp_path, passfile, "--no-wireguard")) == 0
    token = _printed_token(capsys.readouterr().out)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    args = _join_args(tmp_path, "--token-file", str(token_file), "--passphrase-file", str(passfile))
    socks = ["--tor-socks", f"127.0.0.1:{_closed_port()}", "--join-attempts", "1"]
    assert main([*args, *socks, "--identity-mode", "shared"]) == 2
    err = capsys.readouterr().err
    assert f"--identity-mode shared: {SHARED_CLUSTER_PROBLEM}" in err
    assert "Joining" not in err  # refused before the join
    assert not (tmp_path / "conf2").exists() and not (tmp_path / "state2").exists()
    # What join writes (the default): instance mode, explicitly.
    payload = decode(token, PASSPHRASE, now=int(time.time()))
    answer = _answer_from_node_a(
        tmp_path / "conf", payload, base64.b64encode(b"\x07" * 32).decode()
    )
    doc = joined_config(_settings(tmp_path), payload, answer)
    assert doc["node"]["identity_mode"] == "instance"
    text = validated_config(doc, tmp_path / "conf2").decode()
    assert parse_config(text, tmp_path / "conf2").identity_mode == "instance"
