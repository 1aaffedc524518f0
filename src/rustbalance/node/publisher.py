"""The publisher: publish the master descriptor, verify it, republish when the ring moves.

:class:`Publisher` owns everything about publishing: the publish state and schedule
(node/publish_policy.py: first-publish wait, retries, refresh, emergency republish), the
trigger other components fire to publish early, the :class:`RevisionClock` (one for the
daemon's life, so revision counters never repeat), the metrics counters, and what was last
published (intro points, revisions posted, the HSDir ring it was published to, and with
distinct descriptors each HSDir's descriptor and verdict).

One publish round is a pipeline: :func:`~rustbalance.node.publication.choose_publication`
(merge, and whether the round is distinct) -> either
:func:`~rustbalance.tor.network.plan_master_descriptors` (build, sign, name the HSDirs) ->
:func:`~rustbalance.tor.network.upload_planned` for each planned descriptor, through
:meth:`TorNetwork.upload`; or, with more intro points than one descriptor holds and
``[publish] distinct_descriptors = "auto"``,
:func:`~rustbalance.node.distinct_round.plan_distinct_rounds` (one descriptor per HSDir, one
counter per target) -> :meth:`TorNetwork.upload_per_hsdir` per target
(docs/distinct-descriptors.md section 11). Every upload is fenced first by the coordination
backend's ``may_publish()`` (etcd: a transaction on our candidacy; docs/etcd.md). Uploads are
serialised: tor's per-HSDir events name the address, not the upload. Three supervised tasks
run here:

- ``publish``: the publish loop (only the node that publishes, node/cluster_loop.py, uploads);
- ``verify``: after each upload, fetch the master descriptor back through tor and log
  "Descriptor verified on HSDirs (rev=N)", or republish (at most 3 times in a row) while the
  HSDirs serve an older revision than the one posted; a greater revision is another
  publisher's, never "verified". With distinct descriptors: re-send a round's same bytes to
  the HSDirs whose upload failed, fetch back what *each* HSDir of the clients' descriptor
  serves (``HSFETCH SERVER=``) and re-send to those behind (at most 3 times per round);
- the ring check (:meth:`Publisher.check_ring`, called by the consensus watch on every new
  view): a new time period or SRV, new responsible HSDirs, or (distinct descriptors that
  rotate) a new rotation epoch, republish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from rustbalance.config import Config
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ControlError, DescriptorError, RustBalanceError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.backends import BackendPoller
from rustbalance.node.clock import Clock
from rustbalance.node.cluster_link import MergeSignature
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.coordination import CoordinationFacts
from rustbalance.node.distinct_round import (
    DistinctRound,
    client_round,
    needs_resend,
    plan_distinct_rounds,
    rotation_epoch,
)
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.publication import (
    Publication,
    PublishCounters,
    Ring,
    Verdict,
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
from rustbalance.node.snapshot import (
    DistinctHsDir,
    DistinctPeriodSnapshot,
    DistinctSnapshot,
    PublishSnapshot,
)
from rustbalance.node.tor_network import TorNetwork
from rustbalance.tor.network import (
    HsDirUpload,
    NetworkView,
    PeriodLabel,
    PeriodPublish,
    RevisionClock,
    plan_master_descriptors,
    upload_planned,
)

__all__ = [
    "FENCED",
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
# The error of an upload the coordination backend's fencing check stopped.
FENCED = "the coordination backend did not confirm that we hold the publisher lease"


@dataclass
class _RoundRecord:
    """A published distinct round and what is known of each of its HSDirs since: the latest
    upload verdict, the fetch-back verdict (client descriptor only), and how many times its
    bytes were sent again."""

    round: DistinctRound
    uploads: dict[str, HsDirUpload]
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    resends: int = 0


class PublisherRole(Protocol):
    """Who publishes and what the cluster contributes (node/cluster_loop.py)."""

    def is_publisher(self) -> bool: ...

    async def may_publish(self) -> bool:
        """The coordination backend's fencing check, awaited immediately before each upload
        (etcd: a transaction on our candidacy's revision; embedded and single node: True)."""
        ...

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
        self._posted: dict[int, int] = {}  # time period -> revision counter last uploaded
        self._generation = 0  # successful publishes so far
        self._verify_wakeup = asyncio.Event()
        self._verify_republishes = 0
        self._published_ring: Ring | None = None
        self._fired_ring: Ring | None = None
        # Distinct descriptors: the rounds of the last successful publish (empty after a
        # single-descriptor publish), and the rotation epoch to republish after (None when
        # the deal does not rotate).
        self._rounds: dict[PeriodLabel, _RoundRecord] = {}
        self._published_epoch: int | None = None
        self._fired_epoch: int | None = None

    # -- one publish round ------------------------------------------------------------------

    async def publish_once(self) -> PublishOutcome:
        """One publish round: both descriptors, with our own (and the cluster's) intro points."""
        own = self._own
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
            own_id=self._config.node.id,
            peers=facts.peer_intro_points if signature[0] else {},
            backends=backends,
            clustered=self._clustered,
            shared=self._identity.mode == "shared",
            max_intro_points=self._config.publish.max_intro_points,
            distinct_mode=self._config.publish.distinct_descriptors,
            now=now,
        )
        if isinstance(publication, str):
            return failed_outcome(publication)
        self.publishing = True
        try:
            results, rounds = await self._upload(publication, now)
        finally:
            self.publishing = False
        outcome = {label: period_result(result) for label, result in results.items()}
        if any(r.ok for r in outcome.values()):
            self._published(publication, signature, results, rounds, now)
            n = len(self.published_auth_keys)
            self._readiness.status(
                f"Publishing {self.address}: {n} intro points, "
                + ", ".join(f"{p} {'ok' if r.ok else 'failed'}" for p, r in outcome.items())
            )
        return outcome

    async def _upload(
        self, publication: Publication, now: int
    ) -> tuple[dict[PeriodLabel, PeriodPublish], dict[PeriodLabel, DistinctRound]]:
        key = self._identity.master_key
        if key is None:
            raise ControlError("this node has no master key (instance mode, not eligible)")
        cfg = self._config.publish
        async with self._upload_lock:
            view = await self._views.fresh()
            if publication.distinct:
                rounds = plan_distinct_rounds(
                    key,
                    publication.by_node,
                    view,
                    now=now,
                    revision_clock=self.revision_clock,
                    max_points=cfg.max_intro_points,
                    flow_control=publication.flow_control,
                    client_auth_keys=self._config.master.authorized_clients,
                    lifetime_minutes=cfg.descriptor_lifetime_mins,
                )
                results = {r.label: await self._upload_round(r) for r in rounds}
                return results, {r.label: r for r in rounds if r.error is None}
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
            results = {}
            for p in planned:
                # Fencing (docs/etcd.md): a publisher that lost its lease since the round
                # began (cut off, expired, replaced) must not upload; asked per upload, as
                # late as possible. A refusal fails this period like any upload error.
                if p.error is None and not await self._role.may_publish():
                    p = dataclasses.replace(p, error=FENCED)
                results[p.label] = await upload_planned(
                    self._network.upload, p, timeout=cfg.upload_timeout_secs
                )
            return results, {}

    async def _upload_round(self, distinct: DistinctRound) -> PeriodPublish:
        """Upload one target's descriptors, each to its own HSDir (one HSPOST per text); the
        outcome, never an exception for a failed upload (as ``upload_planned``)."""
        label = distinct.label
        failed = PeriodPublish(
            label, distinct.time_period, distinct.revision_counter, len(distinct.auth_keys)
        )
        error = distinct.error
        if error is None and not await self._role.may_publish():
            error = FENCED  # fencing, as for a single descriptor (docs/etcd.md)
        if error is not None:
            log.warning("publishing the %s descriptors failed: %s", label, error)
            return PeriodPublish(
                label, distinct.time_period, distinct.revision_counter, 0, error=error
            )
        try:
            uploads = await self._network.upload_per_hsdir(
                self.address, distinct.uploads, self._config.publish.upload_timeout_secs
            )
        except (ControlError, DescriptorError) as exc:
            log.warning("publishing the %s descriptors failed: %s", label, exc)
            return PeriodPublish(
                label, distinct.time_period, distinct.revision_counter, 0, error=str(exc)
            )
        log.info(
            "Published %s descriptors (period %d, revision %d, %d intro points in %d different "
            "descriptors) to %d of %d HSDirs",
            label,
            distinct.time_period,
            distinct.revision_counter,
            len(distinct.auth_keys),
            distinct.different_descriptors,
            sum(1 for u in uploads if u.ok),
            len(uploads),
        )
        return PeriodPublish(
            failed.label,
            failed.time_period,
            failed.revision_counter,
            failed.intro_points,
            hsdirs=tuple(uploads),
        )

    def _published(
        self,
        publication: Publication,
        signature: MergeSignature,
        results: Mapping[PeriodLabel, PeriodPublish],
        rounds: Mapping[PeriodLabel, DistinctRound],
        now: int,
    ) -> None:
        self._role.record_published(signature, now)
        self._rounds = {
            label: _RoundRecord(r, {u.fingerprint.upper(): u for u in results[label].hsdirs})
            for label, r in rounds.items()
            if results[label].ok
        }
        if self._rounds:
            # "Published intro points": every point some HSDir's descriptor lists.
            self.published_auth_keys = tuple(
                dict.fromkeys(k for rec in self._rounds.values() for k in rec.round.auth_keys)
            )
        else:
            self.published_auth_keys = tuple(p.auth_key for p in publication.intro_points)
        self._posted = {r.time_period: r.revision_counter for r in results.values() if r.ok}
        self._generation += 1
        self._verify_wakeup.set()
        if self._rounds:
            shares = [s for rec in self._rounds.values() for s in rec.round.shares.values()]
            listed = {n for rec in self._rounds.values() for n, p in rec.round.shares.items() if p}
            log.info(
                "Published distinct descriptors: %d intro points from %d nodes (%d plain "
                "backends), %d of them reachable, expected share per node %.1f-%.1f %%",
                len(self.published_auth_keys),
                len(publication.by_node),
                publication.backends,
                len(listed),
                100 * float(min(shares, default=0)),
                100 * float(max(shares, default=0)),
            )
        elif signature[0] or publication.backends:
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
        rotating = any(rec.round.rotates for rec in self._rounds.values())
        self._published_epoch = rotation_epoch(view) if view and rotating else None
        self._fired_epoch = None

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
        greater one is another publisher's (docs/distinct-descriptors.md section 5). With
        distinct descriptors, every HSDir is checked on its own (:meth:`verify_distinct`)."""
        if self._rounds:
            await self.verify_distinct()
            return
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
                "HSDirs serve another publisher's descriptor (rev=%d, posted rev=%d): "
                "publishing above it",
                decoded.revision_counter,
                expected,
            )
            # An HSDir keeps it until a greater counter comes (hs_cache.c
            # cache_store_v3_as_dir): a publisher before us (Onionbalance, whose counters
            # may run ahead of ours, or a tor that hosted the key) would otherwise hold some
            # HSDirs until our clock catches up. The election decides between our own nodes;
            # this republish is bounded like the others.
            self.revision_clock.exceed(decoded.blinded_key, decoded.revision_counter)
            self._republish_for("HSDirs serve another publisher's descriptor")
            return
        log.warning(
            "HSDirs serve an older descriptor (rev=%d, posted rev=%d)",
            decoded.revision_counter,
            expected,
        )
        self._republish_for("verification found an older descriptor")

    def _republish_for(self, reason: str) -> None:
        """A new round because verification failed, at most VERIFY_MAX_REPUBLISHES in a row."""
        if self._verify_republishes < VERIFY_MAX_REPUBLISHES and self._role.is_publisher():
            self._verify_republishes += 1
            self.trigger.fire(reason)

    async def verify_distinct(self) -> None:
        """Distinct descriptors: per HSDir (docs/distinct-descriptors.md sections 3 and 5).

        1. The round's same bytes again to every HSDir whose upload failed (not
           ``UPLOAD_REJECTED``: it holds this round or a greater counter already).
        2. For the descriptor clients fetch now (the only one tor fetches back), what each
           of its HSDirs serves (``HSFETCH SERVER=``): our counter and the set dealt to it is
           verified; an older round or nothing gets the same bytes again; a descriptor that
           does not verify is an error and a new round; a greater counter is another
           publisher's (the election decides, a republish cannot displace it).

        Sending again is bounded per round (VERIFY_MAX_REPUBLISHES); after a re-send the
        check runs again."""
        generation = self._generation
        failed = {
            label: needs_resend(list(r.uploads.values())) for label, r in self._rounds.items()
        }
        if not await self._resend(generation, failed):
            return
        try:
            view = await self._views.current()
        except (ControlError, RustBalanceError) as exc:
            log.warning("Could not fetch the published descriptors back: %s", exc)
            return
        rounds = {label: rec.round for label, rec in self._rounds.items()}
        client = client_round(rounds, view)
        if client is None:
            log.debug("No published round is the descriptor clients fetch now")
            return
        record = self._rounds[client.label]
        relays = [d.relay for d in client.descriptors]
        try:
            fetched = await self._network.fetch_per_hsdir(
                self.address, view, relays, VERIFY_FETCH_TIMEOUT_SECS
            )
        except (ControlError, RustBalanceError) as exc:
            log.warning("Could not fetch the published descriptors back: %s", exc)
            return
        if generation != self._generation:
            return  # published again meanwhile: that round is verified next
        for result in fetched:
            wanted = client.descriptor(result.fingerprint)
            if wanted is None:
                continue
            keys = frozenset(wanted.auth_keys)
            verdict = served_verdict(
                client.revision_counter, keys, result.descriptor, result.reason
            )
            record.verdicts[result.fingerprint.upper()] = verdict
            served = result.descriptor
            if verdict == "foreign" and served is not None:
                log.warning(
                    "HSDir %s serves another publisher's descriptor (rev=%d, posted rev=%d)",
                    result.fingerprint,
                    served.revision_counter,
                    client.revision_counter,
                )
            elif verdict == "bad":
                log.error("HSDir %s serves a descriptor that does not verify", result.fingerprint)
        verdicts = record.verdicts
        ok = sum(1 for v in verdicts.values() if v == "ok")
        if ok == len(client.descriptors):
            self._verify_republishes = 0
            log.info(
                "Descriptors verified on %d of %d HSDirs (rev=%d, %d different)",
                ok,
                len(client.descriptors),
                client.revision_counter,
                client.different_descriptors,
            )
            return
        log.warning(
            "Descriptors verified on %d of %d HSDirs (rev=%d): %s",
            ok,
            len(client.descriptors),
            client.revision_counter,
            ", ".join(f"{fp[:8]} {v}" for fp, v in sorted(verdicts.items()) if v != "ok"),
        )
        if "bad" in verdicts.values():
            self._republish_for("an HSDir serves a descriptor that does not verify")
            return
        behind = needs_resend([], verdicts)
        if behind and await self._resend(generation, {client.label: behind}):
            self._verify_wakeup.set()  # check again after the re-send

    async def _resend(self, generation: int, wanted: Mapping[PeriodLabel, list[str]]) -> bool:
        """Send each named HSDir its round's same bytes again (within the per-round budget);
        False when a new round was published meanwhile (nothing more to check here)."""
        timeout = self._config.publish.upload_timeout_secs
        for label, fingerprints in wanted.items():
            if not fingerprints:
                continue
            async with self._upload_lock:
                record = self._rounds.get(label)
                if generation != self._generation or record is None:
                    return False
                if record.resends >= VERIFY_MAX_REPUBLISHES or not self._role.is_publisher():
                    continue
                if not await self._role.may_publish():
                    continue  # fenced (docs/etcd.md): another node holds the lease now
                record.resends += 1
                wanted_fps = set(fingerprints)
                chosen = [
                    d for d in record.round.descriptors if d.fingerprint.upper() in wanted_fps
                ]
                log.info(
                    "Sending the %s descriptors (rev=%d) again to %d HSDirs",
                    label,
                    record.round.revision_counter,
                    len(chosen),
                )
                try:
                    uploads = await self._network.upload_per_hsdir(
                        self.address, [(d.relay, d.text) for d in chosen], timeout
                    )
                except (ControlError, DescriptorError) as exc:
                    log.warning("Sending the %s descriptors again failed: %s", label, exc)
                    continue
                for upload in uploads:
                    record.uploads[upload.fingerprint.upper()] = upload
                    record.verdicts.pop(upload.fingerprint.upper(), None)
        return generation == self._generation

    # -- the HSDir ring ---------------------------------------------------------------------

    def check_ring(self, view: NetworkView) -> None:
        """A new network view: republish when the published descriptors' ring moved, or when
        distinct descriptors that rotate enter a new rotation epoch."""
        ring = descriptor_ring(self._identity.master_public_key, view)
        change = ring_change(self._published_ring, self._fired_ring, ring)
        if change is None:
            self._check_epoch(view)
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

    def _check_epoch(self, view: NetworkView) -> None:
        """Distinct descriptors that cannot give every node its share in one deal rotate
        hourly (docs/distinct-descriptors.md section 4): a new epoch deals anew."""
        epoch = rotation_epoch(view)
        published = self._published_epoch
        if published is None or epoch in (published, self._fired_epoch):
            return
        self._fired_epoch = epoch
        log.info("Rotation epoch %d began: dealing the distinct descriptors anew", epoch)
        self.trigger.fire("rotation epoch changed")

    # -- for status and metrics -------------------------------------------------------------

    def snapshot(self, now: float) -> PublishSnapshot:
        counters = self.counters
        return PublishSnapshot(
            state=self.state.copy(),
            descriptor_age=self.state.descriptor_age(now),
            periods={p: dict(c) for p, c in counters.periods.items()},
            hsdir_uploads=dict(counters.hsdir_uploads),
            hsdir_last_upload=dict(counters.hsdir_last),
            distinct=self._distinct_snapshot(),
        )

    def _distinct_snapshot(self) -> DistinctSnapshot:
        periods: dict[str, DistinctPeriodSnapshot] = {}
        for label, record in self._rounds.items():
            distinct = record.round
            periods[label] = DistinctPeriodSnapshot(
                revision=distinct.revision_counter,
                descriptors=distinct.different_descriptors,
                expected_shares={node: float(p) for node, p in distinct.shares.items()},
                hsdirs=tuple(
                    DistinctHsDir(
                        d.fingerprint,
                        d.auth_keys,
                        _upload_ok(record.uploads.get(d.fingerprint.upper())),
                        record.verdicts.get(d.fingerprint.upper()),
                    )
                    for d in distinct.descriptors
                ),
            )
        return DistinctSnapshot(self._config.publish.distinct_descriptors, periods)


def _upload_ok(upload: HsDirUpload | None) -> bool | None:
    return None if upload is None else upload.ok
