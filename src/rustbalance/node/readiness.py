"""Readiness and what systemd is told about it (sd_notify, node/sdnotify.py).

The one owner of "is this node ready": :meth:`Readiness.mark_ready` logs "Node ready: <why>"
and sends ``READY=1`` once; every ``STATUS=`` line, the ``WATCHDOG=1`` pings and
``STOPPING=1`` go through here as well. Today a node is ready after its first successful
publish, when the first-publish wait ends without intro points (publishing retries), or as a
standby once its own intro points exist.

Later readiness rules change only this module and its callers' ``mark_ready`` points:
``READY=1`` once tor bootstrapped, the onion service is up and the proxy listens
(``EXTEND_TIMEOUT_USEC=`` while waiting for them), and watchdog pings only while the
supervised tasks are healthy (the ``healthy`` callable of :meth:`watchdog_pings`, fed by the
supervisor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.sdnotify import SystemdNotifier, run_watchdog_pings

__all__ = ["Readiness"]

log = logging.getLogger(DAEMON_LOGGER)


class Readiness:
    def __init__(self, notifier: SystemdNotifier, clock: Clock) -> None:
        self.notifier = notifier
        self._clock = clock
        self.ready = False

    def mark_ready(self, why: str) -> None:
        if self.ready:
            return
        self.ready = True
        log.info("Node ready: %s", why)
        self.notifier.ready(why)

    def status(self, text: str) -> None:
        """``systemctl status``'s one-line status."""
        self.notifier.status(text)

    async def stopping(self) -> None:
        """The first shutdown step."""
        self.notifier.stopping("Shutting down")

    async def watchdog_pings(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Supervised task: systemd's ``WatchdogSec=`` pings (or waits forever without)."""
        await run_watchdog_pings(self.notifier, sleep=self._clock.sleep, healthy=healthy)
