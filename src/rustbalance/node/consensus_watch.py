"""The network view (consensus, periods, SRVs, HSDir ring) and the task that keeps it fresh.

:class:`ConsensusWatch` owns the node's latest :class:`~rustbalance.tor.network.NetworkView`:
the publisher, the intro-point watch, verification and the backends read it through
:meth:`ConsensusWatch.current`. Its task checks ``consensus/valid-after`` every
``NETWORK_POLL_SECS`` and re-reads the view when a new consensus arrived (20 s voting on the
test network, 1 h live), then hands the new view to ``on_new_view`` (the publisher's ring
check: a new period, SRV or set of responsible HSDirs means republishing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.tor_network import TorNetwork
from rustbalance.tor.network import NetworkView

__all__ = ["NETWORK_POLL_SECS", "ConsensusWatch"]

log = logging.getLogger(DAEMON_LOGGER)

# How often the consensus valid-after is checked (a new consensus may move the period, the SRV
# or the HSDir ring).
NETWORK_POLL_SECS = 10.0


class ConsensusWatch:
    def __init__(
        self, network: TorNetwork, clock: Clock, on_new_view: Callable[[NetworkView], None]
    ) -> None:
        self._network = network
        self._clock = clock
        self._on_new_view = on_new_view
        self.view: NetworkView | None = None

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

    async def run(self) -> None:
        """Supervised task: re-read the view on every new consensus."""
        last: str | None = None
        while True:
            try:
                valid_after = await self._network.consensus_valid_after()
                # Without valid-after (an older tor), read the view every time.
                if valid_after is None or valid_after != last or self.view is None:
                    view = await self._network.read_view()
                    self.view = view
                    last = valid_after
                    self._on_new_view(view)
            except (ControlError, RustBalanceError) as exc:
                log.debug("Reading the consensus failed (will retry): %s", exc)
            await self._clock.sleep(NETWORK_POLL_SECS)
