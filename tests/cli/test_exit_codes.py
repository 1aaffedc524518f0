"""One exit-code rule for every command: 2 = the command line, the config or an input file is
wrong (retrying cannot help; systemd's RestartPreventExitStatus=2), 1 = it failed at run time.

Each command is run through rustbalance.cli.main.main (``run`` in a child process: it owns the
event loop and signal handlers) once for each kind of failure it can have.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cli.main import main
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file

# The contract (cli/main.py), spelled out: these numbers are what systemd and scripts see.
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def master_key(tmp_path: Path) -> tuple[Path, str]:
    key = IdentityKey.generate(os.urandom)
    path = tmp_path / "master.key"
    write_seed_key_file(key, path)
    return path, key.onion_address


def node_config(tmp_path: Path, **tor: object) -> Path:
    key, _ = master_key(tmp_path)
    doc = {
        "node": {"id": "node-a", "state_dir": str(tmp_path / "state")},
        "master": {"identity_key_path": str(key)},
        "target": {"address": f"127.0.0.1:{closed_port()}"},
        "tor": {"mode": "managed", "data_dir": str(tmp_path / "state" / "tor"), **tor},
        "proxy": {"listen_port": 0},
        "metrics": {"enabled": False},
    }
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def run_command(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        timeout=120,
        check=False,
    )


def test_no_command_and_unknown_command_are_usage_errors() -> None:
    assert main([]) == EXIT_CONFIG
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == EXIT_CONFIG


def test_run_bad_config_is_2(tmp_path: Path) -> None:
    result = run_command("run", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == EXIT_CONFIG, result.stderr


def test_run_tor_that_cannot_start_is_1(tmp_path: Path) -> None:
    config = node_config(tmp_path, binary=str(tmp_path / "no-such-tor"))
    result = run_command("run", "--config", str(config))
    assert result.returncode == EXIT_RUNTIME, result.stderr
    assert "tor did not start" in result.stderr


def test_run_with_the_etcd_backend_and_missing_tls_files_is_2(tmp_path: Path) -> None:
    """The etcd backend's files are opened at start-up: a missing one is a config error that
    names the file, and the daemon never starts as if it were alone (it would publish)."""
    config = node_config(tmp_path)
    text = config.read_text() + (
        '[coordination]\nbackend = "etcd"\n[etcd]\nendpoints = ["127.0.0.1:2379"]\n'
        'ca_path = "ca.pem"\ncert_path = "c.pem"\nkey_path = "k.pem"\n'
    )
    config.write_text(text)
    result = run_command("run", "--config", str(config))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"etcd CA {tmp_path / 'ca.pem'}: cannot read" in result.stderr
    assert not (tmp_path / "state" / "tor").exists()


def test_status_unreadable_config_is_2_and_no_daemon_is_1(tmp_path: Path) -> None:
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == EXIT_CONFIG
    (tmp_path / "bad.toml").write_text("[node\n")
    assert main(["status", "--config", str(tmp_path / "bad.toml")]) == EXIT_CONFIG
    config = tmp_path / "ok.toml"
    config.write_text(f'[node]\nstatus_socket = "{tmp_path / "none.sock"}"\n')
    assert main(["status", "--config", str(config)]) == EXIT_RUNTIME


def test_config_check_problem_is_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[node]\nid = "x y"\n')
    assert main(["config", "check", str(tmp_path / "bad.toml")]) == EXIT_CONFIG
    assert main(["config", "check", str(tmp_path / "missing.toml")]) == EXIT_CONFIG
    assert main(["config"]) == EXIT_CONFIG
    assert main(["config", "check", str(node_config(tmp_path))]) == 0


def test_prepare_bad_config_is_2_and_a_missing_tor_folder_is_1(tmp_path: Path) -> None:
    assert main(["prepare", "--config", str(tmp_path / "missing.toml")]) == EXIT_CONFIG
    hs_dir = str(tmp_path / "no" / "such" / "hs")
    config = node_config(tmp_path, mode="system", hidden_service_dir=hs_dir)
    assert main(["prepare", "--config", str(config)]) == EXIT_RUNTIME


def test_keygen_refusing_to_overwrite_is_2(tmp_path: Path) -> None:
    out = tmp_path / "k"
    assert main(["keygen", "--out", str(out)]) == 0
    assert main(["keygen", "--out", str(out)]) == EXIT_CONFIG


def test_show_onion_bad_key_is_2(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"not a key")
    assert main(["debug", "show-onion", "--key", str(tmp_path / "k")]) == EXIT_CONFIG


def test_decode_descriptor_that_does_not_verify_is_1(tmp_path: Path) -> None:
    _, address = master_key(tmp_path)
    (tmp_path / "desc").write_text("hs-descriptor 3\n")
    argv = ["debug", "decode-descriptor", "--address", address, str(tmp_path / "desc")]
    assert main(argv) == EXIT_RUNTIME


def test_build_descriptor_bad_argument_is_2(tmp_path: Path) -> None:
    key, _ = master_key(tmp_path)
    argv = ["debug", "build-descriptor", "--key", str(key), "--instance", "no-equals-sign"]
    assert main(argv) == EXIT_CONFIG


@pytest.mark.parametrize(
    "command",
    [
        ["debug", "tor"],
        ["debug", "fetch", "--address", "x" * 56 + ".onion"],
        ["debug", "hsdirs", "--address", "x" * 56 + ".onion"],
    ],
    ids=lambda argv: argv[1],
)
def test_tor_debug_commands_unreachable_tor_is_1(command: list[str]) -> None:
    assert main([*command, "--control", f"127.0.0.1:{closed_port()}"]) == EXIT_RUNTIME


def test_debug_publish_unreachable_tor_is_1(tmp_path: Path) -> None:
    key, address = master_key(tmp_path)
    argv = ["debug", "publish", "--control", f"127.0.0.1:{closed_port()}", "--key", str(key)]
    assert main([*argv, "--instance", address]) == EXIT_RUNTIME


def test_init_usage_problem_is_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["init", "--config-dir", str(tmp_path / "conf"), "--state-dir", str(tmp_path / "s")]
    argv += ["--endpoint", "203.0.113.5:51820", "--non-interactive", "--raw-token"]
    assert main(argv) == EXIT_CONFIG  # no --target
    assert main([*argv, "--target", "127.0.0.1:80"]) == 0
    capsys.readouterr()  # the raw token it printed is a secret
    assert main([*argv, "--target", "127.0.0.1:80"]) == EXIT_CONFIG  # a node is there already


def test_join_damaged_token_is_2_unreachable_tor_is_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = ["init", "--config-dir", str(tmp_path / "a"), "--state-dir", str(tmp_path / "sa")]
    init += ["--endpoint", "203.0.113.5:51820", "--target", "127.0.0.1:80"]
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse battery staple")
    assert main([*init, "--non-interactive", "--passphrase-file", str(passphrase)]) == 0
    capsys.readouterr()  # init prints the token: keep it out of the captured test output
    token = (tmp_path / "a" / "join-token.txt").read_text().strip()
    join = ["join", "--config-dir", str(tmp_path / "b"), "--state-dir", str(tmp_path / "sb")]
    join += ["--endpoint", "198.51.100.7:51820", "--node-id", "node-b", "--non-interactive"]
    join += ["--passphrase-file", str(passphrase), "--join-attempts", "1"]
    join += ["--tor-socks", f"127.0.0.1:{closed_port()}"]
    damaged = tmp_path / "damaged"
    damaged.write_text(token[:-20])
    assert main([*join, "--token-file", str(damaged)]) == EXIT_CONFIG
    good = tmp_path / "token"
    good.write_text(token)
    assert main([*join, "--token-file", str(good)]) == EXIT_RUNTIME


def test_cluster_commands_input_is_2_unwritable_state_is_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster"]) == EXIT_CONFIG
    assert main(["cluster", "members", "--config", str(tmp_path / "none.toml")]) == EXIT_CONFIG
    init = ["init", "--config-dir", str(tmp_path / "a"), "--state-dir", str(tmp_path / "sa")]
    init += ["--endpoint", "203.0.113.5:51820", "--target", "127.0.0.1:80"]
    assert main([*init, "--non-interactive", "--raw-token"]) == 0
    capsys.readouterr()  # the raw token it printed is a secret
    config = str(tmp_path / "a" / "config.toml")
    assert main(["cluster", "revoke", "--config", config, "--no-wait", "nobody"]) == EXIT_CONFIG
    assert main(["cluster", "token", "--config", config, "--token-uses", "0"]) == EXIT_CONFIG
    (tmp_path / "sa").mkdir(exist_ok=True)
    (tmp_path / "sa" / "cluster-inbox").write_text("")  # in the way of the daemon's inbox
    assert main(["cluster", "rotate-join-secret", "--config", config]) == EXIT_RUNTIME
