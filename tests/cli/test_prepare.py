"""``rustbalance prepare``: root's part of a node on the system tor (issue 17), so the daemon
itself runs unprivileged. The tor user and the daemon's user are stand-ins: unused uids (the
kernel only compares numbers). Run as root, like the unit's ``ExecStartPre=-+``."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rustbalance.config import parse_config
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_seed_key_file
from rustbalance.node.startup import write_system_include

pytestmark = pytest.mark.root


def unused_uids(n: int) -> list[int]:
    taken = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines()}
    return [uid for uid in range(64_100, 65_000) if uid not in taken][:n]


TOR_UID, DAEMON_UID = unused_uids(2)
MASTER = IdentityKey.from_seed(b"\x09" * 32)


def setup(tmp_path: Path, *, mode: str = "system", extra: str = "") -> Path:
    assert os.geteuid() == 0, "prepare hands files to other users: run as root"
    tor_home = tmp_path / "var-lib-tor"
    tor_home.mkdir(mode=0o700)
    os.chown(tor_home, TOR_UID, TOR_UID)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, DAEMON_UID, DAEMON_UID)
    (tmp_path / "torrc.d").mkdir()
    write_seed_key_file(MASTER, tmp_path / "master.key")
    config = tmp_path / "config.toml"
    tor = (
        f'[tor]\nmode = "system"\nhidden_service_dir = "{tor_home}/rustbalance_node_hs"\n'
        f'torrc_include = "{tmp_path}/torrc.d/rustbalance.conf"\n'
        if mode == "system"
        else f'[tor]\ndata_dir = "{tmp_path}/tor"\n'
    )
    config.write_text(
        f'[node]\nid = "node-a"\nstate_dir = "{state}"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:8000"\n'
        "[proxy]\nlisten_port = 18080\n" + tor + extra
    )
    return config


def prepare(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "prepare", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_onion_service_folder_and_the_include_are_written_for_tor(tmp_path: Path) -> None:
    config = setup(tmp_path)
    result = prepare(config)
    assert result.returncode == 0, result.stderr
    hs_dir = tmp_path / "var-lib-tor" / "rustbalance_node_hs"
    info = hs_dir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (TOR_UID, 0o700)
    for name in ("hs_ed25519_secret_key", "hs_ed25519_public_key", "hostname", "ob_config"):
        info = (hs_dir / name).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            TOR_UID,
            TOR_UID,
            0o600,
        ), name
    assert (hs_dir / "hostname").read_text() == MASTER.onion_address + "\n"
    include = tmp_path / "torrc.d" / "rustbalance.conf"
    text = include.read_text()
    assert stat.S_IMODE(include.stat().st_mode) == 0o644
    assert f"HiddenServiceDir {hs_dir}\n" in text
    assert "HiddenServicePort 80 127.0.0.1:18080\n" in text
    assert "PublishHidServDescriptors 1\n" in text  # a single node: tor publishes natively
    # Again: the same files, nothing else (the unit runs it before every start).
    assert prepare(config).returncode == 0
    assert include.read_text() == text


def test_a_missing_instance_key_is_made_for_the_daemons_user(tmp_path: Path) -> None:
    config = setup(tmp_path, extra="")
    text = config.read_text().replace(
        'id = "node-a"\n', 'id = "node-a"\nidentity_mode = "instance"\n'
    )
    config.write_text(text)
    result = prepare(config)
    assert result.returncode == 0, result.stderr
    key = tmp_path / "state" / "keys" / "instance.key"
    for path, mode in ((key.parent, 0o700), (key, 0o600)):
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (DAEMON_UID, mode), path
    instance = load_identity_key(key)
    hs_dir = tmp_path / "var-lib-tor" / "rustbalance_node_hs"
    assert (hs_dir / "hostname").read_text() == instance.onion_address + "\n"
    assert (hs_dir / "ob_config").read_text() == f"MasterOnionAddress {MASTER.onion_address}\n"


def test_managed_mode_needs_nothing(tmp_path: Path) -> None:
    result = prepare(setup(tmp_path, mode="managed"))
    assert (result.returncode, result.stdout) == (0, "tor.mode is managed: nothing to prepare\n")
    assert not (tmp_path / "tor").exists()


def test_a_folder_that_is_not_tors_is_refused(tmp_path: Path) -> None:
    config = setup(tmp_path)
    os.chown(tmp_path / "var-lib-tor", 0, 0)
    result = prepare(config)
    assert result.returncode == 2
    assert "belongs to root, not to the system tor's user" in result.stderr
    assert list((tmp_path / "var-lib-tor").iterdir()) == []


def test_a_port_picked_at_start_cannot_be_prepared(tmp_path: Path) -> None:
    config = setup(tmp_path)
    config.write_text(config.read_text().replace("listen_port = 18080", "listen_port = 0"))
    result = prepare(config)
    assert result.returncode == 2
    assert "proxy.listen_port: 0" in result.stderr


def test_a_unix_socket_needs_no_fixed_port(tmp_path: Path) -> None:
    """With ``proxy.listen_unix`` tor reaches the proxy by path: the port is not used, so a
    port picked at start is no reason to refuse."""
    config = setup(tmp_path)
    sock = tmp_path / "run" / "proxy.sock"
    config.write_text(
        config.read_text().replace(
            "listen_port = 18080", f'listen_port = 0\nlisten_unix = "{sock}"'
        )
    )
    result = prepare(config)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "torrc.d" / "rustbalance.conf").read_text()
    assert f"HiddenServicePort 80 unix:{sock}\n" in text


def test_the_default_socket_is_the_units_runtime_directory(tmp_path: Path) -> None:
    """Without a TCP listener in the file the proxy is on ``$RUNTIME_DIRECTORY/proxy.sock``:
    systemd gives ``prepare`` (ExecStartPre=) the same RUNTIME_DIRECTORY as the daemon, so
    both write the same include."""
    config = setup(tmp_path)
    config.write_text(config.read_text().replace("[proxy]\nlisten_port = 18080\n", ""))
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    result = prepare(config, {**env, "RUNTIME_DIRECTORY": "/run/rustbalance"})
    assert result.returncode == 0, result.stderr
    include = tmp_path / "torrc.d" / "rustbalance.conf"
    assert "HiddenServicePort 80 unix:/run/rustbalance/proxy.sock\n" in include.read_text()
    assert prepare(config, env).returncode == 0
    state = tmp_path / "state"
    assert f"HiddenServicePort 80 unix:{state}/proxy.sock\n" in include.read_text()


def test_a_bad_config_is_exit_2(tmp_path: Path) -> None:
    config = setup(tmp_path)
    config.write_text(config.read_text() + "[node2]\n")
    assert prepare(config).returncode == 2


def test_the_daemon_leaves_an_up_to_date_include_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The unprivileged daemon cannot write /etc/tor/torrc.d: it only checks the include."""
    config = parse_config(
        '[node]\nid = "a"\n[master]\nidentity_key_path = "k"\n[target]\naddress = "h:1"\n'
        f'[tor]\nmode = "system"\ntorrc_include = "{tmp_path}/inc/rustbalance.conf"\n',
        tmp_path,
    )
    folder = tmp_path / "inc"
    folder.mkdir()
    (folder / "rustbalance.conf").write_text("same\n")
    folder.chmod(0o555)  # even root's write would work; the point is it is not tried
    caplog.set_level(logging.INFO)
    write_system_include(config, "same\n")
    assert caplog.messages == [f"Tor include {folder}/rustbalance.conf is up to date"]
    folder.chmod(0o755)
