"""A private Tor network on 127.0.0.1: 3 directory authorities, relays, clients, onion services.

Written from the tor manual and tor.md §13 (recipe, pitfalls, timings). Every tor runs with
``RunAsDaemon 1`` and its own ``PidFile`` (a config error then gives a non-zero exit at once,
tor.md §13.7), a notice log in its data directory, and ``__OwningControllerProcess`` set to the
Python process that built the network, so nothing outlives it even after a ``kill -9``.

Usage (sync, so it works from a pytest fixture and from a demo script)::

    net = PrivateTorNetwork(base_dir, n_relays=4)
    net.start()                                   # bounded wait, default 120 s
    client = net.add_client("client1")
    svc = net.add_onion_service("web", {80: 8080})
    ...
    net.stop()
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from rustbalance.errors import TorProcessError
from rustbalance.tor.process import (
    TorDataFiles,
    bootstrap_progress,
    pick_free_ports,
    pid_is_alive,
    read_log_tail,
)

__all__ = [
    "AUTHORITY_COUNT",
    "DEFAULT_CONSENSUS_PARAMS",
    "SESSION_RELAYS",
    "TOR_DEFAULT_HSDIR_PARAMS",
    "ConsensusSummary",
    "PrivateTorNetwork",
    "Role",
    "TorInstance",
]

AUTHORITY_COUNT = 3
# With the defaults (hsdir_n_replicas=2, hsdir_spread_store=4) 2 x 4 = 8 ring positions cover
# every one of ~7 HSDirs, so every relay would be responsible for every descriptor and a hash-ring
# check would prove nothing (param-spec, rend-spec [WHERE-HSDESC]). Spread 2 makes it a subset.
DEFAULT_CONSENSUS_PARAMS = "hsdir_spread_store=2 hsdir_spread_fetch=2"
# tor's own defaults (param-spec; hs_common.h HS_DEFAULT_HSDIR_N_REPLICAS / _SPREAD_STORE /
# _SPREAD_FETCH), written out so the consensus states them: 8 store and 6 fetch positions, as
# on the live network. Used with SESSION_RELAYS, where the 8 store positions are a strict
# subset of the 10 HSDirs; distinct descriptors per HSDir (docs/distinct-descriptors.md) need
# all 8 positions to be different relays.
TOR_DEFAULT_HSDIR_PARAMS = "hsdir_n_replicas=2 hsdir_spread_store=4 hsdir_spread_fetch=3"
# Relays of the test session's network besides the 3 authorities: 10 HSDirs. Measured on 2
# shared cores (docs/distinct-descriptors.md, "The test network"): ready in about the same time
# as with 4 relays, about 230 MB more memory.
SESSION_RELAYS = 7
VOTING_INTERVAL = (
    20  # tor.md §13.5: 8-minute time periods; Onionbalance's testnet timing expects it
)
VOTE_DELAY = 4
DIST_DELAY = 4
# dirauth_config.c: vote delay + dist delay must stay below half the voting interval, and each
# at least MIN_VOTE_SECONDS_TESTING / MIN_DIST_SECONDS_TESTING (2 s, dirvote.h).
MIN_TESTING_DELAY = 2
STOP_GRACE_SECONDS = 10.0
DEFAULT_START_TIMEOUT = 120.0
_POLL = 0.25
_NICK_RE = re.compile(r"^[A-Za-z0-9]{1,19}$")  # tor manual: Nickname, 1-19 alphanumerics
_ONION_RE = re.compile(r"^[a-z2-7]{56}\.onion$")


class Role(StrEnum):
    AUTHORITY = "authority"
    RELAY = "relay"
    CLIENT = "client"
    ONION_SERVICE = "onion_service"


@dataclass(frozen=True)
class ConsensusSummary:
    """What a client's cached microdesc consensus says (just enough to judge readiness)."""

    valid_after: str
    relay_count: int
    hsdir_count: int
    params: dict[str, int]


