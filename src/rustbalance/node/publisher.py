"""The publisher: publish the master descriptor, verify it, republish when the ring moves.

:class:`Publisher` owns everything about publishing: the publish state and schedule
(node/publish_policy.py: first-publish wait, retries, refresh, emergency republish), the
trigger other components fire to publish early, the :class:`RevisionClock` (one for the
daemon's life, so revision counters never repeat), the metrics counters, and what was last
published (intro points, revisions posted, the HSDir ring it was published to).

One publish round is a pipeline: :func:`~rustbalance.node.publication.choose_publication`
(merge) -> :func:`~rustbalance.tor.network.plan_master_descriptors` (build, sign, name the
HSDirs) -> :func:`~rustbalance.tor.network.upload_planned` for each planned descriptor,
through :meth:`TorNetwork.upload`. Uploads are serialised: tor's per-HSDir events name the
address, not the upload. Three supervised tasks run here:

- ``publish``: the publish loop (only the node that publishes, node/cluster_loop.py, uploads);
- ``verify``: after each upload, fetch the master descriptor back through tor and log
  "Descriptor verified on HSDirs (rev=N)", or republish (at most 3 times in a row) while the
  HSDirs serve an older revision than the one posted;
- the ring check (:meth:`Publisher.check_ring`, called by the consensus watch on every new
  view): a new time period or SRV, or new responsible HSDirs, republish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from rustbalance.config import Config
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ControlError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.backends import BackendPoller
from rustbalance.node.clock import Clock
from rustbalance.node.cluster_link import MergeSignature
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.coordination import CoordinationFacts
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.publication import (
    Publication,
    PublishCounters,
    Ring,
    choose_publication,
    descriptor_ring,
    failed_outcome,
    period_result,
    ring_change,
    served_verdict,
)
from rustbalance.node.publish_policy import (
    PublishOutcome,
    PublishSchedule,
    PublishState,
    PublishTrigger,
    periods_to_publish,
    run_publish_loop,
)
from rustbalance.node.readiness import Readiness
from rustbalance.node.snapshot import PublishSnapshot
from rustbalance.node.tor_network import TorNetwork
from rustbalance.tor.network import (
    NetworkView,
    PeriodLabel,
    PeriodPublish,
    RevisionClock,
    plan_master_descriptors,
    upload_planned,
)

__all__ = [
    "VERIFY_DELAY_SECS",
    "VERIFY_FETCH_TIMEOUT_SECS",
    "VERIFY_MAX_REPUBLISHES",
    "OwnDescriptor",
    "Publisher",
    "PublisherRole",
]

log = logging.getLogger(DAEMON_LOGGER)

# Fetch the master descriptor back this long after an upload, waiting at most the timeout.
VERIFY_DELAY_SECS = 2.0
VERIFY_FETCH_TIMEOUT_SECS = 30.0
VERIFY_MAX_REPUBLISHES = 3


class PublisherRole(Protocol):
    """Who publishes and what the cluster contributes (node/cluster_loop.py)."""

    def is_publisher(self) -> bool: ...

    def facts(self) -> CoordinationFacts: ...

    def signature(self, facts: CoordinationFacts | None = None) -> MergeSignature: ...

    def record_published(self, signature: MergeSignature, unix_time: int) -> None: ...


class OwnDescriptor(Protocol):
    """Our own descriptor as last read (node/intro_watch.py)."""

    @property
    def intro_points(self) -> tuple[IntroPoint, ...]: ...

    @property
    def flow_control(self) -> str | None: ...

    @property
    def pow_params(self) -> PowParams | None: ...

    async def has_intro_points(self) -> bool: ...


class Publisher:
    def __init__(
        self,
        config: Config,
        identity: NodeIdentity,
        network: TorNetwork,
        views: ConsensusWatch,
        clock: Clock,
        *,
        role: PublisherRole,
        own: OwnDescriptor,
        readiness: Readiness,
        clustered: bool,
    ) -> None:
        self._config = config
        self._identity = identity
        self.address = identity.master_address
        self._network = network
        self._views = views
        self._clock = clock
        self._role = role
        self._own = own
        self._readiness = readiness
        self._clustered = clustered
        # Plain tor backends (master.backends), merged as one more node each; set at start-up.
        self.backends: BackendPoller | None = None
        pub = config.publish
        self.state = PublishState()
        self.schedule = PublishSchedule(
            refresh_interval=pub.refresh_interval_secs, max_age=pub.descriptor_max_age_secs
        )
        self.trigger = PublishTrigger(self.schedule)
        self.revision_clock = RevisionClock()
        self.counters = PublishCounters()
        self.published_auth_keys: tuple[bytes, ...] = ()
        # An upload is in flight (the cluster loop holds its republish decisions meanwhile).
        self.publishing = False
        self._upload_lock = asyncio.Lock()
        self._first_wait_over = False
        self._posted: dict[int, int] = {}  # time period -> revision counter last uploaded
        self._generation = 0  # successful publishes so far
        self._verify_wakeup = asyncio.Event()
        self._verify_republishes = 0
        self._published_ring: Ring | None = None
        self._fired_ring: Ring | None = None

    # -- one publish round ------------------------------------------------------------------

    async def publish_once(self) -> PublishOutcome:
        """One publish round: both descriptors, with our own (and the cluster's) intro points."""
        own = self._own
        if not self._first_wait_over:
            self._first_wait_over = True
            if not own.intro_points:
                # The first-publish wait is over; systemd may consider us started.
                self._readiness.mark_ready("no intro points yet, publishing will retry")
        facts = self._role.facts()
        signature = self._role.signature(facts)
        if not self._role.is_publisher():
            # Lost the lease while the loop was waiting: the new publisher publishes.
            return failed_outcome("standby: another node publishes")
        wall = self._clock.wall()
        backends = self.backends.book.intro_points(wall) if self.backends is not None else {}
        now = int(wall)
        publication = choose_publication(
            own.intro_points,
            own.flow_control,
            own.pow_params,
            peers=facts.peer_intro_points if signature[0] else {},
            backends=backends,
            clustered=self._clustered,
            shared=self._identity.mode == "shared",
            max_intro_points=self._config.publish.max_intro_points,
            now=now,
        )
        if isinstance(publication, str):
            return failed_outcome(publication)
        self.publishing = True
        try:
            results = await self._upload(publication, now)
        finally:
            self.publishing = False
        outcome = {label: period_result(result) for label, result in results.items()}
        if any(r.ok for r in outcome.values()):
            self._published(publication, signature, results, now)
            n = len(publication.intro_points)
            self._readiness.mark_ready(f"published {self.address} with {n} intro points")
            self._readiness.status(
                f"Publishing {self.address}: {n} intro points, "
                + ", ".join(f"{p} {'ok' if r.ok else 'failed'}" for p, r in outcome.items())
            )
        return outcome

    async def _upload(self, publication: Publication, now: int) -> dict[PeriodLabel, PeriodPublish]:
        key = self._identity.master_key
        if key is None:
            raise ControlError("this node has no master key (instance mode, not eligible)")
        cfg = self._config.publish
        async with self._upload_lock:
            view = await self._views.fresh()
            planned = plan_master_descriptors(
                key,
                publication.intro_points,
                view,
                now=now,
                revision_clock=self.revision_clock,
                flow_control=publication.flow_control,
                pow_params=publication.pow_params,
                client_auth_keys=self._config.master.authorized_clients,
                lifetime_minutes=cfg.descriptor_lifetime_mins,
                periods=periods_to_publish(publication.pow_params is not None),
            )
            # One descriptor per period today; a plan with several per period (one per HSDir)
            # would combine their results per period here.
            return {
                p.label: await upload_planned(
                    self._network.upload, p, timeout=cfg.upload_timeout_secs
                )
                for p in planned
            }

    def _published(
        self,
        publication: Publication,
        signature: MergeSignature,
        results: Mapping[PeriodLabel, PeriodPublish],
        now: int,
    ) -> None:
        self._role.record_published(signature, now)
        self.published_auth_keys = tuple(p.auth_key for p in publication.intro_points)
        self._posted = {r.time_period: r.revision_counter for r in results.values() if r.ok}
        self._generation += 1
        self._verify_wakeup.set()
        if signature[0] or publication.backends:
            log.info(
                "Published merged descriptor: %d intro points from %d nodes (%d plain backends)",
                len(publication.intro_points),
                publication.nodes,
                publication.backends,
            )
        view = self._views.view
        master_key = self._identity.master_public_key
        self._published_ring = descriptor_ring(master_key, view) if view else None
        self._fired_ring = None

    async def publish_counted(self) -> PublishOutcome:
        """``publish_once`` as the publish loop runs it, counted for metrics."""
        try:
            outcome = await self.publish_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.record_failure()
            raise
        self.counters.record(outcome)
        return outcome

    async def run(self) -> None:
        """Supervised task: the publish loop (node/publish_policy.py)."""
        cfg = self._config.publish
        await run_publish_loop(
            self.publish_counted,
            self._network.fresh_session,
            self._own.has_intro_points,
            self.state,
            self.schedule,
            clock=self._clock.wall,
            sleep=self._clock.sleep,
            wait=self.trigger.wait,
            is_publisher=self._role.is_publisher,
            poll_interval=cfg.first_publish_poll_secs,
            max_wait=cfg.first_publish_max_wait_secs,
        )

    # -- verification -----------------------------------------------------------------------

    async def verify(self) -> None:
        """Supervised task: check each upload once the HSDirs had time to store it."""
        while True:
            await self._verify_wakeup.wait()
            self._verify_wakeup.clear()
            await self._clock.sleep(VERIFY_DELAY_SECS)
            await self.verify_latest()

    async def verify_latest(self) -> None:
        """Fetch the master descriptor back through tor: the HSDirs must serve the revision we
        posted for its period with our intro points. An older one republishes (bounded); a
        greater one is another publisher's (docs/distinct-descriptors.md section 5)."""
        generation = self._generation
        posted = dict(self._posted)
        try:
            view = await self._views.current()
            decoded = await self._network.fetch(
                self.address, view, timeout=VERIFY_FETCH_TIMEOUT_SECS
            )
        except (ControlError, RustBalanceError) as exc:
            log.warning("Could not fetch the published descriptor back: %s", exc)
            return
        if generation != self._generation:
            return  # published again meanwhile: that upload is verified next
        expected = posted.get(decoded.time_period)
        if expected is None:
            log.debug("Fetched a descriptor of period %d we did not post", decoded.time_period)
            return
        verdict = served_verdict(expected, frozenset(self.published_auth_keys), decoded)
        if verdict == "ok":
            self._verify_republishes = 0
            log.info("Descriptor verified on HSDirs (rev=%d)", decoded.revision_counter)
            return
        if verdict == "foreign":
            log.warning(
                "HSDirs serve another publisher's descriptor (rev=%d, posted rev=%d)",
                decoded.revision_counter,
                expected,
            )
            return
        log.warning(
            "HSDirs serve an older descriptor (rev=%d, posted rev=%d)",
            decoded.revision_counter,
            expected,
        )
        if self._verify_republishes < VERIFY_MAX_REPUBLISHES and self._role.is_publisher():
            self._verify_republishes += 1
            self.trigger.fire("verification found an older descriptor")

    # -- the HSDir ring ---------------------------------------------------------------------

    def check_ring(self, view: NetworkView) -> None:
        """A new network view: republish when the published descriptors' ring moved."""
        ring = descriptor_ring(self._identity.master_public_key, view)
        change = ring_change(self._published_ring, self._fired_ring, ring)
        if change is None:
            return
        self._fired_ring = ring
        if change == "period":
            log.info("Time period or shared random value changed: republishing")
            if self.backends is not None:
                # Backends publish descriptors for the new period too: fetch them now.
                self.backends.book.expedite(self._clock.wall())
            self.trigger.fire("time period / SRV changed")
        else:
            log.info("Responsible HSDirs changed: republishing")
            self.trigger.fire("HSDirs changed")

    # -- for status and metrics -------------------------------------------------------------

    def snapshot(self, now: float) -> PublishSnapshot:
        counters = self.counters
        return PublishSnapshot(
            state=self.state.copy(),
            descriptor_age=self.state.descriptor_age(now),
            periods={p: dict(c) for p, c in counters.periods.items()},
            hsdir_uploads=dict(counters.hsdir_uploads),
            hsdir_last_upload=dict(counters.hsdir_last),
        )
