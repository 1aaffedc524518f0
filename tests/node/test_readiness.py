"""node/readiness.py: READY=1 means serving (issue 17).

The node is ready once the proxy listens, tor has bootstrapped (100 %) and tor's onion service
has intro points; not after the first upload of the master descriptor (a standby never
uploads, and a slow HSDir must not hold start-up). While it waits, every step of progress
extends systemd's start timeout (``EXTEND_TIMEOUT_USEC``) by what that step may still take,
so a slow bootstrap extends the start instead of ending in a kill/restart loop. The decisions
are pure (:class:`Serving`, :func:`start_extension`); the datagrams go to a real unix socket.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.node.readiness import (
    EXTEND_MARGIN_SECS,
    Readiness,
    Serving,
    StartBudgets,
    start_extension,
)
from rustbalance.node.sdnotify import SystemdNotifier
from tests.node.fakes import ManualClock

BUDGETS = StartBudgets(bootstrap=120.0, intro_points=120.0)


# --- the pure decisions ------------------------------------------------------------------------


def test_serving_needs_all_three() -> None:
    assert not Serving().ready
    assert not Serving(proxy="127.0.0.1:8080", bootstrap=100).ready
    assert not Serving(proxy="127.0.0.1:8080", intro_points=3).ready
    assert not Serving(bootstrap=100, intro_points=3).ready
    serving = Serving(proxy="/run/rustbalance/proxy.sock", bootstrap=100, intro_points=3)
    assert serving.ready
    assert serving.why() == (
        "proxy listening on /run/rustbalance/proxy.sock, tor bootstrapped, 3 intro points"
    )


def test_what_the_node_waits_for_is_its_status_line() -> None:
    assert Serving().waiting_for() == "Starting the proxy"
    assert Serving(proxy="p").waiting_for() == "Waiting for tor to bootstrap (0%)"
    assert Serving(proxy="p", bootstrap=45).waiting_for() == "Waiting for tor to bootstrap (45%)"
    assert Serving(proxy="p", bootstrap=100).waiting_for() == "Waiting for intro points"


def test_each_step_extends_the_start_by_what_it_may_still_take() -> None:
    margin = EXTEND_MARGIN_SECS
    # tor's bootstrap: up to tor.bootstrap_timeout_secs, after which the daemon gives up itself.
    assert start_extension(Serving(proxy="p", bootstrap=5), BUDGETS) == 120.0 + margin
    # Bootstrapped: tor builds its intro circuits (publish.first_publish_max_wait_secs).
    assert start_extension(Serving(proxy="p", bootstrap=100), BUDGETS) == 120.0 + margin
    assert start_extension(Serving(proxy="p", bootstrap=100, intro_points=1), BUDGETS) is None
    assert start_extension(Serving(), BUDGETS) is None  # nothing to wait for yet


# --- the shell: what systemd is told --------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    directory = Path(tempfile.mkdtemp(prefix="rbrd-", dir="/tmp"))
    path = str(directory / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_ready_comes_only_once_the_node_serves(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    readiness = Readiness(SystemdNotifier({"NOTIFY_SOCKET": path}), ManualClock(), BUDGETS)
    readiness.starting()
    readiness.proxy_listening("127.0.0.1:8080")
    readiness.tor_bootstrap(10)
    readiness.tor_bootstrap(10)  # no progress: nothing new to say
    readiness.tor_bootstrap(50)
    readiness.intro_points(0)
    assert not readiness.ready
    readiness.tor_bootstrap(100)
    assert not readiness.ready
    usec = int((120.0 + EXTEND_MARGIN_SECS) * 1_000_000)
    assert received(sock) == [
        f"STATUS=Starting\nEXTEND_TIMEOUT_USEC={usec}",
        f"STATUS=Waiting for tor to bootstrap (0%)\nEXTEND_TIMEOUT_USEC={usec}",
        f"STATUS=Waiting for tor to bootstrap (10%)\nEXTEND_TIMEOUT_USEC={usec}",
        f"STATUS=Waiting for tor to bootstrap (50%)\nEXTEND_TIMEOUT_USEC={usec}",
        f"STATUS=Waiting for intro points\nEXTEND_TIMEOUT_USEC={usec}",
    ]
    readiness.intro_points(3)
    assert readiness.ready
    assert received(sock) == [
        "READY=1\nSTATUS=Serving: proxy listening on 127.0.0.1:8080, tor bootstrapped, "
        "3 intro points"
    ]
    # Ready once: later changes (a tor restart, fewer intro points) never send READY again.
    readiness.intro_points(0)
    readiness.intro_points(2)
    readiness.tor_bootstrap(100)
    assert not [m for m in received(sock) if "READY=1" in m]


def test_ready_is_logged_with_what_serving_means(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, path = receiver
    readiness = Readiness(SystemdNotifier({"NOTIFY_SOCKET": path}), ManualClock(), BUDGETS)
    caplog.set_level("INFO")
    readiness.intro_points(2)
    readiness.tor_bootstrap(100)
    assert not readiness.ready  # the proxy does not listen yet
    readiness.proxy_listening("127.0.0.1:1")
    assert readiness.ready
    assert caplog.messages[-1] == (
        "Node ready: proxy listening on 127.0.0.1:1, tor bootstrapped, 2 intro points"
    )


def test_stopping_extends_the_stop_by_the_shutdown_budget(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    readiness = Readiness(SystemdNotifier({"NOTIFY_SOCKET": path}), ManualClock(), BUDGETS)
    readiness.stopping(14.5)
    assert received(sock) == [
        "STOPPING=1\nSTATUS=Shutting down\n"
        f"EXTEND_TIMEOUT_USEC={int((14.5 + EXTEND_MARGIN_SECS) * 1_000_000)}"
    ]
