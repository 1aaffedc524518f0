"""Tor process management: ManagedTor for real, SystemTor's fallback order with a fake runner.

PID 1 is not systemd on this machine (tor.md §13.1), so a real ``systemctl`` cannot run here:
SystemTor is exercised through an injected command runner that records the commands it gets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from rustbalance.errors import TorProcessError
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.tor.process import (
    CommandResult,
    ManagedTor,
    SystemTor,
    TorProcess,
    pid_is_alive,
    run_command,
)

# Offline tor: starts in about a second, opens its control port, never touches the network.
OFFLINE = ["DisableNetwork 1"]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def started_tors() -> Iterator[list[ManagedTor]]:
    """ManagedTors a test registers here are killed by PID if the test leaves them running."""
    tors: list[ManagedTor] = []
    yield tors
    for tor in tors:
        pid = tor.pid
        if pid is not None and pid_is_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def wait_not_running(tor: TorProcess, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not await tor.is_running():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_start_writes_a_private_torrc_and_serves_the_control_port(
    tmp_path: Path, started_tors: list[ManagedTor]
) -> None:
    hs_dir = tmp_path / "hs"
    tor = ManagedTor(
        tmp_path / "tor",
        [*OFFLINE, f"HiddenServiceDir {hs_dir}", "HiddenServicePort 80 127.0.0.1:1"],
        wait_for_bootstrap=False,
    )
    started_tors.append(tor)
    await tor.start()
    assert await tor.is_running()
    assert stat.S_IMODE(tor.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(tor.torrc_path.stat().st_mode) == 0o600
    torrc = tor.torrc_path.read_text()
    assert f"ControlPort 127.0.0.1:{tor.control_port}" in torrc
    assert f"SocksPort 127.0.0.1:{tor.socks_port}" in torrc
    assert "CookieAuthentication 1" in torrc
    assert "DisableNetwork 1" in torrc
    # The caller's onion-service lines took effect: tor created the service's keys.
    assert (hs_dir / "hostname").read_text().strip().endswith(".onion")
    assert tor.control_address == f"127.0.0.1:{tor.control_port}"
    assert tor.socks_address == ("127.0.0.1", tor.socks_port)
    assert port_accepts(tor.control_port)
    assert tor.control_cookie_path.stat().st_size == 32
    pid = tor.pid
    assert pid is not None
    assert "Opened Control listener" in tor.log_path.read_text()
    await tor.stop()
    assert not await tor.is_running()
    assert tor.pid is None
    assert not pid_is_alive(pid)
    assert not port_accepts(tor.control_port)


async def test_restart_keeps_the_ports_and_starts_a_new_process(
    tmp_path: Path, started_tors: list[ManagedTor]
) -> None:
    tor = ManagedTor(tmp_path / "tor", OFFLINE, wait_for_bootstrap=False)
    started_tors.append(tor)
    await tor.start()
    first_pid, ports = tor.pid, (tor.control_port, tor.socks_port)
    await tor.restart()
    try:
        assert await tor.is_running()
        assert tor.pid is not None and tor.pid != first_pid
        assert first_pid is not None and not pid_is_alive(first_pid)
        assert (tor.control_port, tor.socks_port) == ports
        assert port_accepts(tor.control_port)
    finally:
        await tor.stop()


async def test_a_port_taken_before_tor_binds_it_is_picked_again(
    tmp_path: Path, started_tors: list[ManagedTor]
) -> None:
    """Another process binds the control port ManagedTor picked before tor does (two daemons
    starting at once picked the same port: tests/node_e2e/test_cluster.py's node-b died with
    "Could not bind to 127.0.0.1:50613: Address already in use"). Ports ManagedTor picked
    itself are picked again and tor started again; ports the caller chose are not."""
    tor = ManagedTor(tmp_path / "tor", OFFLINE, wait_for_bootstrap=False)
    started_tors.append(tor)
    taken = tor.control_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        await tor.start()
        try:
            assert await tor.is_running()
            assert tor.control_port != taken
            assert port_accepts(tor.control_port)
            assert f"Could not bind to 127.0.0.1:{taken}" in tor.log_path.read_text()
        finally:
            await tor.stop()
        fixed = ManagedTor(
            tmp_path / "fixed", OFFLINE, control_port=taken, wait_for_bootstrap=False
        )
        started_tors.append(fixed)
        with pytest.raises(TorProcessError, match=f"Could not bind to 127.0.0.1:{taken}"):
            await fixed.start()


async def test_a_killed_tor_is_seen_as_not_running_and_can_be_started_again(
    tmp_path: Path, started_tors: list[ManagedTor]
) -> None:
    tor = ManagedTor(tmp_path / "tor", OFFLINE, wait_for_bootstrap=False)
    started_tors.append(tor)
    await tor.start()
    pid = tor.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert await wait_not_running(tor)
    await tor.start()
    try:
        assert await tor.is_running()
        assert tor.pid != pid
    finally:
        await tor.stop()


async def test_a_config_error_fails_at_once_with_tor_s_own_message(tmp_path: Path) -> None:
    tor = ManagedTor(tmp_path / "tor", ["NoSuchTorOption 1"], wait_for_bootstrap=False)
    started = time.monotonic()
    with pytest.raises(TorProcessError, match=r"(?s)exited with code 1.*NoSuchTorOption"):
        await tor.start()
    assert time.monotonic() - started < 15
    assert not await tor.is_running()


async def test_no_bootstrap_within_the_bound_is_an_error_and_tor_is_stopped(
    tmp_path: Path, started_tors: list[ManagedTor]
) -> None:
    tor = ManagedTor(tmp_path / "tor", OFFLINE, bootstrap_timeout=3)
    started_tors.append(tor)
    with pytest.raises(TorProcessError, match=r"did not reach 'Bootstrapped 100%' within 3 s"):
        await tor.start()
    assert not await tor.is_running()


def test_options_managed_tor_generates_are_refused_from_callers(tmp_path: Path) -> None:
    with pytest.raises(TorProcessError, match="SocksPort"):
        ManagedTor(tmp_path, ["SocksPort 9050"])
    with pytest.raises(TorProcessError, match="line break"):
        ManagedTor(tmp_path, ["Nickname a\nControlPort 9051"])


async def test_a_missing_tor_binary_is_reported(tmp_path: Path) -> None:
    tor = ManagedTor(tmp_path / "tor", OFFLINE, tor_binary=str(tmp_path / "no-such-tor"))
    with pytest.raises(TorProcessError, match="cannot run tor binary"):
        await tor.start()


@pytest.mark.tor
async def test_managed_tor_joins_the_private_network_and_bootstraps(
    tmp_path: Path, tor_network: PrivateTorNetwork, started_tors: list[ManagedTor]
) -> None:
    tor = ManagedTor(tmp_path / "tor", tor_network.client_torrc_lines(), bootstrap_timeout=120)
    started_tors.append(tor)
    started = time.monotonic()
    await tor.start()
    try:
        assert "Bootstrapped 100%" in tor.log_path.read_text()
        assert time.monotonic() - started < 120
        assert port_accepts(tor.socks_port)
    finally:
        await tor.stop()
    assert not await tor.is_running()


# ---------------------------------------------------------------------------- SystemTor


class FakeRunner:
    """Answers each command with a preset exit code and records the order of the calls."""

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes = codes
        self.calls: list[str] = []

    async def __call__(self, argv: Sequence[str]) -> CommandResult:
        command = " ".join(argv)
        self.calls.append(command)
        if command not in self.codes:
            raise FileNotFoundError(f"no such command: {argv[0]}")
        code = self.codes[command]
        return CommandResult(code, "", "" if code == 0 else f"{command} failed")


def system_tor(runner: FakeRunner) -> SystemTor:
    return SystemTor("127.0.0.1:9051", ("127.0.0.1", 9050), runner)


async def test_system_tor_checks_tor_at_default_before_tor() -> None:
    runner = FakeRunner({"systemctl is-active --quiet tor@default": 0})
    assert await system_tor(runner).is_running()
    assert runner.calls == ["systemctl is-active --quiet tor@default"]

    runner = FakeRunner(
        {"systemctl is-active --quiet tor@default": 3, "systemctl is-active --quiet tor": 0}
    )
    assert await system_tor(runner).is_running()
    assert runner.calls == [
        "systemctl is-active --quiet tor@default",
        "systemctl is-active --quiet tor",
    ]


async def test_system_tor_is_not_running_when_no_unit_is_active() -> None:
    runner = FakeRunner({"systemctl is-active --quiet tor@default": 3})
    assert not await system_tor(runner).is_running()
    assert runner.calls[-1] == "systemctl is-active --quiet tor"


async def test_system_tor_restart_uses_tor_at_default_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = FakeRunner({"systemctl restart tor@default": 0})
    tor = system_tor(runner)
    with caplog.at_level(logging.INFO, logger="rustbalance.tor.process"):
        await tor.restart()
    assert runner.calls == ["systemctl restart tor@default"]
    assert tor.last_method == "systemctl restart tor@default"
    assert "Tor restarted via systemctl" in caplog.text


async def test_system_tor_restart_falls_back_to_tor_then_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = FakeRunner({"systemctl restart tor@default": 5, "systemctl restart tor": 0})
    tor = system_tor(runner)
    await tor.restart()
    assert tor.last_method == "systemctl restart tor"

    runner = FakeRunner(
        {"systemctl restart tor@default": 5, "systemctl restart tor": 5, "service tor restart": 0}
    )
    tor = system_tor(runner)
    with caplog.at_level(logging.INFO, logger="rustbalance.tor.process"):
        await tor.restart()
    assert runner.calls == [
        "systemctl restart tor@default",
        "systemctl restart tor",
        "service tor restart",
    ]
    assert tor.last_method == "service tor restart"
    assert "Tor restarted via service" in caplog.text


async def test_system_tor_restart_failing_everywhere_names_every_attempt() -> None:
    runner = FakeRunner({"systemctl restart tor@default": 1, "systemctl restart tor": 1})
    with pytest.raises(TorProcessError) as excinfo:
        await system_tor(runner).restart()
    message = str(excinfo.value)
    assert "systemctl restart tor@default" in message
    assert "'systemctl restart tor'" in message
    assert "service tor restart" in message and "no such command" in message


async def test_system_tor_start_and_stop_use_the_same_order() -> None:
    runner = FakeRunner({"systemctl start tor": 0, "systemctl stop tor@default": 0})
    tor = system_tor(runner)
    await tor.start()
    await tor.stop()
    assert runner.calls == [
        "systemctl start tor@default",
        "systemctl start tor",
        "systemctl stop tor@default",
    ]
    assert tor.control_address == "127.0.0.1:9051"
    assert tor.socks_address == ("127.0.0.1", 9050)


async def test_run_command_reports_exit_codes_and_missing_binaries(tmp_path: Path) -> None:
    ok = await run_command(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (ok.returncode, ok.stdout, ok.stderr) == (3, "out\n", "err\n")
    missing = await run_command([str(tmp_path / "no-such-systemctl"), "restart", "tor"])
    assert missing.returncode == 127
