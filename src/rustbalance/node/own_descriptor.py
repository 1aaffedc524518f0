"""Instance mode: the node's own descriptor that clients use *now* (tor.md §3.2, §10).

tor keeps two descriptors per service and binds each intro point to one of them:

- segment A (new SRV -> time period start): ``desc_current`` is for the current period and is
  what clients fetch; ``desc_next`` is for the next period;
- segment B (period start -> next SRV): ``desc_current`` is for the *previous* period and
  ``desc_next`` for the current one, which clients fetch. At the next SRV tor drops
  ``desc_current`` and closes its intro circuits, and ``desc_next`` becomes ``desc_current``.

``GETINFO hs/service/desc/id/<addr>`` returns only ``desc_current``. Its intro points, copied
into the master descriptor during segment B, die at the next SRV: clients that fetch the
master descriptor in the seconds before the publisher notices get only dead intro points, and
tor then refuses to ask the same HSDirs again for 15 minutes (hs_client.c requery period). So
in segment B an instance node takes its intro points from ``desc_next``, as clients see it: an
HSFETCH of its own address (tor keeps publishing the instance descriptor natively). Those
intro points survive the rotation, and through ``ob_config`` they accept the master's
subcredentials of the previous, current and next period (tor.md §11).

:func:`client_period_descriptor_needed` is the pure decision; :class:`OwnNextDescriptor` keeps
the last fetched copy so the node fetches at most every ``max_age`` seconds (or after tor
uploaded a new one of its own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rustbalance.descriptor.parser import DecodedDescriptor

__all__ = ["OWN_NEXT_MAX_AGE_SECS", "OwnNextDescriptor", "client_period_descriptor_needed"]

# Re-fetch our own desc_next at least this often in segment B (tor also re-uploads it when its
# intro points change, which marks the copy stale at once).
OWN_NEXT_MAX_AGE_SECS = 300.0


def client_period_descriptor_needed(desc_current_period: int, client_period: int) -> bool:
    """True in segment B: tor's ``desc_current`` is not the period clients fetch."""
    return desc_current_period != client_period


@dataclass
class OwnNextDescriptor:
    """The last fetched copy of our own ``desc_next`` (segment B only)."""

    max_age: float = OWN_NEXT_MAX_AGE_SECS
    decoded: DecodedDescriptor | None = None
    fetched_at: float = 0.0
    stale: bool = False

    def mark_stale(self) -> None:
        """tor uploaded a descriptor of ours: desc_next may have new intro points."""
        self.stale = True

    def fresh_for(self, client_period: int, now: float) -> bool:
        return (
            self.decoded is not None
            and self.decoded.time_period == client_period
            and not self.stale
            and now - self.fetched_at < self.max_age
        )

    async def client_view(
        self,
        current: DecodedDescriptor,
        client_period: int,
        now: float,
        fetch: Callable[[], Awaitable[DecodedDescriptor]],
    ) -> DecodedDescriptor:
        """``current`` in segment A; in segment B the fetched ``desc_next`` (cached), or
        ``current`` while none can be fetched (its intro points work until the next SRV)."""
        if not client_period_descriptor_needed(current.time_period, client_period):
            return current
        if not self.fresh_for(client_period, now):
            self.stale = False
            fetched = await fetch()
            if fetched.time_period != client_period:
                return current
            self.decoded = fetched
            self.fetched_at = now
        assert self.decoded is not None
        return self.decoded
