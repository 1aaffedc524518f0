"""node/sdnotify.py: systemd notify datagrams on a real unix datagram socket."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.node.sdnotify import SystemdNotifier, run_watchdog_pings


class StopLoop(Exception):
    pass


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    directory = Path(tempfile.mkdtemp(prefix="rbsd-", dir="/tmp"))
    path = str(directory / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_ready_status_watchdog_stopping(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("Serving master abc.onion")
    assert sock.recv(4096) == b"READY=1\nSTATUS=Serving master abc.onion"
    assert notifier.status("Publishing\nnow")
    assert sock.recv(4096) == b"STATUS=Publishing now"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.progress("Waiting for tor", extend=90.5)
    assert sock.recv(4096) == b"STATUS=Waiting for tor\nEXTEND_TIMEOUT_USEC=90500000"


def test_abstract_namespace_socket() -> None:
    name = f"rustbalance-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_noop_without_notify_socket() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval is None


def test_unreachable_socket_never_raises(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False


def test_invalid_assignment_is_a_programming_error(receiver: tuple[socket.socket, str]) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": receiver[1]})
    with pytest.raises(ValueError, match="invalid sd_notify assignment"):
        notifier.notify("READY=1\nMAINPID=1")


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: tuple[socket.socket, str]) -> None:
    path = receiver[1]
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval == 15.0
    mine = {**env, "WATCHDOG_PID": "1234"}
    assert SystemdNotifier(mine, pid=1234).watchdog_interval == 15.0
    assert SystemdNotifier(mine, pid=999).watchdog_interval is None  # meant for another process
    assert SystemdNotifier({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


async def test_watchdog_pings_at_half_interval(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000"})
    sleeps: list[float] = []
    problems = iter([None, "tor is gone", None, None])

    async def sleep(seconds: float) -> None:
        if len(sleeps) == 3:
            raise StopLoop
        sleeps.append(seconds)

    caplog.set_level(logging.WARNING, logger="rustbalance.node.sdnotify")
    with pytest.raises(StopLoop):
        await run_watchdog_pings(notifier, sleep=sleep, problem=lambda: next(problems))
    assert sleeps == [10.0, 10.0, 10.0]
    assert [sock.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
    sock.settimeout(0.01)
    with pytest.raises(TimeoutError):
        sock.recv(64)  # the unhealthy round sent nothing
    assert [r.getMessage() for r in caplog.records] == [
        "Withholding the systemd watchdog ping (systemd restarts the node if this lasts): "
        "tor is gone"
    ]


def test_the_process_environment_is_consumed_so_children_cannot_notify(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found under a real systemd (tests/systemd): the managed tor inherited NOTIFY_SOCKET and
    sent its own READY=1, which systemd logged as a warning twice per start."""
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier()
    assert notifier.enabled and notifier.watchdog_interval == 15.0
    child = subprocess.run(
        ["env"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert not [
        line
        for line in child
        if line.split("=", 1)[0] in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    ]
    assert notifier.ready()  # our own notifications still go out
    assert sock.recv(4096) == b"READY=1"


def test_an_explicit_environment_leaves_the_process_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    SystemdNotifier({"NOTIFY_SOCKET": "/tmp/x"})
    assert os.environ["NOTIFY_SOCKET"] == "/run/systemd/notify"
