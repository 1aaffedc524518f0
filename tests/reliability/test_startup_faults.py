"""Fault matrix, start-up rows: a corrupted config, a corrupted or exposed key file, a bad cluster
token, a bad hidden-service directory mode.

``rustbalance run`` is started exactly as an operator (or systemd) starts it. For a bad config or
key it must exit with code 2 (``EXIT_CONFIG``: restarting will not help) after one error line that
names the file and the problem, never echo the file's content, and write nothing: no
HiddenServiceDir, no tor data directory, no state directory, no status socket. These faults
stop the daemon before tor is started, so no Tor network is needed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.node.startup import EXIT_CONFIG, EXIT_RUNTIME
from rustbalance.testnet.node import write_node_config

RUN_TIMEOUT = 60.0


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root``: (mode, size, sha256) - to show that nothing was written."""
    found: dict[str, tuple[int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (info.st_mode, info.st_size, digest)
    return found


def _node(tmp_path: Path, **overrides: dict[str, object]) -> tuple[Path, Path, IdentityKey]:
    key = IdentityKey.generate(secrets.token_bytes)
    key_file = tmp_path / "master.key"
    write_seed_key_file(key, key_file)
    config = write_node_config(
        tmp_path / "config.toml",
        node_id="node-a",
        key_file=key_file,
        master_address=key.onion_address,
        target="127.0.0.1:9",
        work_dir=tmp_path,
        overrides=overrides,
    )
    return config, key_file, key


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RUSTBALANCE_TOR_PASSWORD"}
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _assert_refused(
    tmp_path: Path, config: Path, *must_name: str, secret: bytes | None = None
) -> str:
    before = _snapshot(tmp_path)
    result = _run(config)
    after = _snapshot(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CONFIG, output
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, output
    for text in must_name:
        assert text in errors[0], (text, errors[0])
    assert after == before, "the daemon wrote something before refusing to start"
    for name in ("state", "tor"):
        assert not (tmp_path / name).exists()
    if secret is not None:
        for form in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1]):
            assert form not in output
    return errors[0]


def test_corrupted_config_toml(tmp_path: Path) -> None:
    config, _, _ = _node(tmp_path)
    text = config.read_text()
    # Half a file, as a full disk or a crash during an editor's save leaves it.
    config.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + '\n[tor\nmode = "man')
    _assert_refused(tmp_path, config, str(config), "invalid config")


def test_config_with_an_unknown_key_and_a_bad_value(tmp_path: Path) -> None:
    config, _, _ = _node(tmp_path, proxy={"listen_port": 70000, "bogus_key": 1})
    line = _assert_refused(tmp_path, config, str(config), "proxy.listen_port", "proxy.bogus_key")
    assert line.startswith("rustbalance: error:")


def test_config_that_is_not_text(tmp_path: Path) -> None:
    config, _, _ = _node(tmp_path)
    config.write_bytes(b"\x00\xff\xfe" + secrets.token_bytes(64))
    _assert_refused(tmp_path, config, str(config))


