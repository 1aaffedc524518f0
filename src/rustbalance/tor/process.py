"""The Tor process interface: a tor the daemon starts itself, or one run by systemd.

``TorProcess`` is what the node's watchdog talks to. Two implementations:

* :class:`ManagedTor` runs tor as a child process with a torrc it writes itself (SocksPort,
  ControlPort and cookie authentication are generated here; onion-service and extra lines come from
  the caller). Readiness is read from tor's own log (``Bootstrapped 100%``), so this module does not
  depend on the control-port client.
* :class:`SystemTor` drives a tor run by systemd through an injectable async command runner, trying
  the unit ``tor@default`` first, then ``tor``, then ``service tor ...`` (spec Phase 1.1/1.2: Debian
  installs the real instance as ``tor@default``; ``tor.service`` is only a wrapper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from rustbalance.atomic_file import write_file_atomic
from rustbalance.errors import TorProcessError, UnsafePathError
from rustbalance.rules import torrc_value_problem
from rustbalance.secure_dir import ensured_dir

__all__ = [
    "CommandResult",
    "CommandRunner",
    "ManagedTor",
    "SystemTor",
    "TorProcess",
    "pick_free_ports",
    "pid_is_alive",
    "run_command",
]

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
DEFAULT_BOOTSTRAP_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.2
# Starts of a managed tor whose own picked ports were taken before tor bound them (another
# process picked the same free port): tor's "Could not bind to ADDR:PORT: Address already in
# use" (tor src/core/mainloop/connection.c, connection_listener_new).
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 15

# Options ManagedTor generates itself; a caller line setting one of them would add a second
# listener or fight over the data directory, so it is refused (option names are case-insensitive).
_RESERVED_OPTIONS = frozenset(
    {
        "datadirectory",
        "socksport",
        "controlport",
        "controlsocket",
        "cookieauthentication",
        "cookieauthfile",
        "runasdaemon",
        "pidfile",
        "log",
        "__owningcontrollerprocess",
    }
)

_BOOTSTRAP_RE = re.compile(r"Bootstrapped (\d{1,3})%")


@runtime_checkable
class TorProcess(Protocol):
    """A tor the node depends on: start it, stop it, see whether it lives, restart it."""

    @property
    def control_address(self) -> str:
        """``HOST:PORT`` of the control port, or the path of a control unix socket."""
        ...

    @property
    def socks_address(self) -> tuple[str, int]:
        """(host, port) of the SOCKS port."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def is_running(self) -> bool: ...

    async def restart(self) -> None: ...


# --------------------------------------------------------------------------------------------
# small helpers shared with rustbalance.testnet


