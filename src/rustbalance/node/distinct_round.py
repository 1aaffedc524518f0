"""One publish round of distinct descriptors: a descriptor per responsible HSDir (pure).

docs/distinct-descriptors.md is the design (every tor rule it rests on, with tor source
references); section 11 is what the publisher does, and this module is its pure part:

- :func:`plan_distinct_rounds`: for each of tor's two descriptors (a *target*: its blinded
  key, its ring), deal the live nodes' intro points to the target's HSDirs
  (:func:`~rustbalance.descriptor.distinct.assign_intro_points`, nodes in node-id order so a
  new publisher deals the same layout), take **one** revision counter for the round, and build
  and sign one descriptor per HSDir. Every HSDir of a target gets the same counter: a client
  throws away a fetched descriptor with a lower counter than the one it holds
  (``hs_cache.c`` ``cache_store_as_client``), so a client whose intro points all failed must
  find the same or a newer round at any other HSDir (section 3). Never a new counter for a
  subset of the HSDirs: a change means a new round to all of them, a retry re-sends the same
  bytes.
- :func:`rotation_epoch`: which rotation epoch a network view is in (section 4).
- :func:`client_round`: the round of the descriptor clients fetch now (the only one tor can
  fetch back, ``hs_client.c`` ``directory_launch_v3_desc_fetch``).
- :func:`needs_resend`: which HSDirs get a round's bytes again.

No I/O: the publisher (node/publisher.py) uploads with ``TorNetwork.upload_per_hsdir`` and
verifies with ``TorNetwork.fetch_per_hsdir``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from rustbalance.crypto.blinding import blind_identity
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.time_period import client_fetch_target
from rustbalance.descriptor.builder import build_descriptor
from rustbalance.descriptor.distinct import assign_intro_points, reach_probabilities
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import DescriptorError
from rustbalance.node.publication import INTRO_MIN_VALIDITY_SECS, Verdict
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.network import HsDirUpload, NetworkView, PeriodLabel, RevisionClock

__all__ = [
    "ROTATION_SECS",
    "DistinctRound",
    "HsDirDescriptor",
    "client_round",
    "needs_resend",
    "plan_distinct_rounds",
    "rotation_epoch",
]

# The rotation epoch's length (docs/distinct-descriptors.md section 4): tor re-uploads its own
# descriptors every 60-120 minutes (hs_service.h HS_SERVICE_NEXT_UPLOAD_TIME_MIN/MAX), so a
# new deal every hour costs no more uploads than tor itself makes. It only matters when the
# nodes cannot all get the same share in one deal (e.g. more than 120 nodes).
ROTATION_SECS = 3600

Randbytes = Callable[[int], bytes]


@dataclass(frozen=True)
class HsDirDescriptor:
    """One HSDir's descriptor in a round: where it goes, the intro points it lists (auth keys,
    in order) and its signed text."""

    relay: HSDirRelay
    auth_keys: tuple[bytes, ...]
    text: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return self.relay.fingerprint


@dataclass(frozen=True)
class DistinctRound:
    """The descriptors of one target (one blinded key) in one round, one counter for all.

    ``descriptors`` come in the deal's order: the fetch HSDirs in tor's order, then the
    store-only spares. ``shares`` is each node's exact expected share of fresh clients
    (:func:`~rustbalance.descriptor.distinct.reach_probabilities`, by node id); 0 for a node
    no fetch HSDir's descriptor lists this epoch. ``error`` says why
    the round could not be built (then there is nothing to upload)."""

    label: PeriodLabel
    time_period: int
    srv: bytes
    revision_counter: int
    descriptors: tuple[HsDirDescriptor, ...] = ()
    shares: Mapping[str, Fraction] = field(default_factory=dict)
    epoch: int = 0
    rotates: bool = False
    error: str | None = None

    @property
    def uploads(self) -> list[tuple[HSDirRelay, str]]:
        """(HSDir, text) for ``upload_per_hsdir``."""
        return [(d.relay, d.text) for d in self.descriptors]

    def descriptor(self, fingerprint: str) -> HsDirDescriptor | None:
        wanted = fingerprint.upper()
        return next((d for d in self.descriptors if d.fingerprint.upper() == wanted), None)

    @property
    def auth_keys(self) -> tuple[bytes, ...]:
        """Every intro point listed by any of the round's descriptors, once, in order."""
        return tuple(dict.fromkeys(k for d in self.descriptors for k in d.auth_keys))

    @property
    def different_descriptors(self) -> int:
        """How many different intro-point sets went out (1 when every HSDir got the same)."""
        return len({frozenset(d.auth_keys) for d in self.descriptors})


