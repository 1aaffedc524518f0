"""systemd's notify protocol without libsystemd (sd_notify(3)).

When the daemon runs under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``. We send newline-separated
``KEY=value`` assignments as one datagram: ``READY=1`` once serving, ``STATUS=...`` for
``systemctl status``, ``EXTEND_TIMEOUT_USEC=...`` while a start or stop step takes long,
``WATCHDOG=1`` keep-alives at half the watchdog interval, ``STOPPING=1`` on shutdown.
Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same anywhere.
Sending never raises: a lost notification must not take the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)


# What systemd tells the main process only (sd_notify(3), sd_watchdog_enabled(3)).
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    """Send sd_notify datagrams; a no-op when ``NOTIFY_SOCKET`` is unset.

    Reading the process environment (``env`` None) also removes the notify variables from it,
    as sd_notify(3)'s ``unset_environment`` does: the children we start (our managed tor,
    which speaks sd_notify itself, wireguard-go, ip, wg) must not talk to our service manager.
    Under ``NotifyAccess=main`` systemd drops their messages anyway, but logs a warning for
    each one ("Got notification message from PID ..."), and a child's READY=1 must never count.
    """

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        if env is None:
            env = dict(os.environ)
            for name in NOTIFY_VARIABLES:
                os.environ.pop(name, None)
        self._pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            log.warning("Ignoring NOTIFY_SOCKET %r: not a path or abstract socket", raw)
        self._watchdog_usec = self._parse_watchdog(env)

    def _parse_watchdog(self, env: Mapping[str, str]) -> int | None:
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return None
        # sd_watchdog_enabled(3): WATCHDOG_PID, when set, must name this process.
        owner = env.get("WATCHDOG_PID")
        if owner and owner != str(self._pid):
            return None
        try:
            value = int(usec)
        except ValueError:
            log.warning("Ignoring WATCHDOG_USEC %r: not an integer", usec)
            return None
        return value if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, None if disabled."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if sent."""
        if self._address is None:
            return False
        for item in assignments:
            if "\n" in item or "=" not in item:
                raise ValueError(f"invalid sd_notify assignment {item!r}")
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *((_status(status),) if status else ()))

    def status(self, text: str) -> bool:
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None, *, extend: float | None = None) -> bool:
        return self.notify("STOPPING=1", *((_status(status),) if status else ()), *_extend(extend))

    def progress(self, status: str, *, extend: float | None = None) -> bool:
        """``STATUS=`` and, with ``extend``, ``EXTEND_TIMEOUT_USEC=``: systemd's start (or
        stop) timeout becomes at least ``extend`` seconds from now (sd_notify(3))."""
        return self.notify(_status(status), *_extend(extend))


def _extend(seconds: float | None) -> tuple[str, ...]:
    if seconds is None:
        return ()
    return (f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}",)


def _status(text: str) -> str:
    # STATUS is one line; fold anything else rather than fail.
    return "STATUS=" + " ".join(text.splitlines())


async def run_watchdog_pings(
    notifier: SystemdNotifier,
    *,
    sleep: Callable[[float], Awaitable[None]],
    problem: Callable[[], str | None] = lambda: None,
) -> None:
    """Ping systemd's watchdog forever (a supervised task: it never returns).

    Without a watchdog it just waits until cancelled, so a supervisor never sees it "exit".
    A ping is withheld while ``problem()`` names one (node/health.py), so systemd restarts a
    node that cannot heal itself; the reason is logged when it appears or changes.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        await asyncio.Event().wait()
        return
    reported: str | None = None
    while True:
        why = problem()
        if why is None:
            notifier.watchdog()
        elif why != reported:
            log.warning(
                "Withholding the systemd watchdog ping (systemd restarts the node if this "
                "lasts): %s",
                why,
            )
        reported = why
        await sleep(interval)
