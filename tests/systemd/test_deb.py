"""The Debian package on a clean Debian 12 under a real systemd (issue 18).

``make deb`` builds the package from this checkout (timed; lintian must pass, the Makefile
checks it). A clean Debian 12 (:meth:`nspawn.Rootfs.clean`: systemd and nothing of the
product; apt's cache holds what the package will pull, so the install needs no mirror) boots
in systemd-nspawn sharing the host's network namespace, and the test does what the README's
"Installing from the Debian package" tells an operator to do:

- ``apt-get install ./rustbalance_*.deb`` pulls tor and python3.11 (not installed before);
  the package puts the CLI, the unit, the man page, completions and examples in place,
  creates the ``rustbalance`` user and its 0700 folders, compiles the venv's byte code, and
  neither enables nor starts the unit (there is no config yet);
- ``rustbalance init`` as the service user, the config pointed at the session's private Tor
  network, ``systemctl enable --now``: active, and a real Tor client gets the target's page
  through the master address;
- ``apt-get remove`` stops the node and keeps its config and keys; ``apt-get purge`` leaves
  nothing running and removes every file of the package, the config and the state.

The system tor's units are masked in the clean rootfs: tor comes in as a dependency, and a
test must not start a tor on the real Tor network (a managed node runs its own tor anyway).
Runs as root; measured figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.apps import NamedHTTPServer
from tests.systemd.nspawn import (
    REPO,
    Container,
    ContainerError,
    Rootfs,
    _locked,
    cache_root,
    why_not_runnable,
)
from tests.systemd.test_container import (
    UNIT,
    UNIT_TEXT,
    Node,
    assert_serving,
    configure_for_the_test_network,
)

pytestmark = pytest.mark.tor

MAKE_TIMEOUT = 900.0
APT_TIMEOUT = 600.0
CONFIG_DIR = "/etc/rustbalance"
STATE_DIR = "/var/lib/rustbalance"
VENV = "/usr/lib/rustbalance"
PACKAGE_FILES = (
    "/usr/bin/rustbalance",
    f"{VENV}/bin/rustbalance",
    "/lib/systemd/system/rustbalance.service",
    "/usr/lib/sysusers.d/rustbalance.conf",
    "/usr/share/man/man1/rustbalance.1.gz",
    "/usr/share/bash-completion/completions/rustbalance",
    "/usr/share/zsh/vendor-completions/_rustbalance",
    "/usr/share/doc/rustbalance/examples/config.example.toml",
    "/usr/share/doc/rustbalance/copyright",
)
# Every compiled extension of the venv (stripped by dh_strip): each must still load.
EXTENSIONS = (
    "cryptography.hazmat.bindings._rust",
    "nacl._sodium",
    "_argon2_cffi_bindings._ffi",
    "_cffi_backend",
    "uvloop.loop",
    "yaml._yaml",
)


@dataclass
class Installed:
    """The container with the package installed, and what was measured on the way."""

    container: Container
    deb: Path
    before: dict[str, str]  # package -> dpkg status before the install ("" = unknown)
    figures: dict[str, float] = field(default_factory=dict)

    def ok(self, *argv: str, timeout: float = 60.0) -> str:
        return self.container.ok(list(argv), timeout=timeout)

    def status(self, package: str) -> str:
        out = self.container.run(["dpkg-query", "-W", "-f", "${db:Status-Status}", package])
        return out.stdout if out.returncode == 0 else ""

    def user(self) -> tuple[int, int, str, str]:
        passwd = self.container.path("/etc/passwd").read_text()
        (entry,) = [line for line in passwd.splitlines() if line.startswith("rustbalance:")]
        _, _, uid, gid, _, home, shell = entry.split(":")
        return int(uid), int(gid), home, shell

    def processes_of_the_package(self) -> str:
        """Every process of the service user or running from the venv ("" when none)."""
        users = self.container.run(["pgrep", "-a", "-u", "rustbalance"]).stdout
        venv = self.container.run(["pgrep", "-a", "-f", VENV]).stdout
        return users + venv


def build_deb(out: Path) -> tuple[Path, float]:
    """``make deb`` into ``out`` (the checkout's build/ stays alone); the .deb and seconds.
    The wheelhouse is cached per machine, and one build at a time fills it."""
    started = time.monotonic()
    with _locked(cache_root() / ".deb-wheelhouse.lock"):
        result = subprocess.run(
            ["make", "-C", str(REPO), "deb", f"DEB_OUT={out}",
             f"DEB_WHEELHOUSE={cache_root() / 'deb-wheelhouse'}"],
            capture_output=True, text=True, timeout=MAKE_TIMEOUT, check=False,
        )  # fmt: skip
    elapsed = time.monotonic() - started
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, f"make deb failed:\n{tail}"
    (deb,) = out.glob("rustbalance_*.deb")
    return deb, elapsed


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    reason = why_not_runnable()
    if reason is not None:
        pytest.fail(f"the Debian package test cannot run here: {reason}", pytrace=False)
    deb, build_seconds = build_deb(tmp_path_factory.mktemp("deb"))
    rootfs = Rootfs.clean(deb)
    figures = {"make_deb_s": build_seconds, "deb_mb": deb.stat().st_size / 1e6}
    if rootfs.built_seconds is not None:
        figures["rootfs_build_s"] = rootfs.built_seconds
    try:
        with Container(rootfs, tmp_path_factory.mktemp("debroot")) as container:
            assert container.boot_seconds is not None
            figures["boot_s"] = container.boot_seconds
            node = Installed(container, deb, {}, figures)
            node.before = {p: node.status(p) for p in ("tor", "python3.11", "rustbalance")}
            # Readable by apt's sandbox user (_apt), as a downloaded package would be.
            inside = f"/srv/{deb.name}"
            node.container.path(inside).write_bytes(deb.read_bytes())
            os.chmod(node.container.path(inside), 0o644)
            started = time.monotonic()
            result = container.run(
                ["apt-get", "install", "-y", "-q", inside],
                env={"DEBIAN_FRONTEND": "noninteractive"},
                timeout=APT_TIMEOUT,
            )
            figures["apt_install_s"] = time.monotonic() - started
            assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
            yield node
            print(f"Debian package figures: {node.figures}")
    except ContainerError as exc:
        pytest.fail(f"systemd container: {exc}", pytrace=False)


# -- install ------------------------------------------------------------------------------


def test_apt_pulls_the_dependencies_into_a_clean_system(installed: Installed) -> None:
    # Nothing of it was there: apt resolved the package's Depends (and Recommends) itself.
    assert installed.before == {"tor": "", "python3.11": "", "rustbalance": ""}
    for package in ("rustbalance", "tor", "python3.11", "wireguard-tools", "iproute2"):
        assert installed.status(package) == "installed", package
    version = installed.ok("rustbalance", "--version").strip()
    assert version.endswith("0.1.0"), version


def test_the_package_installs_its_files_and_the_unit(installed: Installed) -> None:
    for path in PACKAGE_FILES:
        assert os.path.lexists(installed.container.path(path)), path
    # The repo's unit, with the package's path to the CLI: the same sandbox as deploy.sh's.
    unit = installed.container.path(f"/lib/systemd/system/{UNIT}").read_text()
    expected = UNIT_TEXT.replace("/opt/rustbalance/venv/bin/rustbalance", "/usr/bin/rustbalance")
    assert unit.splitlines()[1:] == expected.splitlines()[1:]
    assert "/opt/rustbalance" not in unit
    # Installed, but neither enabled nor started: there is no config yet.
    enabled = installed.container.run(["systemctl", "is-enabled", UNIT]).stdout.strip()
    active = installed.container.run(["systemctl", "is-active", UNIT]).stdout.strip()
    assert (enabled, active) == ("disabled", "inactive")
    assert not installed.container.path(f"{CONFIG_DIR}/config.toml").exists()


def test_the_service_user_and_its_private_folders(installed: Installed) -> None:
    uid, gid, home, shell = installed.user()
    assert uid < 1000 and home == STATE_DIR and shell == "/usr/sbin/nologin"
    for folder in (CONFIG_DIR, STATE_DIR):
        info = installed.container.path(folder).stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (uid, gid, 0o700), folder


def test_the_venv_is_complete_compiled_and_without_pip(installed: Installed) -> None:
    python = f"{VENV}/bin/python3"
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    installed.ok(python, "-c", code, *EXTENSIONS)
    # Only the locked packages: no pip or setuptools that could change the venv later.
    for tool in ("pip", "setuptools"):
        result = installed.container.run([python, "-c", f"import {tool}"])
        assert result.returncode != 0, f"{tool} is in the venv"
    # postinst compiled the byte code (the daemon cannot write it under /usr).
    cached = list(installed.container.path(VENV).rglob("rustbalance/cli/__pycache__/*.pyc"))
    assert cached


# -- run ----------------------------------------------------------------------------------


def test_a_configured_node_serves_through_tor(
    installed: Installed, tor_network: PrivateTorNetwork
) -> None:
    target = NamedHTTPServer("systemd")
    try:
        # As the README says: init as the service user, so the keys are its own (0600).
        started = time.monotonic()
        init = installed.container.run(
            ["runuser", "-u", "rustbalance", "--", "rustbalance", "init",
             "--config-dir", CONFIG_DIR, "--endpoint", "127.0.0.1:51820",
             "--tor-mode", "managed", "--target", f"127.0.0.1:{target.port}",
             "--passphrase-file", "-"],
            input="a passphrase for the package test\n",
            timeout=300,
        )  # fmt: skip
        installed.figures["init_s"] = time.monotonic() - started
        assert init.returncode == 0, init.stderr[-2000:]  # stdout carries the join token
        uid = installed.user()[0]
        for key in installed.container.path(CONFIG_DIR).iterdir():
            info = key.stat()
            assert (info.st_uid, info.st_mode & 0o777) == (uid, 0o600), key.name
        node = Node(installed.container, tor_network, target, figures=installed.figures)
        configure_for_the_test_network(node)
        since = node.now_usec()
        assert node.systemctl("enable", UNIT) == 0
        node.figures["start_s"] = node.start()
        assert_serving(node, since_usec=since)
        status = node.container.ok(["cat", f"/proc/{node.main_pid()}/status"])
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["Uid"].split() == [str(uid)] * 4
    finally:
        target.close()


# -- remove, purge --------------------------------------------------------------------------


def test_remove_stops_the_node_and_keeps_its_config(installed: Installed) -> None:
    assert installed.container.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    started = time.monotonic()
    installed.ok("apt-get", "remove", "-y", "-q", "rustbalance", timeout=APT_TIMEOUT)
    installed.figures["apt_remove_s"] = time.monotonic() - started
    assert installed.processes_of_the_package() == ""
    assert installed.status("rustbalance") == "config-files"
    assert installed.container.path(f"{CONFIG_DIR}/config.toml").exists()
    # The byte code went with it (prerm), so nothing of the venv is left.
    assert not installed.container.path(VENV).exists()
    assert not installed.container.path("/usr/bin/rustbalance").is_symlink()


def test_purge_leaves_nothing_running_and_no_files(installed: Installed) -> None:
    started = time.monotonic()
    installed.ok("apt-get", "purge", "-y", "-q", "rustbalance", timeout=APT_TIMEOUT)
    installed.figures["apt_purge_s"] = time.monotonic() - started
    assert installed.processes_of_the_package() == ""
    assert installed.status("rustbalance") == ""
    for path in (CONFIG_DIR, STATE_DIR, "/run/rustbalance", VENV, *PACKAGE_FILES):
        assert not os.path.lexists(installed.container.path(path)), path
    units = installed.ok("systemctl", "list-units", "--all", "--plain", "--no-legend", "rustb*")
    assert units.strip() == ""
    # Nothing of the node's tor either (the system tor's units are masked in this rootfs).
    tor = installed.container.run(["pgrep", "-a", "-x", "tor"])
    assert (tor.returncode, tor.stdout) == (1, "")
    # The user stays (Debian keeps system users: a reused uid must not inherit files).
    assert installed.user()[0] < 1000