def rotation_epoch(view: NetworkView) -> int:
    """The rotation epoch of ``view``: from the consensus, so every node computes the same
    one and a publisher that takes over continues the schedule (section 4)."""
    return view.valid_after // ROTATION_SECS


def plan_distinct_rounds(
    identity: IdentityKey,
    nodes: Sequence[tuple[str, Sequence[IntroPoint]]],
    view: NetworkView,
    *,
    now: int,
    revision_clock: RevisionClock,
    max_points: int,
    flow_control: str | None = None,
    client_auth_keys: Sequence[bytes] = (),
    lifetime_minutes: int = 180,
    randbytes: Randbytes = secrets.token_bytes,
    periods: Collection[PeriodLabel] = ("current", "next"),
) -> list[DistinctRound]:
    """One round per target of ``view`` (tor's first and second descriptor, in that order).

    ``nodes``: (node id, intro points) in a stable order (node/publication.py
    ``Publication.by_node``). A target that cannot be built is returned with its ``error``,
    so a failure of one never discards the other. No ``pow-params``: a PoW solution is bound
    to one tor's seed (docs/pow.md), and distinct descriptors always merge several nodes.
    """
    instances = [points for _, points in nodes]
    epoch = rotation_epoch(view)
    labels: tuple[PeriodLabel, PeriodLabel] = ("current", "next")
    rounds: list[DistinctRound] = []
    for label, target in zip(labels, view.descriptor_targets(), strict=True):
        if label not in periods:
            continue
        blinded = blind_identity(identity, target.time_period, view.period_length)
        store = view.store_hsdirs(blinded.public_key, target)
        fetch = view.target_fetch_hsdirs(blinded.public_key, target)
        relays = {r.fingerprint: r for r in (*store, *fetch)}
        counter = 0
        try:
            if not store:
                raise DescriptorError("no responsible HSDirs in the consensus")
            assignment = assign_intro_points(
                instances,
                [r.fingerprint for r in fetch],
                [r.fingerprint for r in store],
                max_points=max_points,
                now=now,
                min_remaining_validity=INTRO_MIN_VALIDITY_SECS,
                epoch=epoch,
            )
            counter = revision_clock.counter(blinded, target.srv_run_start, now)
            descriptors = tuple(
                HsDirDescriptor(
                    relays[fingerprint],
                    tuple(p.auth_key for p in points),
                    build_descriptor(
                        identity_public_key=identity.public_key,
                        blinded=blinded,
                        intro_points=points,
                        revision_counter=counter,
                        now=now,
                        randbytes=randbytes,
                        lifetime_minutes=lifetime_minutes,
                        client_auth_keys=client_auth_keys,
                        flow_control=flow_control,
                    ),
                )
                for fingerprint, points in assignment.per_hsdir.items()
            )
        except DescriptorError as exc:
            rounds.append(
                DistinctRound(label, target.time_period, target.srv, counter, error=str(exc))
            )
            continue
        shares = dict.fromkeys((node for node, points in nodes if points), Fraction(0))
        shares.update((nodes[index][0], p) for index, p in reach_probabilities(assignment).items())
        rounds.append(
            DistinctRound(
                label,
                target.time_period,
                target.srv,
                counter,
                descriptors,
                shares,
                assignment.epoch,
                assignment.rotates,
            )
        )
    return rounds


def client_round(
    rounds: Mapping[PeriodLabel, DistinctRound], view: NetworkView
) -> DistinctRound | None:
    """The round of the descriptor clients fetch now ((time period, SRV) of
    ``client_fetch_target``), or None when no published round is for it (a new period or
    SRV since: the ring check republishes)."""
    c = view.consensus
    wanted = client_fetch_target(c.valid_after, view.time_params, c.srv_current, c.srv_previous)
    return next((r for r in rounds.values() if (r.time_period, r.srv) == wanted), None)


def needs_resend(
    uploads: Sequence[HsDirUpload], verdicts: Mapping[str, Verdict] | None = None
) -> list[str]:
    """The HSDirs (fingerprints) that get the round's same bytes again: an upload that failed
    for any reason but ``UPLOAD_REJECTED`` (the HSDir holds this round or a greater counter
    already: sending it again cannot change that), and an HSDir whose fetch-back shows an
    older round or nothing (``verdicts``)."""
    wanted = [u.fingerprint for u in uploads if not u.ok and u.reason != "UPLOAD_REJECTED"]
    if verdicts:
        wanted += [fp for fp, verdict in verdicts.items() if verdict in ("older", "missing")]
    return list(dict.fromkeys(fp.upper() for fp in wanted))
