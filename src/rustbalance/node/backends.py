"""The asyncio shell around :class:`~rustbalance.node.backend_state.BackendBook`.

One supervised task (``backends``) on the node that publishes: for every due backend it

1. HSFETCHes the backend's descriptor (:func:`rustbalance.tor.network.fetch_descriptor`), which
   verifies it and decrypts it with the backend's *own* address (rend-spec-v3 §2.5), and
2. checks that the backend answers through its own address: a SOCKS5 CONNECT to
   ``<backend>.onion:<proxy.virtual_port>`` over tor, on an isolated circuit (a fresh SOCKS
   username, tor's ``IsolateSOCKSAuth`` default), closed at once. HSDirs keep a dead backend's
   descriptor for its whole lifetime, so only this shows that its tor (and intro points) died.

Fetches run concurrently (one per backend, bounded by the list). After every round the shell
reports up/down changes once (not every poll) and calls ``on_change`` when the merged set of
backend intro points changed, so the publisher republishes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from python_socks import ProxyError as SocksProxyError
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy as SocksProxy

from rustbalance.config import Config
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.backend_state import BackendBook, BackendSignature
from rustbalance.node.clock import Clock
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.snapshot import BackendSnapshot
from rustbalance.node.tor_network import TorNetwork

__all__ = [
    "FETCH_TIMEOUT_SECS",
    "PROBE_TIMEOUT_SECS",
    "BackendPoller",
    "backend_poller",
    "probe_onion",
]

log = logging.getLogger(__name__)
daemon_log = logging.getLogger(DAEMON_LOGGER)

# HSFETCH: tor asks up to 6 HSDirs; a cold circuit on a loaded network can take a while.
FETCH_TIMEOUT_SECS = 45.0
# Reachability: descriptor (cached by the fetch), intro and rendezvous circuits.
PROBE_TIMEOUT_SECS = 45.0
# The loop wakes at least this often to look at the publisher role and the schedule.
IDLE_SLEEP_SECS = 1.0

Fetch = Callable[[str], Awaitable[DecodedDescriptor]]
Probe = Callable[[str], Awaitable[None]]


async def probe_onion(
    socks: tuple[str, int],
    address: str,
    port: int,
    timeout: float = PROBE_TIMEOUT_SECS,  # noqa: ASYNC109 (bounds the SOCKS handshake too)
) -> None:
    """Connect to ``address:port`` through tor and close; raises on any failure."""
    host = address if address.endswith(".onion") else f"{address}.onion"
    # A fresh username = a fresh circuit (tor isolates streams by SOCKS auth by default), so a
    # probe never rides on a rendezvous circuit that an earlier probe built.
    # The "password" is no secret: tor ignores it except for isolation.
    isolation = f"rb-probe-{secrets.token_hex(8)}"
    proxy = SocksProxy(
        ProxyType.SOCKS5, socks[0], socks[1], username=isolation, password=isolation, rdns=True
    )
    async with asyncio.timeout(timeout):
        sock = await proxy.connect(host, port, timeout=timeout + 5)
    sock.close()


class BackendPoller:
    """Runs the fetch/probe rounds; ``is_active`` gates them (only the publisher fetches)."""

    def __init__(
        self,
        book: BackendBook,
        fetch: Fetch,
        probe: Probe,
        *,
        on_change: Callable[[str], None],
        is_active: Callable[[], bool],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.book = book
        self._fetch = fetch
        self._probe = probe
        self._on_change = on_change
        self._is_active = is_active
        self._clock = clock
        self._sleep = sleep
        self._signature: BackendSignature = ()
        self._was_active = False
        self.rounds = 0

    async def _cycle(self, address: str) -> None:
        book = self.book
        try:
            decoded = await self._fetch(address)
        except (ControlError, RustBalanceError, TimeoutError) as exc:
            book.record_fetch_failure(address, str(exc) or type(exc).__name__, self._clock())
            log.debug("Backend %s.onion: fetch failed: %s", address, exc)
            return
        book.record_fetch(
            address,
            decoded.intro_points,
            revision_counter=decoded.revision_counter,
            lifetime_mins=decoded.lifetime,
            now=self._clock(),
        )
        try:
            await self._probe(address)
        except (OSError, SocksProxyError, TimeoutError, RustBalanceError) as exc:
            book.record_probe(address, False, str(exc) or type(exc).__name__, self._clock())
            log.debug("Backend %s.onion: reachability check failed: %s", address, exc)
        else:
            book.record_probe(address, True, "", self._clock())

    def _report(self) -> None:
        now = self._clock()
        for change in self.book.transitions(now):
            if change.up:
                log.info("Backend %s.onion is up: %s", change.address, change.reason)
            else:
                log.warning("Backend %s.onion is down: %s", change.address, change.reason)
        signature = self.book.signature(now)
        if signature != self._signature:
            self._signature = signature
            total = sum(len(keys) for _, keys in signature)
            log.info(
                "Backend intro points changed: %d from %d backends, publishing",
                total,
                len(signature),
            )
            self._on_change("backend intro points changed")

    def snapshot(self, now: float) -> tuple[BackendSnapshot, ...]:
        """Every backend as ``status`` shows it."""
        return tuple(
            BackendSnapshot(
                address,
                self.book.down_reason(address, now),
                tuple(p.auth_key for p in state.intro_points),
            )
            for address, state in self.book.states.items()
        )

    async def run_once(self) -> None:
        """One round over the due backends (concurrently), then report."""
        due = self.book.due(self._clock())
        if due:
            await asyncio.gather(*(self._cycle(address) for address in due))
            self.rounds += 1
        self._report()

    async def run(self) -> None:
        """Supervised task."""
        while True:
            active = self._is_active()
            if active and not self._was_active:
                # Just became the publisher: what we knew may be old.
                self.book.expedite(self._clock())
            self._was_active = active
            if active:
                await self.run_once()
            next_due = self.book.next_due()
            wait = IDLE_SLEEP_SECS
            if active and next_due is not None:
                wait = min(max(next_due - self._clock(), 0.05), IDLE_SLEEP_SECS)
            await self._sleep(wait)


def backend_poller(
    config: Config,
    may_publish: bool,
    network: TorNetwork,
    views: ConsensusWatch,
    socks: Callable[[], tuple[str, int]],
    *,
    on_change: Callable[[str], None],
    is_active: Callable[[], bool],
    clock: Clock,
) -> BackendPoller | None:
    """The poller of ``master.backends`` over the node's tor (None without backends, or on a
    node that never publishes: ``may_publish`` is False without a master key)."""
    backends = config.master.backends
    if not backends:
        return None
    if not may_publish:
        daemon_log.info("master.backends ignored: this node never publishes")
        return None
    book = BackendBook(
        backends,
        poll_secs=config.master.backend_poll_secs,
        max_age_secs=config.master.backend_max_age_secs,
    )

    async def fetch(address: str) -> DecodedDescriptor:
        view = await views.current()
        return await network.fetch(address, view, timeout=FETCH_TIMEOUT_SECS)

    async def probe(address: str) -> None:
        await probe_onion(socks(), address, config.proxy.virtual_port)

    daemon_log.info("Merging %d plain tor backends", len(backends))
    return BackendPoller(
        book,
        fetch,
        probe,
        on_change=on_change,
        is_active=is_active,
        clock=clock.wall,
        sleep=clock.sleep,
    )
