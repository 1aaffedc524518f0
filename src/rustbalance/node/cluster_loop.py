"""The shell of the cluster-mode state machine (node/cluster_mode.py), and "who publishes".

:class:`ClusterLoop` holds the node's coordination backend (None for a single node, and until
start-up created it) and answers the questions every other component asks about the
cluster: :meth:`~ClusterLoop.is_publisher`, :meth:`~ClusterLoop.facts`, the merge signature.
Its supervised ``cluster`` task (multi-node only) observes the cluster every
``CLUSTER_POLL_SECS`` (and at once when coordination reports a change), steps the machine and
carries out its actions: switch tor's native publishing, tell coordination our eligibility,
log the role, republish, mark a standby ready.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.cluster_link import MergeSignature, merge_signature
from rustbalance.node.cluster_mode import (
    Action,
    ClusterMode,
    Observed,
    Republish,
    RoleChanged,
    SetEligible,
    SetNativePublishing,
)
from rustbalance.node.coordination import ALONE, Coordination, CoordinationFacts
from rustbalance.node.snapshot import ClusterSnapshot
from rustbalance.node.tor_network import TorNetwork, native_publishing_conf
from rustbalance.tor.control import ControlConnection

__all__ = ["CLUSTER_POLL_SECS", "ClusterLoop", "OwnIntroPoints"]

log = logging.getLogger(DAEMON_LOGGER)

# Multi-node: how often the cluster task looks at coordination (it also wakes on changes).
CLUSTER_POLL_SECS = 0.5

SetNative = Callable[[bool], Awaitable[None]]


class OwnIntroPoints(Protocol):
    """The node's own intro points as last read (node/intro_watch.py)."""

    @property
    def intro_points(self) -> tuple[IntroPoint, ...]: ...


class ClusterLoop:
    def __init__(
        self,
        mode: ClusterMode,
        network: TorNetwork,
        clock: Clock,
        *,
        own: OwnIntroPoints,
        tor_running: Callable[[], bool],
        publishing: Callable[[], bool],
        republish: Callable[[str], None],
    ) -> None:
        self.mode = mode
        self._network = network
        self._clock = clock
        self._own = own
        self._tor_running = tor_running
        self._publishing = publishing
        self._republish = republish
        self.coordination: Coordination | None = None

    # -- what the other components ask ------------------------------------------------------

    def facts(self) -> CoordinationFacts:
        return ALONE if self.coordination is None else self.coordination.facts()

    def is_multi(self) -> bool:
        """2+ live nodes (us and at least one peer)."""
        return self.facts().is_multi

    def is_publisher(self) -> bool:
        facts = self.facts()
        return self.mode.should_publish(
            self._clock.monotonic(), facts.is_multi, facts.holds_lease, facts.revoked
        )

    async def may_publish(self) -> bool:
        """The backend's fencing check before an upload (a single node: nothing to ask)."""
        return True if self.coordination is None else await self.coordination.may_publish()

    def signature(self, facts: CoordinationFacts | None = None) -> MergeSignature:
        """What a merged descriptor built now depends on."""
        facts = self.facts() if facts is None else facts
        peers = facts.peer_intro_points if facts.is_multi else {}
        return merge_signature(facts.is_multi, self._own.intro_points, peers)

    def report_intro_points(self, points: Sequence[IntroPoint]) -> None:
        if self.coordination is not None:
            self.coordination.report_intro_points(points)

    def record_published(self, signature: MergeSignature, unix_time: int) -> None:
        self.mode.record_published(signature)
        if self.coordination is not None:
            self.coordination.report_publish(unix_time)

    # -- tor's native publishing ------------------------------------------------------------

    async def apply_native_publishing(self, on: bool, set_native: SetNative | None = None) -> None:
        await (set_native or self._network.set_native_publishing)(on)
        if self.mode.native_applied(on):
            log.info(
                "tor native publishing %s (%s)",
                "on" if on else "off",
                "alone" if on else "cluster mode",
            )

    async def on_control_connected(self, conn: ControlConnection) -> None:
        """A (re)connected control session, maybe to a restarted tor: set it again (on this
        session: the controller is not usable until its hooks ran)."""
        if self.coordination is None:
            return

        async def set_native(on: bool) -> None:
            await conn.set_conf(native_publishing_conf(on))

        facts = self.facts()
        wanted = self.mode.native_publishing_wanted(
            self._clock.monotonic(), facts.is_multi, facts.revoked
        )
        await self.apply_native_publishing(wanted, set_native)

    # -- the cluster task -------------------------------------------------------------------

    async def run(self) -> None:
        """Supervised task (multi-node): mode switch, intro points to peers, republish."""
        coordination = self.coordination
        assert coordination is not None
        clock = self._clock
        self.mode.begin(clock.monotonic(), coordination.facts().is_multi)
        while True:
            coordination.clear_changed()
            now = clock.monotonic()
            coordination.report_intro_points(self._own.intro_points)
            facts = coordination.facts()
            observed = Observed(
                is_multi=facts.is_multi,
                holds_lease=facts.holds_lease,
                tor_running=self._tor_running(),
                own_intro_points=len(self._own.intro_points),
                signature=self.signature(facts),
                publishing=self._publishing(),
                revoked=facts.revoked,
            )
            for action in self.mode.step(now, observed):
                await self._carry_out(action)
            await coordination.wait_changed(CLUSTER_POLL_SECS)

    async def _carry_out(self, action: Action) -> None:
        match action:
            case SetNativePublishing(on=on):
                try:
                    await self.apply_native_publishing(on)
                except (ControlError, RustBalanceError) as exc:
                    log.debug("Setting PublishHidServDescriptors failed (will retry): %s", exc)
            case SetEligible(eligible=eligible):
                assert self.coordination is not None
                self.coordination.set_eligible(eligible)
            case RoleChanged(publisher=publisher, multi=multi):
                log.info(
                    "Cluster role: %s (%s)",
                    "publisher" if publisher else "standby",
                    "multi" if multi else "single",
                )
            case Republish(reason=reason):
                self._republish(reason)

    def snapshot(self) -> ClusterSnapshot | None:
        if self.coordination is None:
            return None
        return ClusterSnapshot(self.coordination.status(), self.mode.native_publishing)

    # The shutdown step's bound: the lease release is one datagram to each peer.
    leave_timeout = 2.0

    async def leave(self) -> None:
        """Shutdown: a publisher releases the lease so the next node takes over at once."""
        if self.coordination is not None:
            await self.coordination.leave()
            log.info("Left the cluster")