def test_missing_config(tmp_path: Path) -> None:
    _assert_refused(tmp_path, tmp_path / "nope.toml", str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("length", [0, 31, 33, 200])
def test_corrupted_key_file(tmp_path: Path, length: int) -> None:
    config, key_file, _ = _node(tmp_path)
    garbage = secrets.token_bytes(length)
    key_file.write_bytes(garbage)  # keeps mode 0600
    _assert_refused(tmp_path, config, str(key_file), secret=garbage or None)


def test_truncated_pem_key_file(tmp_path: Path) -> None:
    config, key_file, _ = _node(tmp_path)
    body = secrets.token_bytes(48)
    import base64

    key_file.write_text("-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(body).decode() + "\n")
    line = _assert_refused(tmp_path, config, str(key_file))
    assert base64.b64encode(body).decode() not in line


def test_key_file_readable_by_others(tmp_path: Path) -> None:
    config, key_file, _ = _node(tmp_path)
    os.chmod(key_file, 0o644)
    _assert_refused(tmp_path, config, str(key_file), "0644", "chmod 600")


def test_missing_key_file(tmp_path: Path) -> None:
    config, key_file, _ = _node(tmp_path)
    key_file.unlink()
    _assert_refused(tmp_path, config, str(key_file), "cannot read")


def test_key_for_another_address(tmp_path: Path) -> None:
    config, key_file, key = _node(tmp_path)
    key_file.unlink()
    write_seed_key_file(IdentityKey.generate(secrets.token_bytes), key_file)
    _assert_refused(tmp_path, config, str(key_file), key.onion_address, "wrong key file")


CLUSTER: dict[str, object] = {"listen": "127.0.0.1:1", "peers": ["127.0.0.1:2"]}


@pytest.mark.parametrize("problem", ["empty", "exposed", "symlink"])
def test_bad_node_key(tmp_path: Path, problem: str) -> None:
    """The node's own cluster key (issue 16): a damaged, exposed or symlinked file is refused
    with one line naming it, before anything is written; its content never echoed."""
    node_key = tmp_path / "node.key"
    seed = secrets.token_bytes(32)
    if problem == "symlink":
        real = tmp_path / "elsewhere.key"
        real.write_bytes(seed)
        os.chmod(real, 0o600)
        node_key.symlink_to(real)
    else:
        node_key.write_bytes(b"" if problem == "empty" else seed)
        os.chmod(node_key, 0o644 if problem == "exposed" else 0o600)
    config, _, _ = _node(tmp_path, node={"node_key_path": node_key}, coordination=CLUSTER)
    expected = {"empty": "exactly 32 bytes", "exposed": "chmod 600", "symlink": "cannot read"}
    _assert_refused(tmp_path, config, str(node_key), expected[problem], secret=seed)


def test_a_node_that_is_not_admitted_exits_2(tmp_path: Path) -> None:
    """A node without the master key and without an admission record (it never joined):
    exit 2, one line naming the node and its key's fingerprint, nothing written."""
    key = IdentityKey.generate(secrets.token_bytes)
    instance_key = tmp_path / "instance.key"
    write_seed_key_file(IdentityKey.generate(secrets.token_bytes), instance_key)
    node_key = tmp_path / "node.key"
    node_key.write_bytes(secrets.token_bytes(32))
    os.chmod(node_key, 0o600)
    config = write_node_config(
        tmp_path / "config.toml",
        node_id="node-b",
        key_file=tmp_path / "none",
        master_address=key.onion_address,
        target="127.0.0.1:9",
        work_dir=tmp_path,
        overrides={
            "node": {"identity_mode": "instance", "publisher_eligible": False,
                     "instance_key_path": instance_key, "node_key_path": node_key},
            "master": {"identity_key_path": None},
            "coordination": CLUSTER,
        },
    )  # fmt: skip
    _assert_refused(tmp_path, config, "node node-b is not admitted", "SHA256:", "rustbalance join")


def test_a_v2_config_names_the_upgrade(tmp_path: Path) -> None:
    token = tmp_path / "cluster.token"
    token.write_text(secrets.token_hex(32) + "\n")
    os.chmod(token, 0o600)
    config, _, _ = _node(tmp_path, coordination={"cluster_token_path": token, **CLUSTER})
    _assert_refused(
        tmp_path, config, "coordination.cluster_token_path", "rustbalance cluster upgrade"
    )


def test_unusable_hidden_service_dir(tmp_path: Path) -> None:
    """A HiddenServiceDir path that is a file (or on a read-only disk): a start-up error that
    names it, exit 1 (the config is valid; the machine needs fixing), tor never started."""
    blocker = tmp_path / "hs"
    blocker.write_text("not a directory\n")
    config, _, _ = _node(tmp_path, tor={"hidden_service_dir": blocker / "node"})
    before = _snapshot(tmp_path)
    result = _run(config)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_RUNTIME, output
    errors = [ln for ln in output.splitlines() if " ERROR " in ln or "error:" in ln]
    assert len(errors) == 1, output
    assert f"cannot write hidden service directory {blocker / 'node'}" in errors[0]
    assert "Not a directory" in errors[0]
    assert "started tor pid" not in output
    assert not (tmp_path / "tor").exists()
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("state")} == before
