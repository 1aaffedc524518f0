"""Shared fixtures: one private Tor network for the whole run, extra clients, named HTTP backends.

Tests that use ``tor_network`` (directly or through another fixture) are marked
``@pytest.mark.tor``. When such a test fails, every tor's log and torrc is copied to
``./test-logs/<test name>/``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.apps import NamedHTTPServer

_NETWORK_KEY = pytest.StashKey[PrivateTorNetwork]()
_client_numbers = itertools.count(1)


def _log_dir(config: pytest.Config, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", name)[:150]
    return config.rootpath / "test-logs" / safe


@pytest.fixture(scope="session")
def tor_network(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[PrivateTorNetwork]:
    """One private Tor network (3 authorities, 4 relays, 1 client) for the whole test run.

    Stopped by PID at the end of the session, also after a failure or Ctrl-C (pytest tears
    session fixtures down on interrupt; the network's atexit hook and tor's
    ``__OwningControllerProcess`` are further nets).
    """
    net = PrivateTorNetwork(tmp_path_factory.mktemp("tornet"), n_relays=4)
    try:
        net.start()
    except BaseException:
        net.collect_logs(_log_dir(request.config, "tor_network-startup"))
        raise
    request.config.stash[_NETWORK_KEY] = net
    try:
        yield net
    finally:
        del request.config.stash[_NETWORK_KEY]
        net.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    net = item.config.stash.get(_NETWORK_KEY, None)
    uses_network = "tor_network" in getattr(item, "fixturenames", ())
    if report.failed and uses_network and net is not None:
        dest = _log_dir(item.config, item.name)
        net.collect_logs(dest)
        report.sections.append(("tor logs", f"copied to {dest}"))
    return report


@pytest.fixture
def tor_client_factory(
    tor_network: PrivateTorNetwork,
) -> Iterator[Callable[[], TorInstance]]:
    """Start extra clients on the shared network; they are stopped when the test ends."""
    started: list[TorInstance] = []

    def make() -> TorInstance:
        client = tor_network.add_client(f"xclient{next(_client_numbers)}")
        started.append(client)
        return client

    yield make
    for client in started:
        tor_network.remove(client)


@pytest.fixture
def named_http_server() -> Iterator[Callable[[str], int]]:
    """Start tiny HTTP servers on 127.0.0.1 answering ``hello from <name>``; returns the port."""
    servers: list[NamedHTTPServer] = []

    def start(name: str) -> int:
        server = NamedHTTPServer(name)
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.close()
