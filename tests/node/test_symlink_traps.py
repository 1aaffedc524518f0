"""No symlink traps where another user can write (issue 17, each attack of the issue).

In ``tor.mode = "system"`` the onion-service folder lives in tor's own folder
(``/var/lib/tor``, owned by the tor user), so the tor user can plant anything there: a
symlink to a root-only file, the folder itself swapped for a symlink to a root folder, a hard
link to a root file, names the daemon is about to write. The daemon (root in this test, as the
old system-mode unit ran it) must never act on any of them: it opens the folder without
following symlinks, works relative to that folder's descriptor, creates files with
``O_EXCL|O_NOFOLLOW``, and hands only what it created to the tor user with ``fchown`` on its
own descriptors.

The tor user is a stand-in: an unused uid (no such user on the machine), which is all the
kernel's checks look at. The state folder must be private to the daemon; ``tor.data_dir``
cannot carry a newline into a torrc.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.config import ConfigProblems, parse_config
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.errors import TorProcessError
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.startup import StartupError, write_onion_service_dir
from rustbalance.tor.process import ManagedTor
from tests.node.fakes import master_key

pytestmark = pytest.mark.root

KEY = master_key()
IDENTITY = NodeIdentity("shared", KEY.onion_address, KEY, KEY)
ROOT_SECRET = b"root only\n"


def unused_uid() -> int:
    taken = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines()}
    return next(uid for uid in range(64_000, 65_000) if uid not in taken)


TOR_UID = unused_uid()


@pytest.fixture
def tor_home(tmp_path: Path) -> Iterator[Path]:
    """``/var/lib/tor``'s stand-in: a 0700 folder of the tor user."""
    assert os.geteuid() == 0, "these attacks need root to chown to a stand-in uid"
    home = tmp_path / "var-lib-tor"
    home.mkdir(mode=0o700)
    os.chown(home, TOR_UID, TOR_UID)
    yield home


def root_file(tmp_path: Path) -> Path:
    folder = tmp_path / "root-only"
    folder.mkdir(mode=0o700, exist_ok=True)
    secret = folder / "shadow"
    secret.write_bytes(ROOT_SECRET)
    secret.chmod(0o600)
    return secret


def system_config(tmp_path: Path, hs_dir: Path) -> object:
    return parse_config(
        f'[node]\nid = "node-a"\nstate_dir = "{tmp_path}/state"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:8000"\n'
        f'[tor]\nmode = "system"\nhidden_service_dir = "{hs_dir}"\n'
        f'torrc_include = "{tmp_path}/torrc.d/rustbalance.conf"\n',
        tmp_path,
    )


def as_tor_user(path: Path) -> None:
    os.chown(path, TOR_UID, TOR_UID, follow_symlinks=False)


def assert_untouched(secret: Path) -> None:
    info = secret.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert secret.read_bytes() == ROOT_SECRET


def test_a_symlinked_entry_is_never_chowned(tmp_path: Path, tor_home: Path) -> None:
    """The tor user links a root-only file into the onion-service folder; before, the daemon
    chowned every entry following symlinks and the root file became the tor user's."""
    secret = root_file(tmp_path)
    hs_dir = tor_home / "rustbalance_node_hs"
    hs_dir.mkdir(mode=0o700)
    as_tor_user(hs_dir)
    (hs_dir / "planted").symlink_to(secret)
    as_tor_user(hs_dir / "planted")
    write_onion_service_dir(system_config(tmp_path, hs_dir), IDENTITY)  # type: ignore[arg-type]
    assert_untouched(secret)
    # What the daemon wrote is the tor user's (tor refuses a folder it does not own).
    for name in ("hs_ed25519_secret_key", "hs_ed25519_public_key", "hostname", "ob_config"):
        info = (hs_dir / name).lstat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (TOR_UID, 0o600), name
    assert hs_dir.lstat().st_uid == TOR_UID


def test_a_hard_link_planted_in_the_folder_is_never_chowned(tmp_path: Path, tor_home: Path) -> None:
    """A hard link names the root file's inode itself: chowning the entry by name (even
    without following symlinks) gives the root file away. (Linux refuses such a link to an
    unprivileged user under fs.protected_hardlinks = 1; the daemon must not rely on that.)"""
    secret = root_file(tmp_path)
    hs_dir = tor_home / "rustbalance_node_hs"
    hs_dir.mkdir(mode=0o700)
    as_tor_user(hs_dir)
    os.link(secret, hs_dir / "planted-link")
    write_onion_service_dir(system_config(tmp_path, hs_dir), IDENTITY)  # type: ignore[arg-type]
    assert_untouched(secret)