def pick_free_ports(count: int, exclude: set[int] | None = None) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that the OS reports free right now.

    All sockets are bound (port 0) at the same time before any is released, so the ports are
    distinct; ``exclude`` lets a caller skip ports it already handed out but has not bound yet.
    """
    exclude = exclude or set()
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        attempts = 0
        while len(ports) < count:
            attempts += 1
            if attempts > count + 100:
                raise TorProcessError(f"could not find {count} free TCP ports on 127.0.0.1")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def pid_is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has exited; only its parent waits)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain ") ".
    state = data.rpartition(")")[2].split()
    return bool(state) and state[0] not in ("Z", "X")


def read_log_tail(path: Path, lines: int = _LOG_TAIL_LINES, start: int = 0) -> str:
    """The last ``lines`` lines of a log file from byte offset ``start`` ("" if missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def bootstrap_progress(log_text: str) -> int:
    """Highest ``Bootstrapped NN%`` tor has logged in ``log_text`` (0 if none)."""
    values = [int(m.group(1)) for m in _BOOTSTRAP_RE.finditer(log_text)]
    return max(values, default=0)


def _check_torrc_line(line: str) -> None:
    if "\n" in line or "\r" in line or "\0" in line:
        raise TorProcessError(f"torrc line contains a line break or NUL: {line!r}")
    option = line.strip().split(maxsplit=1)[0].lower() if line.strip() else ""
    if option in _RESERVED_OPTIONS:
        raise TorProcessError(
            f"torrc option {line.split()[0]!r} is generated by ManagedTor; do not pass it"
        )


# --------------------------------------------------------------------------------------------
# ManagedTor


class TorDataFiles:
    """The files we read or write in one tor's DataDirectory (shared by ManagedTor and the
    private network's instances)."""

    data_dir: Path

    @property
    def torrc_path(self) -> Path:
        return self.data_dir / "torrc"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "tor.log"

    @property
    def control_cookie_path(self) -> Path:
        return self.data_dir / "control_auth_cookie"


class ManagedTor(TorDataFiles):
    """tor as a child process of the daemon.

    ``<data_dir>/torrc`` (mode 0600, data dir 0700) holds the generated lines followed by the
    caller's ``torrc_lines``; tor's notices go to ``<data_dir>/tor.log``. :meth:`start` returns
    once tor logged ``Bootstrapped 100%`` and the control port accepts connections (or, with
    ``wait_for_bootstrap=False``, as soon as the control port is up, e.g. for ``DisableNetwork 1``);
    ``on_progress`` hears each new ``Bootstrapped NN%`` meanwhile.
    """

    def __init__(
        self,
        data_dir: Path | str,
        torrc_lines: Sequence[str] = (),
        *,
        tor_binary: str = "tor",
        socks_port: int | None = None,
        control_port: int | None = None,
        bootstrap_timeout: float = DEFAULT_BOOTSTRAP_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        wait_for_bootstrap: bool = True,
        owning_pid: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        for line in torrc_lines:
            _check_torrc_line(line)
        self.data_dir = Path(data_dir).absolute()
        self.torrc_lines = list(torrc_lines)
        self.tor_binary = tor_binary
        # Ports the caller left to us may be picked again while tor never ran on them.
        self._picked_socks = socks_port is None
        self._picked_control = control_port is None
        needed = [p for p in (socks_port, control_port) if p is None]
        free = iter(pick_free_ports(len(needed)))
        self.socks_port = socks_port if socks_port is not None else next(free)
        self.control_port = control_port if control_port is not None else next(free)
        self._ever_started = False
        self.bootstrap_timeout = bootstrap_timeout
        self.stop_timeout = stop_timeout
        self.wait_for_bootstrap = wait_for_bootstrap
        # tor exits by itself when this PID disappears, so a crashed daemon leaves no orphan
        # (tor manual: __OwningControllerProcess). Defaults to the current process.
        self.owning_pid = owning_pid if owning_pid is not None else os.getpid()
        self._proc: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        # Told each new bootstrap percentage while start() waits (systemd's start extension).
        self._on_progress = on_progress

    # -- addresses and paths

    @property
    def control_address(self) -> str:
        return f"{LOCALHOST}:{self.control_port}"

    @property
    def socks_address(self) -> tuple[str, int]:
        return (LOCALHOST, self.socks_port)

    @property
    def pid(self) -> int | None:
        """PID of the running child, None before start and after it exited."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    def torrc_text(self) -> str:
        """The torrc ManagedTor writes: generated lines, then the caller's lines."""
        for option, path in (
            ("DataDirectory", self.data_dir),
            ("CookieAuthFile", self.control_cookie_path),
        ):
            # A path holding a newline would add options of its own (rules.py).
            if problem := torrc_value_problem(str(path)):
                raise TorProcessError(f"{option} {str(path)!r}: {problem}")
        generated = [
            "# Written by rustbalance ManagedTor; edits are overwritten on start.",
            f"DataDirectory {self.data_dir}",
            f"SocksPort {LOCALHOST}:{self.socks_port}",
            f"ControlPort {LOCALHOST}:{self.control_port}",
            # Cookie auth: only processes that can read the data dir can control tor.
            "CookieAuthentication 1",
            f"CookieAuthFile {self.control_cookie_path}",
            # Notices to stdout, which start() redirects into tor.log next to early config errors.
            "Log notice stdout",
            f"__OwningControllerProcess {self.owning_pid}",
        ]
        return "\n".join([*generated, *self.torrc_lines]) + "\n"

    def _write_files(self) -> Path:
        torrc = self.torrc_text()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # tor refuses a DataDirectory others can read (tor manual: DataDirectoryGroupReadable);
        # opened without following a symlink another user could have planted, the files
        # written relative to it (rustbalance.secure_dir).
        defaults = self.data_dir / "torrc-defaults"
        try:
            with ensured_dir(self.data_dir, mode=0o700) as dir_fd:
                write_file_atomic(self.torrc_path.name, torrc, 0o600, dir_fd=dir_fd)
                # An empty defaults file keeps /etc/tor/torrc-defaults out (tor.md §13.10
                # pitfall 1).
                write_file_atomic(defaults.name, "", 0o600, dir_fd=dir_fd)
        except UnsafePathError as exc:
            raise TorProcessError(f"tor data directory: {exc}") from None
        return defaults

    # -- lifecycle

    async def start(self) -> None:
        if await self.is_running():
            raise TorProcessError(f"tor in {self.data_dir} is already running (pid {self.pid})")
        attempt = 1
        while True:
            try:
                await self._start_once()
            except TorProcessError:
                taken = self._taken_picked_ports()
                if not taken or attempt >= _PORT_ATTEMPTS:
                    raise
                # Only before the first successful start: afterwards a controller may hold
                # the address (restart() keeps the ports).
                log.warning(
                    "tor could not bind port(s) %s that another process took first; "
                    "starting it again on other free ports (attempt %d of %d)",
                    ", ".join(str(port) for port in taken),
                    attempt + 1,
                    _PORT_ATTEMPTS,
                )
                self._pick_again(taken)
                attempt += 1
                continue
            self._ever_started = True
            return

    def _taken_picked_ports(self) -> list[int]:
        """Our own picked ports that tor's last start-up could not bind (never after a
        successful start)."""
        if self._ever_started:
            return []
        text = self._new_log_text()
        picked = [
            port
            for port, ours in (
                (self.socks_port, self._picked_socks),
                (self.control_port, self._picked_control),
            )
            if ours
        ]
        return [port for port in picked if f"Could not bind to {LOCALHOST}:{port}: " in text]

    def _pick_again(self, taken: list[int]) -> None:
        fresh = iter(pick_free_ports(len(taken), exclude={self.socks_port, self.control_port}))
        if self.socks_port in taken:
            self.socks_port = next(fresh)
        if self.control_port in taken:
            self.control_port = next(fresh)

    async def _start_once(self) -> None:
        defaults = self._write_files()
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        started = time.monotonic()
        with self.log_path.open("ab") as log_fh:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    self.tor_binary,
                    "--defaults-torrc",
                    str(defaults),
                    "-f",
                    str(self.torrc_path),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=log_fh,
                    start_new_session=True,
                )
            except OSError as exc:
                raise TorProcessError(f"cannot run tor binary {self.tor_binary!r}: {exc}") from exc
        log.info("started tor pid %d in %s", self._proc.pid, self.data_dir)
        try:
            await self._wait_ready(started)
        except BaseException:
            await self._terminate()
            raise
        log.info(
            "tor pid %d ready after %.1f s (control %s, socks %s:%d)",
            self._proc.pid,
            time.monotonic() - started,
            self.control_address,
            *self.socks_address,
        )

    def _new_log_text(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    async def _control_port_open(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(LOCALHOST, self.control_port), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wait_ready(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.bootstrap_timeout
        step = "control port"
        reported = -1
        while True:
            if self._proc.returncode is not None or not pid_is_alive(self._proc.pid):
                await self._proc.wait()
                raise TorProcessError(
                    f"tor exited with code {self._proc.returncode} during start-up "
                    f"(waiting for {step}); last lines of {self.log_path}:\n"
                    + read_log_tail(self.log_path, start=self._log_offset)
                )
            text = self._new_log_text()
            progress = bootstrap_progress(text)
            if self._on_progress is not None and progress > reported:
                reported = progress
                self._on_progress(progress)
            control_ready = self.control_cookie_path.exists() and await self._control_port_open()
            if control_ready:
                step = "Bootstrapped 100%"
                if not self.wait_for_bootstrap or bootstrap_progress(text) >= 100:
                    return
            if time.monotonic() >= deadline:
                raise TorProcessError(
                    f"tor did not reach {step!r} within {self.bootstrap_timeout:.0f} s "
                    f"(bootstrap at {bootstrap_progress(text)} %); last lines of "
                    f"{self.log_path}:\n" + read_log_tail(self.log_path, start=self._log_offset)
                )
            await asyncio.sleep(_POLL_INTERVAL)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            log.warning(
                "tor pid %d ignored SIGTERM for %.0f s, sending SIGKILL",
                proc.pid,
                self.stop_timeout,
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` seconds; no-op when not running."""
        if self._proc is None:
            return
        pid = self._proc.pid
        await self._terminate()
        log.info("tor pid %d stopped (exit code %s)", pid, self._proc.returncode)

    async def is_running(self) -> bool:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return False
        # After an outside SIGKILL the child watcher may not have reaped it yet: look at /proc.
        return pid_is_alive(proc.pid)

    async def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        await self.stop()
        await self.start()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return read_log_tail(self.log_path, lines)


# --------------------------------------------------------------------------------------------
# SystemTor


@dataclass(frozen=True)
class CommandResult:
    """What an external command did: exit code and decoded output."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


CommandRunner = Callable[[Sequence[str]], Awaitable[CommandResult]]


async def run_command(argv: Sequence[str], time_limit: float = 60.0) -> CommandResult:
    """Run ``argv`` (no shell) and return its result; a missing binary gives code 127."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return CommandResult(127, "", str(exc))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return CommandResult(124, "", f"timed out after {time_limit:.0f} s")
    assert proc.returncode is not None
    return CommandResult(
        proc.returncode,
        out.decode("utf-8", errors="replace"),
        err.decode("utf-8", errors="replace"),
    )


class SystemTor:
    """A tor run by systemd (Debian: ``tor@default``), controlled through its unit.

    Every action tries ``systemctl <action> tor@default``, then ``systemctl <action> tor``, then
    ``service tor <action>`` and stops at the first that exits 0. :attr:`last_method` names the
    command that worked, e.g. ``"systemctl restart tor@default"``.
    """

    UNITS: tuple[str, ...] = ("tor@default", "tor")

    def __init__(
        self,
        control_address: str,
        socks_address: tuple[str, int],
        runner: CommandRunner = run_command,
    ) -> None:
        self._control_address = control_address
        self._socks_address = socks_address
        self._runner = runner
        self.last_method: str | None = None

    @property
    def control_address(self) -> str:
        return self._control_address

    @property
    def socks_address(self) -> tuple[str, int]:
        return self._socks_address

    def _candidates(self, action: str) -> list[list[str]]:
        return [
            *(["systemctl", action, unit] for unit in self.UNITS),
            ["service", "tor", action],
        ]

    async def _run(self, argv: Sequence[str]) -> CommandResult:
        try:
            return await self._runner(argv)
        except OSError as exc:
            return CommandResult(127, "", str(exc))

    async def _first_success(self, action: str) -> str:
        failures: list[str] = []
        for argv in self._candidates(action):
            result = await self._run(argv)
            command = " ".join(argv)
            if result.returncode == 0:
                self.last_method = command
                return command
            detail = (result.stderr or result.stdout).strip().splitlines()
            failures.append(f"{command!r} -> {result.returncode} {detail[-1] if detail else ''}")
        raise TorProcessError(f"could not {action} tor; tried " + "; ".join(failures))

    async def is_running(self) -> bool:
        for unit in self.UNITS:
            result = await self._run(["systemctl", "is-active", "--quiet", unit])
            if result.returncode == 0:
                return True
        return False

    async def start(self) -> None:
        command = await self._first_success("start")
        log.info("Tor started via %s", command)

    async def stop(self) -> None:
        command = await self._first_success("stop")
        log.info("Tor stopped via %s", command)

    async def restart(self) -> None:
        command = await self._first_success("restart")
        via = "systemctl" if command.startswith("systemctl") else "service"
        log.info("Tor restarted via %s (%s)", via, command)
