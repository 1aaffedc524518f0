"""The network view (consensus, periods, SRVs, HSDir ring) and the task that keeps it fresh.

:class:`ConsensusWatch` owns the node's latest :class:`~rustbalance.tor.network.NetworkView`:
the publisher, the intro-point watch, verification and the backends read it through
:meth:`ConsensusWatch.current`. Its task checks ``consensus/valid-after`` every
``NETWORK_POLL_SECS`` and re-reads the view when a new consensus arrived (20 s voting on the
test network, 1 h live), then hands the new view to ``on_new_view`` (the publisher's ring
check: a new period, SRV or set of responsible HSDirs means republishing).

Time-period starts and shared-random run starts (node/rotation.py, issue 14) are noticed
within a second: the task never sleeps past the next one, looks every second once it is due
until its tor has a consensus past it, and then tells ``on_boundary`` which one it was
("period" or "run"; the intro-point watch re-reads our own descriptors at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.rotation import Boundary, BoundaryKind, boundary_of, network_poll_delay
from rustbalance.node.tor_network import TorNetwork
from rustbalance.tor.network import NetworkView

__all__ = ["NETWORK_POLL_SECS", "ConsensusWatch"]

log = logging.getLogger(DAEMON_LOGGER)

# How often the consensus valid-after is checked (a new consensus may move the period, the SRV
# or the HSDir ring).
NETWORK_POLL_SECS = 10.0


class ConsensusWatch:
    def __init__(
        self,
        network: TorNetwork,
        clock: Clock,
        on_new_view: Callable[[NetworkView], None],
        on_boundary: Callable[[BoundaryKind], None] = lambda _kind: None,
    ) -> None:
        self._network = network
        self._clock = clock
        self._on_new_view = on_new_view
        self.on_boundary = on_boundary  # set by the daemon: the intro-point watch
        self.view: NetworkView | None = None
        # (time period, SRV run start) of the last consensus the task read.
        self._boundary: Boundary | None = None
        self._last: str | None = None  # the consensus valid-after the view was read for

    async def current(self) -> NetworkView:
        """The view last read (read now if there is none)."""
        if self.view is None:
            self.view = await self._network.read_view()
        return self.view

    async def fresh(self) -> NetworkView:
        """Read the view now and keep it (right before an upload)."""
        self.view = await self._network.read_view()
        return self.view

    def forget(self) -> None:
        """The view may be stale (tor restarted, a descriptor of a newer period arrived)."""
        self.view = None

    def _check_boundary(self, view: NetworkView) -> None:
        boundary = boundary_of(view.valid_after, view.time_params)
        before, self._boundary = self._boundary, boundary
        if before is not None and boundary != before:
            self.on_boundary("period" if boundary[0] != before[0] else "run")

    async def poll(self) -> float:
        """Look at the consensus once (read the view if it is new); the seconds to wait before
        the next look: ``NETWORK_POLL_SECS``, less when a period or run start comes sooner,
        ``FAST_POLL_SECS`` once one is due (node/rotation.py)."""
        delay = NETWORK_POLL_SECS
        try:
            valid_after = await self._network.consensus_valid_after()
            # Without valid-after (an older tor), read the view every time.
            if valid_after is None or valid_after != self._last or self.view is None:
                view = await self._network.read_view()
                self.view = view
                self._last = valid_after
                self._check_boundary(view)
                self._on_new_view(view)
            if self.view is not None:
                view = self.view
                delay = network_poll_delay(
                    view.valid_after, view.time_params, self._clock.wall(), delay
                )
        except (ControlError, RustBalanceError) as exc:
            log.debug("Reading the consensus failed (will retry): %s", exc)
        return delay

    async def run(self) -> None:
        """Supervised task: re-read the view on every new consensus."""
        while True:
            await self._clock.sleep(await self.poll())
