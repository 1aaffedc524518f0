"""deploy/rustbalance.service: systemd accepts it, and every directive has the intended value."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest

UNIT_PATH = Path(__file__).resolve().parents[2] / "deploy" / "rustbalance.service"
EXEC_START = "/opt/rustbalance/venv/bin/rustbalance run --config /etc/rustbalance/config.toml"

# (section, directive, expected value). Multi-valued directives are compared as sets below.
EXPECTED: list[tuple[str, str, str]] = [
    ("Unit", "Description", "RustBalance - Tor onion service load balancer"),
    ("Unit", "After", "network-online.target tor@default.service"),
    ("Unit", "Wants", "network-online.target tor@default.service"),
    ("Unit", "StartLimitIntervalSec", "300"),
    ("Unit", "StartLimitBurst", "10"),
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    ("Service", "WatchdogSec", "60"),
    ("Service", "ExecStart", EXEC_START),
    ("Service", "Restart", "always"),
    ("Service", "RestartSec", "3"),
    ("Service", "TimeoutStopSec", "10"),
    ("Service", "MemoryMax", "512M"),
    ("Service", "UMask", "0077"),
    (
        "Service",
        "CapabilityBoundingSet",
        "CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_KILL CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE",
    ),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectSystem", "strict"),
    (
        "Service",
        "ReadWritePaths",
        "/var/lib/rustbalance /etc/rustbalance /var/lib/tor/rustbalance_node_hs /etc/tor/torrc.d",
    ),
    ("Service", "ProtectHome", "yes"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectKernelLogs", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "ProtectClock", "yes"),
    ("Service", "ProtectHostname", "yes"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "RestrictRealtime", "yes"),
    ("Service", "RestrictSUIDSGID", "yes"),
    ("Service", "LockPersonality", "yes"),
    ("Service", "MemoryDenyWriteExecute", "yes"),
    ("Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Install", "WantedBy", "multi-user.target"),
]
SET_VALUED = {
    "After",
    "Wants",
    "CapabilityBoundingSet",
    "ReadWritePaths",
    "RestrictAddressFamilies",
}


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    return parse_unit(UNIT_PATH.read_text())


@pytest.mark.parametrize(
    ("section", "key", "expected"), EXPECTED, ids=[f"{s}.{k}" for s, k, _ in EXPECTED]
)
def test_directive(unit: configparser.ConfigParser, section: str, key: str, expected: str) -> None:
    assert unit.has_option(section, key), f"[{section}] lacks {key}="
    value = unit.get(section, key)
    if key in SET_VALUED:
        assert set(value.split()) == set(expected.split())
        assert len(value.split()) == len(set(value.split())), "listed twice"
    else:
        assert value == expected


def test_no_unreviewed_directives(unit: configparser.ConfigParser) -> None:
    # A directive added without a matching expectation here would escape review.
    present = {(s, k) for s in unit.sections() for k in unit.options(s)}
    assert present == {(s, k) for s, k, _ in EXPECTED}


def test_start_limits_are_not_in_service_section(unit: configparser.ConfigParser) -> None:
    # systemd ignores StartLimit*= in [Service] (it only reads them in [Unit]) since v230.
    assert not unit.has_option("Service", "StartLimitIntervalSec")
    assert not unit.has_option("Service", "StartLimitBurst")


def test_no_user_directive_means_root_with_bounded_capabilities(
    unit: configparser.ConfigParser,
) -> None:
    # Running as root is only acceptable with the capability bounding set in place.
    assert not unit.has_option("Service", "User")
    caps = set(unit.get("Service", "CapabilityBoundingSet").split())
    assert "CAP_SYS_ADMIN" not in caps
    assert "CAP_SYS_MODULE" not in caps


def verify_problems(text: str, tmp_path: Path) -> list[str]:
    """Run ``systemd-analyze verify`` on ``text``; return the lines about our unit.

    ExecStart is pointed at a real executable in ``tmp_path`` (verify refuses a missing binary),
    keeping its arguments. systemd-analyze exits 0 on unknown keys and bad values, so the check
    also fails on any diagnostic line that names the unit file.
    """
    exe = tmp_path / "rustbalance"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    patched = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, count=1, flags=re.MULTILINE)
    unit_file = tmp_path / "rustbalance.service"
    unit_file.write_text(patched)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if str(unit_file) in line or "rustbalance.service" in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}")
    return problems


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert verify_problems(UNIT_PATH.read_text(), tmp_path) == []


@pytest.mark.parametrize(
    ("bad_line", "after"),
    [
        ("BogusDirective=1", "[Service]"),
        ("Restart=sometimes", "[Service]"),
        ("ProtectSystem=very", "[Service]"),
        ("MemoryMax=lots", "[Service]"),
        ("RestrictAddressFamilies=AF_NOPE", "[Service]"),
    ],
)
def test_verify_catches_a_bad_directive(tmp_path: Path, bad_line: str, after: str) -> None:
    # Proves the check above is real: the same pipeline flags an injected mistake.
    text = UNIT_PATH.read_text().replace(after, f"{after}\n{bad_line}", 1)
    assert verify_problems(text, tmp_path) != []


def test_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    exe_dir = tmp_path / "bin"
    exe_dir.mkdir()
    text = UNIT_PATH.read_text()
    unit_file = tmp_path / "rustbalance.service"
    unit_file.write_text(text.replace(EXEC_START, f"{exe_dir}/absent run"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
