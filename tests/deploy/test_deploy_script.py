"""deploy/deploy.sh run for real against a scratch root (RB_ROOT).

apt-get, dpkg-query, python3 (venv creation), pip, modprobe, systemctl, ip, the user database
tools (getent, useradd, userdel), chown and the ``rustbalance`` CLI are stubs on PATH that record
their argv (and the CLI its stdin): this host's users and packages must not change. These tests
are about the script's own file operations, modes, idempotence, clean-up and how it hands
secrets to the CLI; tests/systemd/test_container.py runs the same script for real, with real
users, packages and systemd, in a booted Debian container. Everything else (install, find, awk,
chmod, mktemp...) is the real tool.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "deploy.sh"
UNIT = REPO / "deploy" / "rustbalance.service"
SYSTEM_TOR_DROPIN = REPO / "deploy" / "system-tor.conf"

OPERATOR_TORRC = (
    "## The operator's own torrc: deploy.sh must leave every line of it alone.\n"
    "Log notice syslog\n"
    "SocksPolicy accept 127.0.0.1\n"
    "#%include /etc/tor/torrc.d/\n"
)
INCLUDE_LINE = "%include /etc/tor/torrc.d/"
PASSPHRASE = "pass-Phrase-that-must-stay-secret-71"
JOIN_TOKEN = "rbj2-SECRETjoinTOKENthatMustNeverAppearInArgv0123456789"
STUB_MASTER_KEY = "stub-master-key-SECRET-5f1e"
STUB_ISSUED_TOKEN = "rbj2-ISSUEDtokenSECRET-9a8b"

# One stub for every command: it records "name arg..." and then acts by name.
STUB = r"""#!/usr/bin/env bash
set -euo pipefail
name="$(basename "$0")"
{ printf '%s' "$name"; for a in "$@"; do printf ' %s' "$a"; done; printf '\n'; } >>"$STUB_LOG"
case "$name" in
python3)
    if [[ "${1:-}" == -m && "${2:-}" == venv ]]; then
        mkdir -p "$3/bin"
        for tool in python pip rustbalance; do cp "$0" "$3/bin/$tool"; done
    fi
    ;;
systemctl)
    [[ "${1:-}" != is-active ]] || [[ -e "$STUB_STATE/active" ]]
    ;;
dpkg-query)
    # Installed only when the test says so; then the script must not touch apt at all.
    if [[ -e "$STUB_STATE/packages-installed" ]]; then printf installed; else exit 1; fi
    ;;
getent)
    # getent passwd|group NAME: users and groups of the stubbed host live in $STUB_STATE.
    [[ -e "$STUB_STATE/$1-$2" ]]
    ;;
useradd)
    touch "$STUB_STATE/passwd-${*: -1}" "$STUB_STATE/group-${*: -1}"
    ;;
userdel)
    rm -f "$STUB_STATE/passwd-$1" "$STUB_STATE/group-$1"
    ;;
ip)
    [[ "$*" != "link show dev wg-rb" ]] || [[ -e "$STUB_STATE/wg-rb" ]]
    ;;
rustbalance)
    cmd="$1"; shift
    conf=""; pass_file=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --config-dir) conf="$2"; shift ;;
        --passphrase-file) pass_file="$2"; shift ;;
        esac
        shift
    done
    [[ -z "$pass_file" ]] || cat "$pass_file" >"$STUB_STATE/passphrase-seen"
    # Deliberately sloppy modes: deploy.sh must lock them down afterwards.
    mkdir -p "$conf/keys"; chmod 0755 "$conf/keys"
    printf '[node]\nid = "node-1"\n' >"$conf/config.toml"
    printf '%s' "$STUB_MASTER_KEY" >"$conf/master.key"
    printf 'wg-private\n' >"$conf/keys/wireguard.key"
    chmod 0644 "$conf/config.toml" "$conf/master.key" "$conf/keys/wireguard.key"
    if [[ "$cmd" == init ]]; then
        printf '%s' "$STUB_ISSUED_TOKEN" >"$conf/join-token.txt"
        chmod 0644 "$conf/join-token.txt"
    else
        cat >"$STUB_STATE/join-stdin"
    fi
    ;;