def test_the_folder_swapped_for_a_symlink_is_refused(tmp_path: Path, tor_home: Path) -> None:
    """The tor user replaces the onion-service folder with a symlink to a root folder; before,
    the daemon wrote the secret key into the root folder (and chmod/chowned it)."""
    root_dir = tmp_path / "root-dir"
    root_dir.mkdir(mode=0o700)
    hs_dir = tor_home / "rustbalance_node_hs"
    hs_dir.symlink_to(root_dir)
    as_tor_user(hs_dir)
    with pytest.raises(StartupError, match="symbolic link") as raised:
        write_onion_service_dir(system_config(tmp_path, hs_dir), IDENTITY)  # type: ignore[arg-type]
    assert raised.value.exit_code == 1
    assert list(root_dir.iterdir()) == []
    info = root_dir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o700)


def test_names_planted_before_the_write_lead_nowhere(tmp_path: Path, tor_home: Path) -> None:
    """Symlinks at every name the daemon writes, and at the temporary names the old code
    used (``.NAME.tmp``): each file is replaced (never written through), the root file stays."""
    secret = root_file(tmp_path)
    hs_dir = tor_home / "rustbalance_node_hs"
    hs_dir.mkdir(mode=0o700)
    as_tor_user(hs_dir)
    names = ("hs_ed25519_secret_key", "hs_ed25519_public_key", "hostname", "ob_config")
    for name in names:
        for planted in (hs_dir / name, hs_dir / f".{name}.tmp", hs_dir / f"{name}.tmp"):
            planted.symlink_to(secret)
            as_tor_user(planted)
    write_onion_service_dir(system_config(tmp_path, hs_dir), IDENTITY)  # type: ignore[arg-type]
    assert_untouched(secret)
    assert (hs_dir / "hostname").read_text() == KEY.onion_address + "\n"
    assert not (hs_dir / "hostname").is_symlink()


def test_a_folder_of_a_third_user_is_refused(tmp_path: Path, tor_home: Path) -> None:
    """The folder exists but belongs to neither tor nor the daemon: refused, not adopted."""
    hs_dir = tor_home / "rustbalance_node_hs"
    hs_dir.mkdir(mode=0o700)
    os.chown(hs_dir, TOR_UID + 1, TOR_UID + 1)
    with pytest.raises(StartupError, match="owned by uid"):
        write_onion_service_dir(system_config(tmp_path, hs_dir), IDENTITY)  # type: ignore[arg-type]
    assert list(hs_dir.iterdir()) == []


# --- the state folder -------------------------------------------------------------------------


def run_node(tmp_path: Path, state_dir: Path) -> subprocess.CompletedProcess[str]:
    key = IdentityKey.from_seed(b"\x07" * 32)
    write_seed_key_file(key, tmp_path / "master.key")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\nid = "node-a"\nstate_dir = "{state_dir}"\n'
        '[master]\nidentity_key_path = "master.key"\n'
        '[target]\naddress = "127.0.0.1:9"\n'
        # A tor that cannot start: the node must refuse before it gets that far.
        f'[tor]\nbinary = "/bin/false"\ndata_dir = "{tmp_path}/tor"\n'
        "[metrics]\nenabled = false\n[proxy]\nlisten_port = 0\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_world_writable_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    result = run_node(tmp_path, state)
    assert result.returncode == 2, result.stderr
    assert f"node.state_dir: {state} is writable by others (mode 0777)" in result.stderr
    assert not (tmp_path / "tor").exists()


def test_a_foreign_owned_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, TOR_UID, TOR_UID)
    result = run_node(tmp_path, state)
    assert result.returncode == 2, result.stderr
    assert f"node.state_dir: {state} is owned by uid {TOR_UID}" in result.stderr


def test_a_state_dir_that_is_a_symlink_in_a_shared_folder_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may plant a name here
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shared / "state").symlink_to(elsewhere)
    result = run_node(tmp_path, shared / "state")
    assert result.returncode == 2, result.stderr
    assert "symbolic link" in result.stderr


# --- values that reach a torrc ----------------------------------------------------------------


INJECTED = "/var/lib/rustbalance/tor\nControlPort 0.0.0.0:9051"


@pytest.mark.parametrize("key", ["data_dir", "hidden_service_dir", "torrc_include"])
def test_a_newline_in_a_tor_path_is_a_config_error(tmp_path: Path, key: str) -> None:
    mode = "system" if key == "torrc_include" else "managed"
    with pytest.raises(ConfigProblems) as raised:
        parse_config(
            '[node]\nid = "a"\n[master]\nidentity_key_path = "k"\n'
            '[target]\naddress = "127.0.0.1:1"\n'
            # TOML's \n escape: the value holds a real newline.
            f'[tor]\nmode = "{mode}"\n{key} = "/var/lib/x\\nControlPort 0.0.0.0:9051"\n',
            tmp_path,
        )
    assert raised.value.problems == (
        f"tor.{key}: must not contain control characters (a torrc value is one line)",
    )


def test_managed_tor_refuses_a_data_dir_that_would_inject_a_line() -> None:
    """Defence in depth: the tor layer writes the torrc and checks it again."""
    with pytest.raises(TorProcessError, match="DataDirectory"):
        ManagedTor(INJECTED, socks_port=1, control_port=2).torrc_text()