def summarize_consensus(text: str) -> ConsensusSummary:
    valid_after = ""
    relays = hsdirs = 0
    params: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("valid-after "):
            valid_after = line.split(" ", 1)[1].strip()
        elif line.startswith("r "):
            relays += 1
        elif line.startswith("s ") and "HSDir" in line.split():
            hsdirs += 1
        elif line.startswith("params "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                try:
                    params[key] = int(value)
                except ValueError:
                    continue
    return ConsensusSummary(valid_after, relays, hsdirs, params)


def _tor_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


@dataclass
class TorInstance(TorDataFiles):
    """One tor of the network: its ports, files and process."""

    name: str
    role: Role
    data_dir: Path
    control_port: int
    socks_port: int | None = None
    or_port: int | None = None
    dir_port: int | None = None
    hidden_service_dir: Path | None = None
    _pid: int | None = field(default=None, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "tor.pid"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    @property
    def socks_address(self) -> tuple[str, int] | None:
        return None if self.socks_port is None else ("127.0.0.1", self.socks_port)

    @property
    def pid(self) -> int | None:
        """The daemon's PID from its pid file (kept after it exits, for checks)."""
        if self._pid is None:
            try:
                self._pid = int(self.pid_file.read_text().strip())
            except (OSError, ValueError):
                return None
        return self._pid

    @property
    def onion_address(self) -> str | None:
        """``<56 chars>.onion`` from the service's ``hostname`` file, once tor wrote it."""
        if self.hidden_service_dir is None:
            return None
        try:
            address = (self.hidden_service_dir / "hostname").read_text().strip()
        except OSError:
            return None
        return address if _ONION_RE.match(address) else None

    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and pid_is_alive(pid) and self._is_our_tor(pid)

    def _is_our_tor(self, pid: int) -> bool:
        # PIDs are reused: only signal a tor whose command line names this instance's torrc.
        argv = _tor_cmdline(pid)
        return bool(argv) and Path(argv[0]).name == "tor" and str(self.torrc_path) in argv

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if this instance's tor is alive; False when there was nothing to signal."""
        pid = self.pid
        if pid is None or not pid_is_alive(pid) or not self._is_our_tor(pid):
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns when the process is gone."""
        _stop_all([self], grace)

    def kill(self) -> None:
        """SIGKILL at once (simulates a crash); returns when the process is gone."""
        self.signal(signal.SIGKILL)
        _wait_gone([self], 5.0)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return read_log_tail(self.log_path, lines)

    def bootstrap_progress(self) -> int:
        return bootstrap_progress(self.log_text())

    def wait_for_log(self, pattern: str, timeout: float) -> str:
        """Wait (bounded) until a log line matches the regex ``pattern``; return that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TorProcessError(
                    f"{self.name}: no log line matching {pattern!r} within {timeout:.0f} s; "
                    f"see {self.log_path}"
                )
            if not self.is_running():
                raise TorProcessError(
                    f"{self.name}: tor exited while waiting for {pattern!r}; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL)

    def rss_bytes(self) -> int:
        """Resident memory of the process (0 when it is not running)."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return 0
        return 0


def _wait_gone(instances: Sequence[TorInstance], timeout: float) -> list[TorInstance]:
    deadline = time.monotonic() + timeout
    alive = [i for i in instances if i.pid is not None and pid_is_alive(i.pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [i for i in alive if i.pid is not None and pid_is_alive(i.pid)]
    return alive


def _stop_all(instances: Sequence[TorInstance], grace: float) -> None:
    signalled = [i for i in instances if i.signal(signal.SIGTERM)]
    left = _wait_gone(signalled, grace)
    for inst in left:
        inst.signal(signal.SIGKILL)
    left = _wait_gone(left, 5.0)
    if left:
        names = ", ".join(f"{i.name} (pid {i.pid})" for i in left)
        raise TorProcessError(f"tor processes survived SIGKILL: {names}")


class PrivateTorNetwork:
    """A private Tor network under ``base_dir`` on 127.0.0.1 (tor.md §13).

    ``n_relays`` relays join the 3 authorities (which relay too); ``n_clients`` clients are started
    with the network and gate readiness. Every tor gets ports the OS reported free.
    """

    def __init__(
        self,
        base_dir: Path | str,
        n_relays: int = 4,
        *,
        n_clients: int = 1,
        consensus_params: str = DEFAULT_CONSENSUS_PARAMS,
        min_hsdirs: int | None = None,
        tor_binary: str = "tor",
        tor_gencert_binary: str = "tor-gencert",
        owning_pid: int | None = None,
        voting_interval: int = VOTING_INTERVAL,
    ) -> None:
        # 3 authorities + 1 relay is the observed minimum (tor.md §13.6); ask for 2 so that a
        # service's 4-hop rendezvous path and vanguards-lite always find distinct nodes.
        if n_relays < 2:
            raise TorProcessError(f"n_relays must be >= 2 (got {n_relays}); see tor.md §13.6")
        if n_clients < 1:
            raise TorProcessError("n_clients must be >= 1: a client gates readiness")
        # 10 s gives 4-minute time periods (tor.md §3.1): rotations and period changes every
        # few minutes, what the availability harness needs; below that the delays do not fit.
        if voting_interval < 10:
            raise TorProcessError(f"voting_interval must be >= 10 s (got {voting_interval})")
        self.voting_interval = voting_interval
        delay = max(MIN_TESTING_DELAY, voting_interval // 5)
        self.vote_delay = min(VOTE_DELAY, delay)
        self.dist_delay = min(DIST_DELAY, delay)
        self.base_dir = Path(base_dir).absolute()
        self.n_relays = n_relays
        self.n_clients = n_clients
        self.consensus_params = consensus_params
        self.min_hsdirs = AUTHORITY_COUNT + n_relays if min_hsdirs is None else min_hsdirs
        self.tor_binary = tor_binary
        self.tor_gencert_binary = tor_gencert_binary
        self.owning_pid = os.getpid() if owning_pid is None else owning_pid
        self.instances: dict[str, TorInstance] = {}
        self.ready_seconds: float | None = None
        self.started = False
        self._dir_authority_lines: list[str] = []
        self._used_ports: set[int] = set()
        self._removed_names: set[str] = set()
        self._atexit_registered = False

    # -- layout

    @property
    def nodes_dir(self) -> Path:
        return self.base_dir / "nodes"

    @property
    def _empty_file(self) -> Path:
        return self.base_dir / "empty-torrc"

    @property
    def _geoip(self) -> Path:
        return self.base_dir / "geoip-empty"

    @property
    def _geoip6(self) -> Path:
        return self.base_dir / "geoip6-empty"

    @property
    def authorities(self) -> list[TorInstance]:
        return [i for i in self.instances.values() if i.role is Role.AUTHORITY]

    @property
    def relays(self) -> list[TorInstance]:
        """Authorities and relays: every tor with an ORPort (all are HSDirs here)."""
        return [i for i in self.instances.values() if i.role in (Role.AUTHORITY, Role.RELAY)]

    @property
    def clients(self) -> list[TorInstance]:
        return [i for i in self.instances.values() if i.role is Role.CLIENT]

    @property
    def onion_services(self) -> list[TorInstance]:
        return [i for i in self.instances.values() if i.role is Role.ONION_SERVICE]

    def _ports(self, count: int) -> list[int]:
        ports = pick_free_ports(count, self._used_ports)
        self._used_ports.update(ports)
        return ports

    def _new_instance(self, name: str, role: Role) -> TorInstance:
        if not _NICK_RE.match(name):
            raise TorProcessError(f"tor node name {name!r} must be 1-19 letters or digits")
        if name in self.instances:
            raise TorProcessError(f"a tor named {name!r} already exists in this network")
        if name in self._removed_names:
            self._retire_data_dir(self.nodes_dir / name)
        server = role in (Role.AUTHORITY, Role.RELAY)
        ports = self._ports(4)
        inst = TorInstance(
            name=name,
            role=role,
            data_dir=self.nodes_dir / name,
            control_port=ports[0],
            socks_port=ports[1] if role is Role.CLIENT else None,
            or_port=ports[2] if server else None,
            dir_port=ports[3] if role is Role.AUTHORITY else None,
        )
        inst.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(inst.data_dir, 0o700)  # tor refuses a group-readable DataDirectory
        self.instances[name] = inst
        return inst

    @staticmethod
    def _retire_data_dir(data_dir: Path) -> None:
        """Move a removed tor's folder aside (``NAME.1``, ``NAME.2``…) before its name is reused.

        A new tor under an old name must not start from the old one's log (a log wait would match
        the old tor's lines) or its onion-service keys; the old folder stays for the logs.
        """
        if not data_dir.exists():
            return
        for n in range(1, 10_000):
            aside = data_dir.with_name(f"{data_dir.name}.{n}")
            if not aside.exists():
                data_dir.rename(aside)
                return
        raise TorProcessError(f"{data_dir}: too many earlier tors under this name")

    # -- keys (tor.md §13.3)

    def _prepare(self) -> None:
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        for path in (self._empty_file, self._geoip, self._geoip6):
            path.write_text("")
        auths = [self._new_instance(f"auth{i}", Role.AUTHORITY) for i in range(AUTHORITY_COUNT)]
        for i in range(self.n_relays):
            self._new_instance(f"relay{i}", Role.RELAY)
        gencerts: list[tuple[TorInstance, subprocess.Popen[bytes]]] = []
        for auth in auths:
            keys = auth.data_dir / "keys"
            keys.mkdir(mode=0o700, exist_ok=True)
            proc = subprocess.Popen(
                [
                    self.tor_gencert_binary,
                    "--create-identity-key",
                    "-m",
                    "12",
                    "-a",
                    f"127.0.0.1:{auth.dir_port}",
                    "-i",
                    str(keys / "authority_identity_key"),
                    "-s",
                    str(keys / "authority_signing_key"),
                    "-c",
                    str(keys / "authority_certificate"),
                    "--passphrase-fd",
                    "0",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=keys,
            )
            gencerts.append((auth, proc))
        fingerprints: list[tuple[TorInstance, subprocess.Popen[bytes]]] = []
        for auth, proc in gencerts:
            # An empty passphrase line on stdin: never on the command line.
            out, _ = proc.communicate(b"\n", timeout=60)
            if proc.returncode != 0:
                raise TorProcessError(
                    f"tor-gencert failed for {auth.name} (exit {proc.returncode}): "
                    + out.decode(errors="replace")[-500:]
                )
            fingerprints.append((auth, self._popen_list_fingerprint(auth)))
        for auth, proc in fingerprints:
            out, err = proc.communicate(timeout=60)
            fields = out.decode(errors="replace").split()
            if proc.returncode != 0 or len(fields) < 2 or fields[0] != auth.name:
                raise TorProcessError(
                    f"tor --list-fingerprint failed for {auth.name} (exit {proc.returncode}): "
                    + (out + err).decode(errors="replace")[-500:]
                )
            fingerprint = "".join(fields[1:])
            cert = (auth.data_dir / "keys" / "authority_certificate").read_text()
            match = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.MULTILINE)
            if match is None:
                raise TorProcessError(f"no fingerprint line in {auth.name}'s authority_certificate")
            self._dir_authority_lines.append(
                f"DirAuthority {auth.name} orport={auth.or_port} no-v2 "
                f"v3ident={match.group(1)} 127.0.0.1:{auth.dir_port} {fingerprint}"
            )

    def _popen_list_fingerprint(self, inst: TorInstance) -> subprocess.Popen[bytes]:
        # Empty regular files for -f and --defaults-torrc: "-f /dev/null" fails (tor.md §13.10).
        return subprocess.Popen(
            [
                self.tor_binary,
                "--defaults-torrc",
                str(self._empty_file),
                "-f",
                str(self._empty_file),
                "--quiet",
                "--DataDirectory",
                str(inst.data_dir),
                "--Nickname",
                inst.name,
                "--ORPort",
                "1",
                "--list-fingerprint",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    # -- torrc (tor.md §13.2)

    def client_torrc_lines(self) -> list[str]:
        """The lines any other tor needs to join this network (e.g. a ManagedTor's extra lines)."""
        if not self._dir_authority_lines:
            raise TorProcessError("the network has no authorities yet: call start() first")
        return [
            # Testing defaults: private addresses allowed, no download delays (tor manual).
            "TestingTorNetwork 1",
            *self._dir_authority_lines,
            "AssumeReachable 1",
            # Small network: tor would otherwise wait for 60 % of paths (tor manual).
            "PathsNeededToBuildCircuits 0.25",
            "ClientUseIPv6 0",
            # Empty GeoIP files save ~35 MB per tor (tor.md §13.8).
            f"GeoIPFile {self._geoip}",
            f"GeoIPv6File {self._geoip6}",
        ]

    def _torrc(self, inst: TorInstance, extra: Sequence[str] = ()) -> str:
        lines = [
            f"# {inst.role.value} {inst.name} of the rustbalance private Tor network",
            *self.client_torrc_lines(),
            f"DataDirectory {inst.data_dir}",
            f"Nickname {inst.name}",
            # Daemonised: a config error is a non-zero exit at once (tor.md §13.7).
            "RunAsDaemon 1",
            f"PidFile {inst.pid_file}",
            f"Log notice file {inst.log_path}",
            "SafeLogging 0",
            "ShutdownWaitLength 0",
            f"ControlPort 127.0.0.1:{inst.control_port}",
            "CookieAuthentication 1",
            # Exit when the Python process that built the network is gone (tor manual).
            f"__OwningControllerProcess {self.owning_pid}",
        ]
        if inst.role in (Role.AUTHORITY, Role.RELAY):
            lines += [
                "SocksPort 0",
                "Address 127.0.0.1",
                f"ORPort 127.0.0.1:{inst.or_port}",
                "ContactInfo rustbalance private test network",
                "ExitRelay 1",
                "ExitPolicy accept 127.0.0.0/8:*",
                "ExitPolicy reject *:*",
                "ExitPolicyRejectLocalInterfaces 0",
                "ServerDNSDetectHijacking 0",
                "ServerDNSAllowBrokenConfig 1",
            ]
        if inst.role is Role.AUTHORITY:
            lines += [
                f"DirPort 127.0.0.1:{inst.dir_port}",
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                f"TestingV3AuthInitialVotingInterval {self.voting_interval}",
                f"TestingV3AuthInitialVoteDelay {self.vote_delay}",
                f"TestingV3AuthInitialDistDelay {self.dist_delay}",
                f"V3AuthVotingInterval {self.voting_interval}",
                f"V3AuthVoteDelay {self.vote_delay}",
                f"V3AuthDistDelay {self.dist_delay}",
                "V3AuthNIntervalsValid 2",
                # Every relay gets Guard, Exit and HSDir from the first consensus (tor.md §13.2).
                "TestingDirAuthVoteGuard *",
                "TestingDirAuthVoteExit *",
                "TestingDirAuthVoteHSDir *",
                "TestingMinExitFlagThreshold 0",
            ]
            if self.consensus_params:
                lines.append(f"ConsensusParams {self.consensus_params}")
        if inst.role is Role.CLIENT:
            lines.append(f"SocksPort 127.0.0.1:{inst.socks_port}")
        if inst.role is Role.ONION_SERVICE:
            lines.append("SocksPort 0")
        for line in extra:
            if "\n" in line or "\r" in line:
                raise TorProcessError(f"torrc line contains a line break: {line!r}")
        lines += extra
        return "\n".join(lines) + "\n"

    def _write_torrc(self, inst: TorInstance, extra: Sequence[str] = ()) -> None:
        fd = os.open(inst.torrc_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._torrc(inst, extra))

    # -- processes

    def _launch(self, instances: Sequence[TorInstance]) -> None:
        """Start tors in parallel; each returns once daemonised (non-zero exit = config error)."""
        procs: list[tuple[TorInstance, subprocess.Popen[bytes]]] = []
        for inst in instances:
            inst._pid = None
            inst.pid_file.unlink(missing_ok=True)
            procs.append(
                (
                    inst,
                    subprocess.Popen(
                        [
                            self.tor_binary,
                            "--defaults-torrc",
                            str(self._empty_file),
                            "-f",
                            str(inst.torrc_path),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
        failures: list[str] = []
        failed: set[str] = set()
        for inst, proc in procs:
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                failed.add(inst.name)
                failures.append(
                    f"{inst.name} exited with code {proc.returncode}:\n"
                    + out.decode(errors="replace")[-1500:]
                    + f"\nlast lines of {inst.log_path}:\n{inst.log_tail()}"
                )
        for inst, _ in procs:
            if inst.name in failed:
                continue
            # The daemon writes its pid file right after forking; give it a moment.
            deadline = time.monotonic() + 10
            while inst.pid is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if inst.pid is None:
                failures.append(f"{inst.name} wrote no pid file {inst.pid_file}")
        if failures:
            raise TorProcessError("tor failed to start: " + "\n".join(failures))

    def start(self, timeout: float = DEFAULT_START_TIMEOUT, wait: bool = True) -> None:
        """Generate keys, start authorities and relays, then clients, and wait until ready.

        Steps (all within ``timeout`` seconds, counted from the call): an authority publishes a
        consensus listing ``min_hsdirs`` HSDirs; the clients start; every client logs
        ``Bootstrapped 100%`` and its cached microdesc consensus lists ``min_hsdirs`` HSDirs.
        With ``wait=False`` everything is launched at once and nothing is awaited. On failure
        everything started is stopped and :class:`TorProcessError` names the stuck step and the
        log files (which stay on disk).
        """
        if self.started:
            raise TorProcessError("the network is already started")
        began = time.monotonic()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._prepare()
            for i in range(self.n_clients):
                self._new_instance(f"client{i}", Role.CLIENT)
            for inst in self.instances.values():
                self._write_torrc(inst)
            self._launch(self.relays)
            self.started = True
            if wait:
                # Clients started before the consensus back off after the authorities' 404s
                # and can miss it by 20 s or more, and the first consensus often lists only
                # the authorities (observed): start clients once a complete one exists.
                self._wait_authority_consensus(began + timeout, timeout)
            self._launch(self.clients)
            if wait:
                self._wait_ready(began + timeout, timeout)
                self.ready_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def _check_alive(self, instances: Sequence[TorInstance]) -> None:
        dead = [i for i in instances if not i.is_running()]
        if dead:
            details = "\n".join(f"--- {i.name} ({i.log_path}):\n{i.log_tail()}" for i in dead)
            raise TorProcessError(f"tor exited unexpectedly: {[i.name for i in dead]}\n{details}")

    def _wait_authority_consensus(self, deadline: float, timeout: float) -> None:
        """Wait until an authority published a consensus listing ``min_hsdirs`` HSDirs."""
        files = [a.data_dir / "cached-microdesc-consensus" for a in self.authorities]
        best = -1
        while True:
            self._check_alive(self.relays)
            for path in files:
                try:
                    best = max(best, summarize_consensus(path.read_text()).hsdir_count)
                except FileNotFoundError:
                    continue
            if best >= self.min_hsdirs:
                return
            if time.monotonic() >= deadline:
                seen = "none yet" if best < 0 else f"latest lists {best} HSDirs"
                raise TorProcessError(
                    f"private Tor network not ready after {timeout:.0f} s; stuck at the "
                    f"authorities' consensus with >= {self.min_hsdirs} HSDirs ({seen}); "
                    f"logs: {self.nodes_dir}/*/tor.log"
                )
            time.sleep(_POLL)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        while True:
            self._check_alive(list(self.instances.values()))
            lagging = [c for c in self.clients if c.bootstrap_progress() < 100]
            summary = self.consensus_summary() if not lagging else None
            if summary is not None and summary.hsdir_count >= self.min_hsdirs:
                return
            if time.monotonic() >= deadline:
                if lagging:
                    step = "client bootstrap to 100 %: " + ", ".join(
                        f"{c.name} at {c.bootstrap_progress()} %" for c in lagging
                    )
                else:
                    seen = "no consensus" if summary is None else f"{summary.hsdir_count}"
                    step = f"consensus with >= {self.min_hsdirs} HSDirs (client sees {seen})"
                raise TorProcessError(
                    f"private Tor network not ready after {timeout:.0f} s; stuck at {step}; "
                    f"logs: {self.nodes_dir}/*/tor.log"
                )
            time.sleep(_POLL)

    def consensus_text(self, client: TorInstance | None = None) -> str | None:
        """A client's ``cached-microdesc-consensus`` (None before it has one)."""
        inst = client or self.clients[0]
        try:
            return (inst.data_dir / "cached-microdesc-consensus").read_text(errors="replace")
        except FileNotFoundError:
            return None

    def consensus_summary(self, client: TorInstance | None = None) -> ConsensusSummary | None:
        text = self.consensus_text(client)
        return None if text is None else summarize_consensus(text)

    def add_client(
        self,
        name: str,
        timeout: float = DEFAULT_START_TIMEOUT,
        extra_lines: Sequence[str] = (),
    ) -> TorInstance:
        """Start one more client (SocksPort, ControlPort with cookie auth); wait for 100 %.
        ``extra_lines`` are added to its torrc (e.g. an info-level log for a diagnosis)."""
        self._require_started()
        inst = self._new_instance(name, Role.CLIENT)
        self._write_torrc(inst, extra_lines)
        self._start_one(inst, timeout)
        return inst

    def add_onion_service(
        self,
        name: str,
        ports: Mapping[int, int | str],
        extra_lines: Sequence[str] = (),
        onionbalance_master: str | None = None,
        *,
        hidden_service_dir: Path | None = None,
        timeout: float = DEFAULT_START_TIMEOUT,
    ) -> TorInstance:
        """Start a tor hosting one onion service (``HiddenServiceDir``).

        ``ports`` maps a virtual port to a local port or a ``HOST:PORT`` / ``unix:`` target.
        ``onionbalance_master`` makes it an Onionbalance instance of that master address
        (``ob_config`` written before tor starts, tor.md §11). ``hidden_service_dir`` may hold
        keys written beforehand (e.g. by ``write_hidden_service_dir``). Returns once tor wrote
        the ``hostname`` file and bootstrapped to 100 %.
        """
        self._require_started()
        if not ports:
            raise TorProcessError("an onion service needs at least one port")
        if onionbalance_master is not None and not _ONION_RE.match(onionbalance_master):
            raise TorProcessError(f"not a v3 onion address: {onionbalance_master!r}")
        inst = self._new_instance(name, Role.ONION_SERVICE)
        hs_dir = (hidden_service_dir or inst.data_dir / "hs").absolute()
        hs_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(hs_dir, 0o700)  # tor refuses a HiddenServiceDir others can read
        inst.hidden_service_dir = hs_dir
        lines = [f"HiddenServiceDir {hs_dir}"]
        for virt, target in ports.items():
            where = f"127.0.0.1:{target}" if isinstance(target, int) else target
            lines.append(f"HiddenServicePort {virt} {where}")
        if onionbalance_master is not None:
            lines.append("HiddenServiceOnionbalanceInstance 1")
            (hs_dir / "ob_config").write_text(f"MasterOnionAddress {onionbalance_master}\n")
        self._write_torrc(inst, [*lines, *extra_lines])
        self._start_one(inst, timeout)
        return inst

    def _start_one(self, inst: TorInstance, timeout: float) -> None:
        try:
            self._launch([inst])
            inst.wait_for_log(r"Bootstrapped 100%", timeout)
            if inst.hidden_service_dir is not None:
                deadline = time.monotonic() + 10
                while inst.onion_address is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if inst.onion_address is None:
                    raise TorProcessError(
                        f"{inst.name}: no hostname file in {inst.hidden_service_dir}"
                    )
        except BaseException:
            _stop_all([inst], STOP_GRACE_SECONDS)
            raise

    def _require_started(self) -> None:
        if not self.started:
            raise TorProcessError("start() the network before adding clients or services")

    def remove(self, inst: TorInstance) -> None:
        """Stop one tor and forget it (its data directory stays for the logs)."""
        inst.stop()
        if self.instances.pop(inst.name, None) is not None:
            self._removed_names.add(inst.name)

    def stop(self) -> None:
        """Stop every tor this network started, by PID (SIGTERM, SIGKILL after 10 s)."""
        _stop_all(list(self.instances.values()), STOP_GRACE_SECONDS)
        self.started = False

    def pids(self) -> dict[str, int]:
        return {name: i.pid for name, i in self.instances.items() if i.pid is not None}

    def memory_rss_bytes(self) -> dict[str, int]:
        return {name: i.rss_bytes() for name, i in self.instances.items()}

    def collect_logs(self, dest_dir: Path | str) -> Path:
        """Copy every tor's log and torrc into ``dest_dir/<name>/`` (no keys, no cookies)."""
        dest = Path(dest_dir)
        for name, inst in self.instances.items():
            target = dest / name
            target.mkdir(parents=True, exist_ok=True)
            for src in (inst.log_path, inst.torrc_path):
                if src.exists():
                    shutil.copy2(src, target / src.name)
        return dest
