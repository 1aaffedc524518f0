"""The node's own intro points: read from tor's descriptor, on its events and every 20 s.

:class:`IntroWatch` owns what the node knows of its own intro points (an
:class:`~rustbalance.node.intro_tracker.IntroTracker`, compared by content) and the supervised
``intro-points`` task: it reads tor's descriptor of the service tor hosts shortly after tor
built or uploaded one (``HS_DESC`` CREATED/UPLOAD/UPLOADED for our address, tor.md §9.4; our
own HSPOSTs come without UPLOAD and with auth type UNKNOWN, tor.md §9.3), and every
``INTRO_POLL_SECS`` besides. A changed set is reported to coordination (``on_read``) and
republished (``on_changed``).

Which of tor's descriptors the intro points come from is decided in one place,
:meth:`IntroWatch.own_descriptor`: tor's first descriptor (``hs/service/desc/id``), and in
``instance`` mode during segment B the second one as clients fetch it (own_descriptor.py).

At a new time period or shared-random run (the consensus watch calls :meth:`IntroWatch.at_boundary`)
tor rotated its descriptors or clients moved to the next period's: the watch re-reads at once,
and an instance fetches its next descriptor again. Until that fetch succeeds the node
publishes intro points that die at the next rotation, so a failed fetch is retried after
``OWN_FETCH_RETRY_SECS``, doubling up to the usual poll while it keeps failing
(docs/architecture.md, "Descriptor rotation and time periods").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import ControlError, DescriptorError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.intro_tracker import IntroTracker
from rustbalance.node.own_descriptor import OwnNextDescriptor
from rustbalance.node.rotation import BoundaryKind
from rustbalance.node.tor_network import TorNetwork
from rustbalance.tor.control_protocol import ControlReplyError

__all__ = ["INTRO_EVENT_DEBOUNCE_SECS", "INTRO_POLL_SECS", "OWN_FETCH_RETRY_SECS", "IntroWatch"]

log = logging.getLogger(DAEMON_LOGGER)

# How often the own descriptor is re-read even without HS_DESC events (every 15-30 s).
INTRO_POLL_SECS = 20.0
# tor emits CREATED, then one UPLOAD per HSDir: read once, shortly after the burst.
INTRO_EVENT_DEBOUNCE_SECS = 1.0
# Instance mode, segment B: HSFETCH of our own desc_next (own_descriptor.py).
OWN_FETCH_TIMEOUT_SECS = 20.0
# ... and after a failed one, the next try (the node's published points die at the next
# rotation until it succeeds; tor uploads a new desc_next within seconds of building it).
OWN_FETCH_RETRY_SECS = 2.0
# tor events that mean tor built or is uploading a new descriptor of its own (tor.md §9.4).
_OWN_DESCRIPTOR_ACTIONS = frozenset({"CREATED", "UPLOAD", "UPLOADED"})


class IntroWatch:
    def __init__(
        self,
        identity: NodeIdentity,
        network: TorNetwork,
        views: ConsensusWatch,
        clock: Clock,
        *,
        on_read: Callable[[Sequence[IntroPoint]], None],
        on_changed: Callable[[str], None],
    ) -> None:
        self._identity = identity
        self._network = network
        self._views = views
        self._clock = clock
        self._on_read = on_read
        self._on_changed = on_changed
        self._bare = identity.service_address.removesuffix(".onion")
        self.tracker = IntroTracker()
        self._own_next = OwnNextDescriptor()
        self._own_fetch_failures = 0  # instance mode: failed desc_next fetches in a row
        self._wakeup = asyncio.Event()

    @property
    def intro_points(self) -> tuple[IntroPoint, ...]:
        return self.tracker.intro_points

    @property
    def count(self) -> int:
        return self.tracker.count

    @property
    def flow_control(self) -> str | None:
        return self.tracker.flow_control

    @property
    def pow_params(self) -> PowParams | None:
        return self.tracker.pow_params

    async def own_descriptor(self) -> DecodedDescriptor:
        """The descriptor of ours whose intro points the node publishes (see the module doc)."""
        network = self._network
        service = self._identity.service_address
        try:
            decoded = await network.read_own_descriptor(service, await self._views.current())
        except DescriptorError:
            # Our view may predate a new period: read it again once.
            self._views.forget()
            decoded = await network.read_own_descriptor(service, await self._views.current())
        if self._identity.mode == "instance":
            decoded = await self._client_view_descriptor(decoded)
        return decoded

    async def _client_view_descriptor(self, current: DecodedDescriptor) -> DecodedDescriptor:
        """Instance mode: in segment B the own ``desc_next`` as clients fetch it, whose intro
        points survive tor's rotation at the next SRV (own_descriptor.py)."""
        view = await self._views.current()

        async def fetch() -> DecodedDescriptor:
            return await self._network.fetch(
                self._identity.service_address, view, timeout=OWN_FETCH_TIMEOUT_SECS
            )

        try:
            decoded = await self._own_next.client_view(
                current, view.current_time_period(), self._clock.wall(), fetch
            )
        except (ControlError, RustBalanceError) as exc:
            self._own_fetch_failures += 1
            log.log(
                logging.INFO if self._own_fetch_failures == 1 else logging.DEBUG,
                "Fetching our own next descriptor failed (retrying shortly): %s",
                exc,
            )
            return current
        self._own_fetch_failures = 0
        return decoded

    def _next_read_in(self) -> float:
        """Seconds to the next read: soon after a failed desc_next fetch, doubling while it
        keeps failing; else the usual poll."""
        failures = self._own_fetch_failures
        if failures == 0:
            return INTRO_POLL_SECS
        return min(INTRO_POLL_SECS, OWN_FETCH_RETRY_SECS * float(2 ** min(failures - 1, 8)))

    async def refresh(self) -> bool:
        """Read the own descriptor; True if intro points are known afterwards."""
        try:
            decoded = await self.own_descriptor()
        except ControlReplyError as exc:
            # 551: tor has not built a descriptor yet (start-up, just restarted).
            log.debug("Own descriptor not available yet: %s", exc)
            return self.count > 0
        except (ControlError, DescriptorError) as exc:
            log.warning("Reading own descriptor failed: %s", exc)
            return self.count > 0
        before = self.count
        changed = self.tracker.update(decoded, self._clock.wall())
        if changed:
            log.info("Own intro points changed: %d now (was %d), publishing", self.count, before)
        self._on_read(self.intro_points)
        if changed and self.count:
            self._on_changed("intro points changed")
        return self.count > 0

    async def has_intro_points(self) -> bool:
        """The first-publish wait's poll: every poll reads the descriptor while none is known."""
        if self.count == 0:
            await self.refresh()
        return self.count > 0

    def after_tor_restart(self, restarted_at: float | None) -> None:
        """tor restarted at ``restarted_at`` (unix time): intro points read before died with
        the old tor, and publishing them would send clients to dead intro points. A new tor
        always has new intro points (the keys are per circuit): read its descriptor soon, and
        the change republishes."""
        read_at = self.tracker.updated_at
        if restarted_at is not None and read_at is not None and read_at < restarted_at:
            self.tracker.clear()
            log.info("Tor restarted: waiting for its new intro points to republish")
        self._wakeup.set()

    def at_boundary(self, kind: BoundaryKind) -> None:
        """A new time period or SRV run reached our tor (node/rotation.py): re-read our own
        intro points now, not at the next poll; an instance fetches its ``desc_next`` again
        (at a run start it is a new one, at a period start clients begin to fetch it)."""
        log.info(
            "%s: re-reading own intro points",
            "New time period" if kind == "period" else "New SRV run",
        )
        self._own_next.mark_stale()
        self._wakeup.set()

    async def run(self) -> None:
        """Supervised task: HS_DESC events for our address plus a periodic read."""
        clock = self._clock
        events = await self._network.descriptor_events()
        try:
            next_read = clock.monotonic()
            while True:
                if self._wakeup.is_set():
                    self._wakeup.clear()
                    next_read = min(next_read, clock.monotonic() + INTRO_EVENT_DEBOUNCE_SECS)
                if clock.monotonic() >= next_read:
                    await self.refresh()
                    next_read = clock.monotonic() + self._next_read_in()
                # At most 1 s at a time, so a wake-up (tor restarted) is seen promptly.
                event = await events.next(min(1.0, max(0.05, next_read - clock.monotonic())))
                if (
                    event is not None
                    and event.address.lower() == self._bare
                    and event.action in _OWN_DESCRIPTOR_ACTIONS
                    and event.auth_type != "UNKNOWN"
                ):
                    self._own_next.mark_stale()
                    next_read = min(next_read, clock.monotonic() + INTRO_EVENT_DEBOUNCE_SECS)
        finally:
            await events.aclose()
