"""End-to-end tests of the node daemon on the private Tor network.

:func:`running_node` is the reusable piece: it starts ``rustbalance run`` as a subprocess (a
managed tor joining the session's private network through ``tor.extra_torrc``, a
:class:`~tests.torhelpers.NamedHTTPServer` as the target) and always stops it by PID, with
SIGTERM and then SIGKILL, also when the test fails. Survival tests (watchdog, timeouts, HSPOST
failures, both halves of a period) build on it with ``overrides``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node.tor_network import ControlTorNetwork
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.cluster import is_tor
from rustbalance.testnet.node import NodeProcess, write_node_config
from rustbalance.tor.control import ReconnectingController
from rustbalance.tor.network import HsDirUpload, PlannedDescriptor
from rustbalance.tor.process import pid_is_alive
from tests.torhelpers import NamedHTTPServer

__all__ = [
    "FAULT_FILE_ENV",
    "FaultInjectedNodeProcess",
    "LogLine",
    "RunningNode",
    "log_lines",
    "running_node",
]

# The daemon's log format (cli/main.py): "2025-01-01 12:00:00,123 LEVEL logger: message".
_LOG_LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


@dataclass(frozen=True)
class LogLine:
    at: float  # unix time (the daemon logs local time; converted back here)
    level: str
    logger: str
    message: str


def log_lines(text: str, pattern: str = "", *, after: float | None = None) -> list[LogLine]:
    """The daemon's log lines whose message matches ``pattern`` (regex), optionally only those
    logged at or after unix time ``after``."""
    regex = re.compile(pattern)
    found: list[LogLine] = []
    for raw in text.splitlines():
        m = _LOG_LINE_RE.match(raw)
        if m is None or not regex.search(m.group(4)):
            continue
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if after is not None and at < after:
            continue
        found.append(LogLine(at, m.group(2), m.group(3), m.group(4)))
    return found


# Managed tor bootstrap + intro circuits + first publish: ~10 s observed on the private
# network; generous because CI machines are slower and the network may be busy.
NODE_PUBLISH_TIMEOUT = 180.0


@dataclass
class RunningNode:
    process: NodeProcess
    config_path: Path
    master: IdentityKey
    target: NamedHTTPServer
    work_dir: Path

    @property
    def address(self) -> str:
        return self.master.onion_address

    def tor_pid(self) -> int | None:
        """PID of the node's managed tor (from the daemon's log), None if not logged yet."""
        found = re.findall(r"started tor pid (\d+)", self.process.log_text())
        return int(found[-1]) if found else None

    def wait_published(self, timeout: float = NODE_PUBLISH_TIMEOUT) -> None:
        self.process.wait_for_log(r"Published descriptor for", timeout)

    def lines(self, pattern: str = "", *, after: float | None = None) -> list[LogLine]:
        return log_lines(self.process.log_text(), pattern, after=after)

    def wait_line(self, pattern: str, timeout: float, *, after: float | None = None) -> LogLine:
        """Wait (bounded) for a log line matching ``pattern`` logged at or after ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(pattern, after=after)
            if found:
                return found[0]
            code = self.process.poll()
            if code is not None:
                raise RustBalanceError(
                    f"node exited with code {code} before logging {pattern!r}:\n"
                    + "\n".join(self.process.log_text().splitlines()[-30:])
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"node did not log {pattern!r} within {timeout:.0f} s; last lines:\n"
                    + "\n".join(self.process.log_text().splitlines()[-25:])
                )
            time.sleep(0.2)

    def wait_tor_ready(self, timeout: float = NODE_PUBLISH_TIMEOUT) -> None:
        self.process.wait_for_log(r"tor pid \d+ ready after", timeout)

    @property
    def proxy_port(self) -> int:
        found = re.findall(r"Proxy listening on [\d.]+:(\d+)", self.process.log_text())
        if not found:
            raise AssertionError("the node has not logged its proxy port yet")
        return int(found[-1])

    @property
    def control_address(self) -> str:
        """The managed tor's control port (logged when tor is ready)."""
        found = re.findall(r"\(control ([\d.]+:\d+), socks", self.process.log_text())
        if not found:
            raise AssertionError("the node's tor has not logged its control port yet")
        return str(found[-1])

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@contextlib.contextmanager
def running_node(
    network: PrivateTorNetwork,
    work_dir: Path,
    name: str = "node-a",
    *,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    master: IdentityKey | None = None,
    fault_file: Path | None = None,
) -> Iterator[RunningNode]:
    """Start a node daemon joined to ``network``; stop it (and its target) afterwards.

    With ``fault_file`` the daemon runs under :class:`FaultInjectedNodeProcess` (a controlled
    fault for what real tor cannot do on demand; inactive while the file does not exist)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    master = master or IdentityKey.generate(secrets.token_bytes)
    key_file = work_dir / "master.key"
    write_seed_key_file(master, key_file)
    target = NamedHTTPServer(f"{name}-target")
    node: NodeProcess | None = None
    try:
        config = write_node_config(
            work_dir / "config.toml",
            node_id=name,
            key_file=key_file,
            master_address=master.onion_address,
            target=f"127.0.0.1:{target.port}",
            work_dir=work_dir,
            extra_torrc=network.client_torrc_lines(),
            overrides=overrides,
        )
        node = (
            NodeProcess(config, work_dir / "node.log")
            if fault_file is None
            else FaultInjectedNodeProcess(config, work_dir / "node.log", fault_file)
        )
        node.start()
        yield RunningNode(node, config, master, target, work_dir)
    finally:
        if node is not None:
            running = RunningNode(node, work_dir / "config.toml", master, target, work_dir)
            tor_pid = running.tor_pid()
            node.stop()
            # The managed tor exits with the daemon (SIGTERM, or __OwningControllerProcess
            # after a SIGKILL); make sure by PID.
            if tor_pid is not None and pid_is_alive(tor_pid) and is_tor(tor_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tor_pid, signal.SIGKILL)
        target.close()


# ----------------------------------------------------------------------------- fault injection

FAULT_FILE_ENV = "RB_TEST_FAULT_FILE"


class FaultInjectedNodeProcess(NodeProcess):
    """``rustbalance run`` with one controlled fault: while ``fault_file`` contains ``next``,
    the upload of the "next" period descriptor raises ``ControlError`` before reaching tor
    (:class:`NextUploadFault`, the daemon's tor network with that one fault). Real tor cannot
    fail only one of the two uploads on demand: on the private network every HSDir is
    responsible for both descriptors. Everything else is the real daemon on real tor; the
    process runs :func:`_fault_injected_main` instead of the CLI module."""

    def __init__(self, config_path: Path, log_path: Path, fault_file: Path) -> None:
        super().__init__(config_path, log_path)
        self.fault_file = fault_file

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RUSTBALANCE_TOR_PASSWORD"}
        env["PYTHONUNBUFFERED"] = "1"
        env[FAULT_FILE_ENV] = str(self.fault_file)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        code = "from tests.node_e2e import _fault_injected_main; _fault_injected_main()"
        with self.log_path.open("ab") as log_fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                env=env,
                start_new_session=True,
            )
        self.started_at = time.monotonic()


def _fault_active(fault_file: Path) -> bool:
    try:
        return "next" in fault_file.read_text()
    except OSError:
        return False


class NextUploadFault(ControlTorNetwork):
    """The daemon's tor network, except that the "next" period upload fails while
    ``fault_file`` says ``next``."""

    def __init__(self, controller: Callable[[], ReconnectingController], fault_file: Path) -> None:
        super().__init__(controller)
        self.fault_file = fault_file

    async def upload(self, planned: PlannedDescriptor, timeout: float) -> list[HsDirUpload]:  # noqa: ASYNC109
        if planned.label == "next" and _fault_active(self.fault_file):
            raise ControlError("injected test fault: next-period upload blocked")
        return await super().upload(planned, timeout)


def _fault_injected_main() -> None:  # pragma: no cover - runs in the node subprocess
    """``rustbalance run`` (the CLI's own parser, logging and run command) with the daemon's
    tor network replaced by :class:`NextUploadFault`."""
    from rustbalance.cli import run_cmd
    from rustbalance.cli.logging_setup import configure_logging
    from rustbalance.cli.main import build_parser, log_settings

    fault_file = Path(os.environ[FAULT_FILE_ENV])
    args = build_parser().parse_args(sys.argv[1:])
    configure_logging(log_settings(args))
    sys.exit(run_cmd.run(args, network=lambda ctrl: NextUploadFault(ctrl, fault_file)))
