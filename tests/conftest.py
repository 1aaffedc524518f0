"""Shared fixtures: one private Tor network for the whole run, extra clients, named HTTP backends.

Tests that use ``tor_network`` (directly or through another fixture) are marked
``@pytest.mark.tor``. When such a test fails, every tor's log and torrc is copied to
``./test-logs/<test name>/``.

At session end every log the run wrote is scanned for the secrets the run created
(:mod:`tests.secret_scan`); a hit fails the session, naming the log and the kind of secret.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.testnet.network import SESSION_RELAYS, TOR_DEFAULT_HSDIR_PARAMS
from tests import secret_scan

_NETWORK_KEY = pytest.StashKey[PrivateTorNetwork]()
_SCAN_RESULT_KEY = pytest.StashKey[list[str]]()
_SECRETS_KEY = pytest.StashKey[secret_scan.SecretSet]()
_client_numbers = itertools.count(1)


def _log_dir(config: pytest.Config, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", name)[:150]
    return config.rootpath / "test-logs" / safe


@pytest.fixture(scope="session")
def tor_network(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[PrivateTorNetwork]:
    """One private Tor network (3 authorities, 7 relays: 10 HSDirs; 1 client) for the whole
    test run, with tor's own HSDir ring parameters (2 replicas, spread 4 to store, 3 to fetch):
    the 8 store positions are different relays and a strict subset of the ring, as distinct
    descriptors per HSDir need (docs/distinct-descriptors.md, "The test network").

    Stopped by PID at the end of the session, also after a failure or Ctrl-C (pytest tears
    session fixtures down on interrupt; the network's atexit hook and tor's
    ``__OwningControllerProcess`` are further nets).
    """
    net = PrivateTorNetwork(
        tmp_path_factory.mktemp("tornet"),
        n_relays=SESSION_RELAYS,
        consensus_params=TOR_DEFAULT_HSDIR_PARAMS,
    )
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
        _harvest_secrets(request.config)  # tor deletes its control cookie when it stops
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


# ----------------------------------------------------------------------------- log-secret scan


# The file pytest's captured output is appended to (set at session start).
_CAPTURED_PATH: list[Path] = []


def _basetemp(config: pytest.Config) -> Path:
    factory: pytest.TempPathFactory = getattr(config, "_tmp_path_factory")  # noqa: B009
    return factory.getbasetemp()


def _harvest_secrets(config: pytest.Config) -> None:
    secrets = config.stash.setdefault(_SECRETS_KEY, secret_scan.SecretSet())
    secret_scan.collect_secrets([_basetemp(config)], into=secrets)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        # Right after the test body, while its tors still run (their cookies still exist).
        uses_tor = item.get_closest_marker("tor") is not None
        if uses_tor or "tor_network" in getattr(item, "fixturenames", ()):
            _harvest_secrets(item.config)


def pytest_sessionstart(session: pytest.Session) -> None:
    # What pytest captured (stdout, stderr, log records) is a log too; kept until the scan.
    path = _basetemp(session.config) / "secret-scan" / "captured-output.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    _CAPTURED_PATH[:] = [path]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Sections hold the captured output of passing tests too (shown only on failure).
    captured = [text for _, text in report.sections if text]
    path = _CAPTURED_PATH[0] if _CAPTURED_PATH else None
    if captured and path is not None:
        with path.open("a", encoding="utf-8", errors="replace") as fh:
            fh.write("\n".join(captured) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Scan every log of the run for the run's secrets; a hit fails the session."""
    config = session.config
    started = time.monotonic()
    roots = [_basetemp(config)]
    _harvest_secrets(config)
    secrets = config.stash[_SECRETS_KEY]
    logs = secret_scan.find_logs(roots, [config.rootpath / "test-logs"])
    hits = secret_scan.scan_logs(logs, secrets)
    took = time.monotonic() - started
    lines = [
        f"secret scan: {len(secrets)} secret forms from {secrets.files} files "
        f"({dict(sorted(secrets.kinds.items()))}), {len(logs)} logs, {len(hits)} hits, "
        f"{took:.1f} s"
    ]
    # Names the log, the kind and the file the secret came from; never the secret.
    lines += [f"SECRET IN LOG: {h.kind} from {h.source} appears in {h.log}" for h in hits]
    config.stash[_SCAN_RESULT_KEY] = lines
    if hits and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SCAN_RESULT_KEY, [])
    if lines:
        terminalreporter.write_sep("-", "log-secret scan")
        for line in lines:
            terminalreporter.write_line(line, red=line.startswith("SECRET"))
