"""Shared fixtures: one private Tor network for the whole run, extra clients, named HTTP backends.

Tests are sorted into tiers (markers ``tor``, ``slow``, ``root``; see "test tiers" below):
``make unit`` runs the rest, ``make test`` everything. When a test on the private network
fails, every tor's log and torrc is copied to ``./test-logs/<test name>/``.

At session end every log the run wrote is scanned for the secrets the run created
(:mod:`tests.secret_scan`); a hit fails the session, naming the log and the kind of secret.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.apps import NamedHTTPServer
from rustbalance.testnet.network import SESSION_RELAYS, TOR_DEFAULT_HSDIR_PARAMS
from tests import budget, secret_scan

_NETWORK_KEY = pytest.StashKey[PrivateTorNetwork]()
_DESELECTED_KEY = pytest.StashKey[collections.Counter[str]]()
_SCAN_RESULT_KEY = pytest.StashKey[list[str]]()
_SECRETS_KEY = pytest.StashKey[secret_scan.SecretSet]()
_client_numbers = itertools.count(1)


def _log_dir(config: pytest.Config, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", name)[:150]
    return config.rootpath / "test-logs" / safe


# ----------------------------------------------------------------------------- test tiers
#
# tor:  starts real tor processes (the session's private network, or a tor of its own).
# slow: runs for seconds (real timers, daemons and scripts as subprocesses, costly KDFs).
# root: needs root (network namespaces, mounts); run without root it fails, never skips.
# `make unit` = pytest -m "not tor and not slow and not root" (no root needed, under a
# minute); `make test` runs every tier. A test gets its tier from the fixtures it uses, from
# its own marker, or from its place below, the longest that matches (a new test in these
# modules or folders is tiered like its neighbours).

TIERS = ("tor", "slow", "root")
_TIER_OF_FIXTURE = {"tor_network": "tor", "real_tor": "tor"}
_TIER_OF_PLACE: dict[str, tuple[str, ...]] = {
    "tests/cluster_net/": ("slow",),  # coordinators on real UDP sockets and timers
    "tests/cluster_net/test_codec_and_limits.py": (),  # pure: codec and limit checks
    "tests/cluster_net/test_wireguard_netns.py": ("slow", "root"),
    "tests/cluster/test_coordinator_boot.py": ("slow",),
    "tests/cluster/test_simulation.py::TestCluster": ("slow",),  # stateful, many elections
    "tests/deploy/test_deploy_script.py": ("slow",),  # deploy.sh runs with stub commands
    "tests/etcd/": ("slow",),  # a real 3-member etcd cluster per test
    "tests/node_e2e/": ("slow",),  # `rustbalance run` as a subprocess
    "tests/ops/test_init_join_cli.py": ("slow",),  # init/join end to end, Argon2 at full cost
    "tests/proxy/test_front_door_load.py": ("slow",),  # attacker processes, 12 s each
    # On real timers (head and idle timeouts, circuit cuts, shutdown budgets, restart
    # back-off): 17, 7, 4 and 3.5 s; the pure wire layer, the admission core and the http
    # session's exchanges stay in unit.
    "tests/proxy/test_front_door.py": ("slow",),
    "tests/proxy/test_circuits.py": ("slow",),
    "tests/proxy/test_tcp_mode.py": ("slow",),  # idle and session timeouts: 5 s
    "tests/proxy/test_splice.py": ("slow",),  # idle timeouts, back-pressure: 4.5 s
    "tests/node/test_shutdown.py": ("slow",),
    "tests/node/test_supervisor.py": ("slow",),
    "tests/benchmarks/test_charts.py": ("slow",),  # matplotlib draws every chart: 7 s
    "tests/ops/test_mesh_wireguard_netns.py": ("root",),
    "tests/ops/test_trust_mesh_netns.py": ("slow", "root"),  # wireguard-go in 3 namespaces
    "tests/reliability/test_clock_skew.py": ("slow",),
    "tests/reliability/test_full_disk.py": ("root",),
    "tests/reliability/test_startup_faults.py": ("slow",),
    "tests/reliability/test_secret_scan.py::test_a_planted_secret_fails": ("slow",),
    "tests/systemd/": ("slow", "root"),  # systemd as PID 1 in systemd-nspawn
    "tests/testnet/test_network.py": ("tor",),
    "tests/tor/test_process.py": ("tor",),
}
# An unmarked test slower than this is named at the end of the run (a candidate for `slow`).
_SLOW_UNMARKED_SECS = 3.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-scale",
        type=float,
        default=1.0,
        help="run this share of every Hypothesis test's example budget (tests/budget.py); "
        "`make unit` passes 0.1, `make test` runs the full budgets",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module is imported: their @settings read the budget at import.
    budget.set_scale(config.getoption("--fuzz-scale"))
    settings.register_profile("rustbalance", max_examples=budget.budget(budget.DEFAULT_EXAMPLES))
    settings.load_profile("rustbalance")


def tiers_of(item: pytest.Item) -> set[str]:
    """The tiers a collected test belongs to."""
    found = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
    found.update(
        tier
        for name in getattr(item, "fixturenames", ())
        if (tier := _TIER_OF_FIXTURE.get(name)) is not None
    )
    places = [place for place in _TIER_OF_PLACE if item.nodeid.startswith(place)]
    if places:
        found.update(_TIER_OF_PLACE[max(places, key=len)])
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: before the mark plugin deselects by `-m`.
    for item in items:
        for tier in sorted(tiers_of(item)):
            if item.get_closest_marker(tier) is None:
                item.add_marker(tier)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if not items:
        return
    counts = items[0].config.stash.setdefault(_DESELECTED_KEY, collections.Counter())
    counts["tests"] += len(items)
    for item in items:
        counts.update(sorted(tiers_of(item)) or ["other"])


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail(
            "this test needs root (network namespaces or mounts); run `make test` as root, "
            "or `make unit`, which leaves the root tier out",
            pytrace=False,
        )


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
# (seconds, test) of tests in no tier that took longer than _SLOW_UNMARKED_SECS.
_SLOW_UNMARKED: list[tuple[float, str]] = []


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
    slow = report.when == "call" and report.duration > _SLOW_UNMARKED_SECS
    if slow and not set(report.keywords).intersection(TIERS):
        _SLOW_UNMARKED.append((report.duration, report.nodeid))
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
    scale = terminalreporter.config.getoption("--fuzz-scale")
    if scale != 1.0:
        terminalreporter.write_line(f"fuzz tests ran {scale:g} of their example budgets")
    deselected = terminalreporter.config.stash.get(_DESELECTED_KEY, None)
    if deselected:
        terminalreporter.write_sep("-", "tiers left out")
        tiers = ", ".join(f"{t} {deselected[t]}" for t in (*TIERS, "other") if deselected[t])
        terminalreporter.write_line(
            f"{deselected['tests']} tests deselected: {tiers} (a test in two tiers counts in "
            "both); `make test` runs them all"
        )
    if _SLOW_UNMARKED:
        terminalreporter.write_sep("-", "slow tests in no tier")
        for seconds, nodeid in sorted(_SLOW_UNMARKED, reverse=True)[:10]:
            terminalreporter.write_line(f"{seconds:5.1f} s {nodeid} (mark it slow?)")
    lines = terminalreporter.config.stash.get(_SCAN_RESULT_KEY, [])
    if lines:
        terminalreporter.write_sep("-", "log-secret scan")
        for line in lines:
            terminalreporter.write_line(line, red=line.startswith("SECRET"))