esac
"""


@dataclass
class Host:
    root: Path
    stubs: Path
    state: Path
    log: Path
    work: Path

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.stubs}:{os.environ['PATH']}",
            "RB_ROOT": str(self.root),
            "STUB_LOG": str(self.log),
            "STUB_STATE": str(self.state),
            "STUB_MASTER_KEY": STUB_MASTER_KEY,
            "STUB_ISSUED_TOKEN": STUB_ISSUED_TOKEN,
            "LC_ALL": "C",
        }

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def path(self, relative: str) -> Path:
        return self.root / relative

    def passphrase_file(self) -> Path:
        path = self.work / "passphrase"
        path.write_text(PASSPHRASE)
        path.chmod(0o600)
        return path

    def init(self) -> subprocess.CompletedProcess[str]:
        return self.ok(
            "--init",
            "--endpoint",
            "203.0.113.5:51820",
            "--target",
            "127.0.0.1:8080",
            "--passphrase-file",
            str(self.passphrase_file()),
        )

    def init_system_tor(self) -> subprocess.CompletedProcess[str]:
        return self.ok(
            "--init",
            "--endpoint",
            "203.0.113.5:51820",
            "--target",
            "127.0.0.1:8080",
            "--tor-mode",
            "system",
        )

    def boot_systemd(self) -> None:
        self.path("run/systemd/system").mkdir(parents=True)


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every path under ``root`` with its type, permission bits and (for files) content."""
    result: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        rel = str(path.relative_to(root))
        if stat.S_ISDIR(info.st_mode):
            result[rel] = ("dir", mode, b"")
        else:
            result[rel] = ("file", mode, path.read_bytes())
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "root"
    for directory in (
        "etc/tor",
        "etc/systemd/system",
        "etc/wireguard",
        "etc/polkit-1/rules.d",  # polkitd's (installed with it)
        "etc/apparmor.d/local",  # apparmor's; local/system_tor is tor's profile's include
        "opt",
        "var/lib/tor",
    ):
        (root / directory).mkdir(parents=True)
    (root / "etc/tor/torrc").write_text(OPERATOR_TORRC)
    (root / "etc/apparmor.d/local/system_tor").write_text("# the operator's own rule\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    stubbed = ("apt-get", "dpkg-query", "python3", "modprobe", "systemctl", "ip", "rustbalance")
    for name in (*stubbed, "getent", "useradd", "userdel", "chown"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "passwd-debian-tor").touch()  # the tor package's user
    work = tmp_path / "work"
    work.mkdir()
    return Host(root, stubs, state, tmp_path / "argv.log", work)


def test_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""


def test_script_uses_strict_mode() -> None:
    assert "\nset -euo pipefail\n" in SCRIPT.read_text()


def test_init_installs_packages_venv_user_and_unit_and_leaves_tor_alone(host: Host) -> None:
    result = host.init()
    calls = host.calls()
    assert "apt-get install -y -q tor wireguard-tools python3-venv" in calls
    venv = host.path("opt/rustbalance/venv")
    assert f"python3 -m venv {venv}" in calls
    assert f"pip install --quiet --upgrade {REPO}" in calls
    assert "modprobe wireguard" in calls
    assert (
        "useradd --system --user-group --home-dir /var/lib/rustbalance --no-create-home "
        "--shell /usr/sbin/nologin --comment RustBalance daemon rustbalance"
    ) in calls
    # A managed node (the default) runs its own tor: the system tor is not touched.
    assert host.path("etc/tor/torrc").read_text() == OPERATOR_TORRC
    assert not host.path("etc/tor/torrc.d/rustbalance-base.conf").exists()
    assert not host.path("var/lib/tor/rustbalance_node_hs").exists()
    assert not host.path("etc/systemd/system/rustbalance.service.d").exists()
    unit = host.path("etc/systemd/system/rustbalance.service")
    assert unit.read_bytes() == UNIT.read_bytes()
    assert mode(unit) == 0o644
    assert not any(call.startswith("systemctl") for call in calls)
    assert "systemctl daemon-reload && systemctl enable --now rustbalance.service" in result.stdout


def test_system_tor_mode_configures_tor_and_installs_the_drop_in(host: Host) -> None:
    result = host.init_system_tor()
    calls = host.calls()
    assert "chown debian-tor:debian-tor " + str(host.path("var/lib/tor/rustbalance_node_hs")) in (
        calls
    )
    base = host.path("etc/tor/torrc.d/rustbalance-base.conf").read_text().splitlines()
    settings = [line for line in base if line and not line.startswith("#")]
    assert settings == [
        "SocksPort 9050",
        "ControlPort 9051",
        "CookieAuthentication 1",
        "CookieAuthFileGroupReadable 1",
    ]
    torrc = host.path("etc/tor/torrc").read_text()
    assert torrc.startswith(OPERATOR_TORRC)
    assert torrc.splitlines().count(INCLUDE_LINE) == 1

    dropin = host.path("etc/systemd/system/rustbalance.service.d/system-tor.conf")
    assert dropin.read_bytes() == SYSTEM_TOR_DROPIN.read_bytes()
    assert mode(dropin) == 0o644
    # The unprivileged daemon restarts tor@default through polkit, not with CAP_KILL.
    rule = host.path("etc/polkit-1/rules.d/50-rustbalance-tor.rules")
    assert rule.read_bytes() == (REPO / "deploy" / "rustbalance-tor.rules").read_bytes()
    assert mode(rule) == 0o644
    assert "apt-get install -y -q tor wireguard-tools python3-venv polkitd" in calls
    # Debian's tor@default runs confined (AppArmorProfile=-system_tor), which would refuse the
    # proxy's unix socket: the profile's local include allows exactly that path.
    apparmor = host.path("etc/apparmor.d/local/system_tor")
    lines = apparmor.read_text().splitlines()
    assert lines[0] == "# the operator's own rule"
    assert lines.count("/run/rustbalance/proxy.sock rw,") == 1
    host.init_system_tor()
    assert apparmor.read_text().splitlines() == lines  # once, however often deploy.sh runs
    # Not booted with systemd: nothing is started, the script says what it would run.
    assert not any(call.startswith("systemctl") for call in calls)
    assert "systemctl daemon-reload && systemctl enable --now rustbalance.service" in result.stdout
    # Back to managed: the drop-in and the rule go, the unit is the plain one again.
    host.init()
    assert not dropin.parent.exists()
    assert not rule.exists()
    assert apparmor.read_text() == "# the operator's own rule\n"


def test_packages_already_installed_need_no_apt(host: Host) -> None:
    (host.state / "packages-installed").touch()
    result = host.init()
    assert not any(call.startswith("apt-get") for call in host.calls())
    assert "already installed: tor wireguard-tools python3-venv" in result.stdout


def test_service_user_owns_config_and_state_and_is_created_once(host: Host) -> None:
    host.init()
    conf, state = host.path("etc/rustbalance"), host.path("var/lib/rustbalance")
    calls = host.calls()
    assert f"chown -R -P rustbalance:rustbalance {conf}" in calls
    assert f"chown -R -P rustbalance:rustbalance {state}" in calls
    # After the CLI wrote the keys (as root), so they end up the service user's.
    init_call = next(i for i, call in enumerate(calls) if call.startswith("rustbalance init"))
    assert calls.index(f"chown -R -P rustbalance:rustbalance {conf}") > init_call
    host.log.unlink()
    host.init()
    assert not any(call.startswith("useradd") for call in host.calls())
    host.ok("--clean", "--yes")
    assert "userdel rustbalance" in host.calls()
    assert not (host.state / "passwd-rustbalance").exists()


def test_no_start_starts_nothing_even_under_systemd(host: Host) -> None:
    host.boot_systemd()
    result = host.ok(
        "--init", "--endpoint", "203.0.113.5:51820", "--target", "127.0.0.1:8080", "--no-start"
    )
    assert not any(call.startswith("systemctl") for call in host.calls())
    assert "systemctl daemon-reload && systemctl enable --now rustbalance.service" in result.stdout


def test_init_calls_the_cli_with_flags_only(host: Host) -> None:
    host.init()
    conf = host.path("etc/rustbalance")
    init_calls = [c for c in host.calls() if c.startswith("rustbalance init")]
    assert init_calls == [
        f"rustbalance init --config-dir {conf} --endpoint 203.0.113.5:51820 --tor-mode managed "
        f"--passphrase-file {host.work / 'passphrase'} --target 127.0.0.1:8080"
    ]
    # The CLI got the passphrase through the file, not through argv.
    assert (host.state / "passphrase-seen").read_text() == PASSPHRASE


def test_modes_private_dirs_and_secret_files(host: Host) -> None:
    host.init()
    conf = host.path("etc/rustbalance")
    assert mode(conf) == 0o700
    assert mode(conf / "keys") == 0o700
    files = [p for p in conf.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.toml", "master.key", "join-token.txt"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert mode(host.path("var/lib/rustbalance")) == 0o700


def test_system_tor_modes(host: Host) -> None:
    host.init_system_tor()
    assert mode(host.path("var/lib/tor/rustbalance_node_hs")) == 0o700
    # tor re-reads its config as debian-tor: the include file must stay world-readable.
    assert mode(host.path("etc/tor/torrc.d/rustbalance-base.conf")) == 0o644


@pytest.mark.parametrize("tor_mode", ["managed", "system"])
def test_init_twice_is_idempotent(host: Host, tor_mode: str) -> None:
    init = host.init_system_tor if tor_mode == "system" else host.init
    init()
    first = snapshot(host.root)
    second_run = init()
    assert snapshot(host.root) == first
    includes = host.path("etc/tor/torrc").read_text().splitlines().count(INCLUDE_LINE)
    assert includes == (1 if tor_mode == "system" else 0)
    calls = host.calls()
    assert sum(c.startswith("rustbalance init") for c in calls) == 1
    assert sum(c.startswith("python3 -m venv") for c in calls) == 1
    assert "already initialised" in second_run.stdout


def test_init_keeps_an_operators_own_include(host: Host) -> None:
    torrc = host.path("etc/tor/torrc")
    original = OPERATOR_TORRC + "%include /etc/tor/torrc.d/*.conf\n"
    torrc.write_text(original)
    host.init_system_tor()
    assert torrc.read_text() == original  # already includes our file: nothing added
    host.ok("--clean", "--yes")
    assert torrc.read_text() == original  # and the operator's line survives --clean


def test_torrc_without_final_newline_gets_a_separate_include_line(host: Host) -> None:
    torrc = host.path("etc/tor/torrc")
    torrc.write_text("Log notice syslog")
    host.init_system_tor()
    lines = torrc.read_text().splitlines()
    assert lines[0] == "Log notice syslog"
    assert lines[-1] == INCLUDE_LINE


@pytest.mark.parametrize("tor_mode", ["managed", "system"])
def test_clean_removes_everything_it_added(host: Host, tor_mode: str) -> None:
    pristine = snapshot(host.root)
    if tor_mode == "system":
        host.init_system_tor()
    else:
        host.init()
    # What the daemon itself writes at run time, which --clean must remove as well.
    host.path("etc/tor/torrc.d/rustbalance.conf").write_text("HiddenServiceDir x\n")
    host.path("etc/wireguard/wg-rb.conf").write_text("[Interface]\nPrivateKey = k\n")
    if tor_mode == "system":
        host.path("var/lib/tor/rustbalance_node_hs/hostname").write_text("x.onion\n")
    else:
        host.path("var/lib/rustbalance/tor/hidden_service").mkdir(parents=True)
        host.path("var/lib/rustbalance/tor/hidden_service/hostname").write_text("x.onion\n")
    host.path("var/lib/rustbalance/state.json").write_text("{}")
    host.ok("--clean", "--yes")
    assert snapshot(host.root) == pristine
    assert host.path("etc/tor/torrc").read_text() == OPERATOR_TORRC


def test_clean_leaves_other_files_in_torrc_d(host: Host) -> None:
    host.init_system_tor()
    other = host.path("etc/tor/torrc.d/operator.conf")
    other.write_text("ExitRelay 0\n")
    host.ok("--clean", "--yes")
    assert other.read_text() == "ExitRelay 0\n"
    assert not host.path("etc/tor/torrc.d/rustbalance-base.conf").exists()


def test_clean_on_a_clean_host_changes_nothing(host: Host) -> None:
    pristine = snapshot(host.root)
    host.ok("--clean", "--yes")
    assert snapshot(host.root) == pristine


def test_clean_needs_confirmation(host: Host) -> None:
    host.init()
    before = snapshot(host.root)
    result = host.run("--clean")  # stdin is not a terminal and there is no --yes
    assert result.returncode != 0
    assert "--yes" in result.stderr
    assert snapshot(host.root) == before


def test_systemd_host_init_enables_unit_and_restarts_tor(host: Host) -> None:
    host.boot_systemd()
    host.init_system_tor()
    calls = host.calls()
    assert "systemctl restart tor@default.service" in calls
    assert calls.index("systemctl daemon-reload") < calls.index(
        "systemctl enable --now rustbalance.service"
    )
    # A second run changes no tor setting, so tor is not restarted again.
    host.log.unlink()
    host.init_system_tor()
    assert "systemctl restart tor@default.service" not in host.calls()


def test_systemd_host_managed_init_enables_unit_and_never_restarts_tor(host: Host) -> None:
    host.boot_systemd()
    host.init()
    calls = host.calls()
    assert "systemctl enable --now rustbalance.service" in calls
    assert not any("tor@default" in call for call in calls)


def test_systemd_host_rerun_restarts_an_active_daemon(host: Host) -> None:
    host.boot_systemd()
    host.init()
    (host.state / "active").touch()
    host.log.unlink()
    host.init()
    assert "systemctl restart rustbalance.service" in host.calls()


def test_systemd_host_clean_stops_unit_and_wireguard(host: Host) -> None:
    host.boot_systemd()
    pristine = snapshot(host.root)
    host.init()
    (host.state / "wg-rb").touch()  # the interface exists
    host.ok("--clean", "--yes")
    calls = host.calls()
    assert "systemctl disable --now rustbalance.service" in calls
    assert "systemctl disable --now wg-quick@wg-rb.service" in calls
    assert "ip link delete dev wg-rb" in calls
    assert calls[-1] == "systemctl restart tor@default.service"
    assert snapshot(host.root) == pristine


def test_join_passes_token_file_on_stdin(host: Host) -> None:
    token_file = host.work / "token"
    token_file.write_text(JOIN_TOKEN)
    token_file.chmod(0o600)
    host.ok("--join", "--endpoint", "198.51.100.7:51820", "--token-file", str(token_file))
    assert (host.state / "join-stdin").read_text() == JOIN_TOKEN
    join_calls = [c for c in host.calls() if c.startswith("rustbalance join")]
    assert join_calls == [
        f"rustbalance join --config-dir {host.path('etc/rustbalance')} "
        "--endpoint 198.51.100.7:51820 --tor-mode managed --token-file -"
    ]
    assert mode(host.path("etc/rustbalance/master.key")) == 0o600
    # A managed joiner still needs the system tor's SOCKS port to reach the master onion, and
    # nothing more from it.
    base = host.path("etc/tor/torrc.d/rustbalance-base.conf").read_text().splitlines()
    assert [line for line in base if line and not line.startswith("#")] == ["SocksPort 9050"]


def test_join_reads_token_from_stdin(host: Host) -> None:
    host.ok(
        "--join",
        "--endpoint",
        "198.51.100.7:51820",
        "--priority",
        "20",
        "--token-file",
        "-",
        stdin=JOIN_TOKEN + "\n",
    )
    assert (host.state / "join-stdin").read_text() == JOIN_TOKEN + "\n"


def test_join_warns_about_a_world_readable_token_file(host: Host) -> None:
    token_file = host.work / "token"
    token_file.write_text(JOIN_TOKEN)
    token_file.chmod(0o644)
    result = host.ok("--join", "--endpoint", "198.51.100.7:51820", "--token-file", str(token_file))
    assert "world-readable" in result.stdout


def test_join_twice_joins_once(host: Host) -> None:
    token_file = host.work / "token"
    token_file.write_text(JOIN_TOKEN)
    args = ("--join", "--endpoint", "198.51.100.7:51820", "--token-file", str(token_file))
    host.ok(*args)
    first = snapshot(host.root)
    host.ok(*args)
    assert snapshot(host.root) == first
    assert sum(c.startswith("rustbalance join") for c in host.calls()) == 1


def test_no_secret_in_any_argv_or_output(host: Host) -> None:
    host.boot_systemd()
    init = host.init()
    token_file = host.work / "token"
    token_file.write_text(JOIN_TOKEN)
    host.ok("--clean", "--yes")
    join = host.ok(
        "--join",
        "--endpoint",
        "198.51.100.7:51820",
        "--token-file",
        str(token_file),
        "--passphrase-file",
        str(host.passphrase_file()),
    )
    recorded = host.log.read_text()
    assert len(recorded.splitlines()) > 10  # the stubs really ran
    output = init.stdout + init.stderr + join.stdout + join.stderr
    for secret in (PASSPHRASE, JOIN_TOKEN, STUB_MASTER_KEY, STUB_ISSUED_TOKEN):
        assert secret not in recorded
        assert secret not in output


@pytest.mark.parametrize(
    "flag", ["--token", "--passphrase", "--master-key", "--cluster-token", "--join-secret"]
)
def test_secret_flags_are_refused(host: Host, flag: str) -> None:
    result = host.run("--join", "--endpoint", "198.51.100.7:51820", flag, JOIN_TOKEN)
    assert result.returncode == 2
    assert "never taken on the command line" in result.stderr
    assert host.calls() == []  # refused before anything ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "one of --init, --join, --clean is required"),
        (("--init", "--join"), "choose one of"),
        (("--init", "--target", "127.0.0.1:80"), "needs --endpoint"),
        (("--init", "--endpoint", "203.0.113.5:51820"), "needs --target"),
        (("--join", "--endpoint", "203.0.113.5:51820"), "needs --token-file"),
        (("--join", "--endpoint", "1.2.3.4:5", "--token-file", "/nonexistent"), "cannot read"),
        (("--init", "--endpoint"), "needs a value"),
        (("--bogus",), "unknown argument"),
        (
            ("--init", "--endpoint", "1.2.3.4:5", "--target", "1.2.3.4:6", "--tor-mode", "x"),
            "--tor-mode must be managed or system",
        ),
    ],
)
def test_usage_errors(host: Host, args: tuple[str, ...], message: str) -> None:
    result = host.run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert host.calls() == []


def test_help_exits_zero(host: Host) -> None:
    result = host.ok("--help")
    assert "--init" in result.stdout
    assert "--token-file" in result.stdout
