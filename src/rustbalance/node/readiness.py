"""Readiness and what systemd is told about it (sd_notify, node/sdnotify.py; issue 17).

The one owner of "is this node ready". A node is ready when it serves (:class:`Serving`): its
proxy listens, tor has bootstrapped (``Bootstrapped 100%`` in the managed tor's log, or
``status/bootstrap-phase`` PROGRESS=100 of the system tor, control-spec §4.1.10), and tor's
onion service has intro points (tor built its descriptor, ``hs/service/desc/id``; read by
node/intro_watch.py). Not after the first upload of the master descriptor: a standby never
uploads, and slow HSDirs must not hold start-up. :meth:`Readiness.mark_ready` (through the
facts reported to it) logs "Node ready: <why>" and sends ``READY=1`` once.

While the node waits, each step of progress (the proxy listening, each new bootstrap
percentage, bootstrap done) sends ``STATUS=`` and ``EXTEND_TIMEOUT_USEC=`` with what the
current step may still take (:func:`start_extension`): tor's bootstrap gets
``tor.bootstrap_timeout_secs`` (after which the daemon gives up by itself, exit 1), tor's
intro circuits ``publish.first_publish_max_wait_secs``. So ``TimeoutStartSec=`` can be short,
a slow bootstrap that progresses extends the start, and a node that stops progressing is
stopped by systemd. Every ``STATUS=`` line, the ``WATCHDOG=1`` pings (only while
node/health.py finds no problem) and ``STOPPING=1`` (with the shutdown budget as extension)
go through here as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from rustbalance.config import Config
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.sdnotify import SystemdNotifier, run_watchdog_pings

__all__ = [
    "EXTEND_MARGIN_SECS",
    "Readiness",
    "Serving",
    "StartBudgets",
    "start_extension",
]

log = logging.getLogger(DAEMON_LOGGER)

# Added to every extension: the step's own bound must run out (and be handled by the daemon,
# with a clear log line) before systemd's does.
EXTEND_MARGIN_SECS = 10.0


@dataclass(frozen=True)
class Serving:
    """What "serving" needs, as known so far (pure)."""

    proxy: str | None = None  # where the proxy listens, once it does
    bootstrap: int = 0  # tor's bootstrap percentage
    intro_points: int = 0  # intro points of tor's own descriptor

    @property
    def ready(self) -> bool:
        return self.proxy is not None and self.bootstrap >= 100 and self.intro_points > 0

    def why(self) -> str:
        return (
            f"proxy listening on {self.proxy}, tor bootstrapped, {self.intro_points} intro points"
        )

    def waiting_for(self) -> str:
        """``systemctl status``'s line while not ready."""
        if self.proxy is None:
            return "Starting the proxy"
        if self.bootstrap < 100:
            return f"Waiting for tor to bootstrap ({self.bootstrap}%)"
        return "Waiting for intro points"


@dataclass(frozen=True)
class StartBudgets:
    """How long each step of the start may take (seconds)."""

    bootstrap: float  # tor.bootstrap_timeout_secs
    intro_points: float  # publish.first_publish_max_wait_secs


def start_extension(serving: Serving, budgets: StartBudgets) -> float | None:
    """Seconds systemd should wait from now for the current step, None when nothing is
    awaited (ready, or the proxy not started: that step is immediate)."""
    if serving.ready or serving.proxy is None:
        return None
    if serving.bootstrap < 100:
        return budgets.bootstrap + EXTEND_MARGIN_SECS
    return budgets.intro_points + EXTEND_MARGIN_SECS


class Readiness:
    def __init__(self, notifier: SystemdNotifier, clock: Clock, budgets: StartBudgets) -> None:
        self.notifier = notifier
        self._clock = clock
        self._budgets = budgets
        self.serving = Serving()
        self.ready = False

    @classmethod
    def for_config(cls, notifier: SystemdNotifier, clock: Clock, config: Config) -> Readiness:
        budgets = StartBudgets(
            bootstrap=config.tor.bootstrap_timeout_secs,
            intro_points=config.publish.first_publish_max_wait_secs,
        )
        return cls(notifier, clock, budgets)

    # -- what start-up reports ----------------------------------------------------------------

    def starting(self) -> None:
        """The first thing start-up says: what precedes tor's bootstrap (the mesh, the folders,
        the proxy) is quick, but the bootstrap's budget covers it from the start."""
        self.notifier.progress("Starting", extend=self._budgets.bootstrap + EXTEND_MARGIN_SECS)

    def proxy_listening(self, where: str) -> None:
        self._update(replace(self.serving, proxy=where))

    def tor_bootstrap(self, percent: int) -> None:
        """tor's bootstrap progress; a value that is no progress changes nothing."""
        if percent > self.serving.bootstrap:
            self._update(replace(self.serving, bootstrap=min(percent, 100)))

    def intro_points(self, count: int) -> None:
        if count != self.serving.intro_points:
            self._update(replace(self.serving, intro_points=count))

    def _update(self, serving: Serving) -> None:
        self.serving = serving
        if self.ready:
            return
        if serving.ready:
            self.mark_ready(serving.why())
            return
        extend = start_extension(serving, self._budgets)
        self.notifier.progress(serving.waiting_for(), extend=extend)

    def mark_ready(self, why: str) -> None:
        if self.ready:
            return
        self.ready = True
        log.info("Node ready: %s", why)
        self.notifier.ready(f"Serving: {why}")

    # -- the rest of what systemd hears -------------------------------------------------------

    def status(self, text: str) -> None:
        """``systemctl status``'s one-line status."""
        self.notifier.status(text)

    def stopping(self, budget: float) -> None:
        """The first thing of every shutdown: systemd waits ``budget`` (+ margin) for it."""
        self.notifier.stopping("Shutting down", extend=budget + EXTEND_MARGIN_SECS)

    async def watchdog_pings(self, problem: Callable[[], str | None] = lambda: None) -> None:
        """Supervised task: systemd's ``WatchdogSec=`` pings (or waits forever without)."""
        await run_watchdog_pings(self.notifier, sleep=self._clock.sleep, problem=problem)
