"""What the publisher publishes, and when the network makes it publish again (pure).

- :func:`choose_publication`: the intro points of the master descriptor and the lines copied
  from our own descriptor, and whether it becomes one descriptor per HSDir (distinct
  descriptors: more valid intro points than one descriptor holds, with
  ``[publish] distinct_descriptors = "auto"``; node/distinct_round.py plans those). Own
  intro points first, then every live peer's (sorted by node id, node/cluster_link.py), then
  every plain backend's, merged fairly
  (:func:`~rustbalance.descriptor.merge.merge_intro_points`: round-robin, de-duplicated,
  certificates that expire within ``INTRO_MIN_VALIDITY_SECS`` dropped, at most
  ``publish.max_intro_points``). ``flow-control`` is carried only when the descriptor holds our
  own intro points alone (the protocol does not carry a peer's line; a backend's is unknown);
  without it clients skip congestion control on those circuits: slower, never broken.
  ``pow-params`` only on a single node whose tor hosts the master key: a PoW solution is bound
  to one tor's seed and the service's blinded key (tor.md §12), so it cannot work across nodes
  or for an instance's key.
- :func:`descriptor_ring` and :func:`ring_change`: what a published descriptor depends on
  (time period, SRV and responsible HSDirs of both descriptors, rend-spec-v3
  [WHERE-HSDESC]); a new period or SRV, or a new set of HSDirs, means republishing.
- :func:`period_result`: tor's per-HSDir upload outcome as the publish loop records it.
- :func:`served_verdict`: what an HSDir serves compared with what we posted there (fetch-back
  verification, docs/distinct-descriptors.md section 5).
- :class:`PublishCounters`: monotonic publish totals for ``/metrics``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rustbalance.config.schema import DistinctDescriptors
from rustbalance.crypto.blinding import blind_public_key
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.distinct import needs_distinct
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.node.cluster_link import merge_inputs
from rustbalance.node.publish_policy import (
    PERIODS,
    HsDirResult,
    PeriodResult,
    PublishOutcome,
)
from rustbalance.tor.network import NetworkView, PeriodPublish

__all__ = [
    "INTRO_MIN_VALIDITY_SECS",
    "METRICS_MAX_HSDIRS",
    "Publication",
    "PublishCounters",
    "Ring",
    "Verdict",
    "choose_publication",
    "descriptor_ring",
    "failed_outcome",
    "period_result",
    "ring_change",
    "served_verdict",
]

# Drop intro points whose certificates expire within this many seconds.
INTRO_MIN_VALIDITY_SECS = 60
# The metrics exporter keeps at most this many HSDirs' last upload result (the newest ones).
METRICS_MAX_HSDIRS = 64

# (time period, SRV, responsible HSDir fingerprints) of the first and second descriptor.
Ring = tuple[tuple[int, bytes, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Publication:
    """The content of one master descriptor, or of one per HSDir (``distinct``)."""

    intro_points: tuple[IntroPoint, ...]
    flow_control: str | None
    pow_params: PowParams | None
    # How many nodes (us, live peers with intro points, backends) contributed.
    nodes: int
    backends: int
    # Every contributing node's intro points in a stable order, the same on every publisher:
    # nodes by node id (ours among them), then plain backends by address. What distinct
    # descriptors deal from (docs/distinct-descriptors.md section 2).
    by_node: tuple[tuple[str, tuple[IntroPoint, ...]], ...] = ()
    # One descriptor per HSDir: ``distinct_descriptors = "auto"`` and more valid intro points
    # than one descriptor holds (descriptor/distinct.py ``needs_distinct``).
    distinct: bool = False


def choose_publication(
    own: Sequence[IntroPoint],
    own_flow_control: str | None,
    own_pow_params: PowParams | None,
    *,
    own_id: str,
    peers: Mapping[str, Sequence[IntroPoint]],
    backends: Mapping[str, Sequence[IntroPoint]],
    clustered: bool,
    shared: bool,
    max_intro_points: int,
    distinct_mode: DistinctDescriptors,
    now: int,
) -> Publication | str:
    """The master descriptor's content, or why there is nothing to publish (see the module
    doc). ``peers``: the live peers' intro points in multi-node mode, else empty."""
    instances, flow_control = merge_inputs(own, own_flow_control, peers)
    if backends:
        # One more "node" each in the fair round-robin (after ours and the peers'). Their
        # flow-control line is unknown to us: leave it out (slower, never broken).
        instances.extend(backends.values())
        flow_control = None
    if not any(instances):
        return "no intro points yet"
    chosen = merge_intro_points(instances, max_intro_points, now, INTRO_MIN_VALIDITY_SECS)
    if not chosen:
        return "intro points expire soon"
    nodes = {**{node_id: tuple(points) for node_id, points in peers.items()}, own_id: tuple(own)}
    by_node = tuple((node_id, nodes[node_id]) for node_id in sorted(nodes) if nodes[node_id])
    by_node += tuple((address, tuple(backends[address])) for address in sorted(backends))
    distinct = distinct_mode == "auto" and needs_distinct(
        [points for _, points in by_node],
        max_points=max_intro_points,
        now=now,
        min_remaining_validity=INTRO_MIN_VALIDITY_SECS,
    )
    single_master = not clustered and not backends and shared
    return Publication(
        tuple(chosen),
        flow_control,
        own_pow_params if single_master and not distinct else None,
        nodes=len(instances),
        backends=len(backends),
        by_node=by_node,
        distinct=distinct,
    )


def failed_outcome(error: str) -> PublishOutcome:
    """Both periods failed for the same reason."""
    return {p: PeriodResult(ok=False, error=error) for p in PERIODS}


def descriptor_ring(master_public_key: bytes, view: NetworkView) -> Ring:
    """What a published descriptor depends on: (period, SRV, responsible HSDirs) x 2."""
    ring: list[tuple[int, bytes, tuple[str, ...]]] = []
    for target in view.descriptor_targets():
        blinded = blind_public_key(master_public_key, target.time_period, view.period_length)
        fingerprints = tuple(r.fingerprint for r in view.store_hsdirs(blinded, target))
        ring.append((target.time_period, target.srv, fingerprints))
    return tuple(ring)


def ring_change(
    published: Ring | None, fired: Ring | None, ring: Ring
) -> Literal["period", "hsdirs"] | None:
    """Whether ``ring`` needs a republish of what was published with ``published``: a new
    time period or SRV ("period"), new responsible HSDirs ("hsdirs"), or None (nothing
    published yet, nothing changed, or this very ring already fired a republish)."""
    if published is None or ring in (published, fired):
        return None
    periods_now = [(tp, srv) for tp, srv, _ in ring]
    periods_then = [(tp, srv) for tp, srv, _ in published]
    return "period" if periods_now != periods_then else "hsdirs"


def period_result(result: PeriodPublish) -> PeriodResult:
    hsdirs = tuple(
        HsDirResult(f"${u.fingerprint}~{u.nickname}", u.ok, u.reason) for u in result.hsdirs
    )
    error = result.error
    if error is None and not result.ok:
        error = "no responsible HSDir accepted the descriptor"
    return PeriodResult(ok=result.ok, error=error, hsdirs=hsdirs)


# What an HSDir serves, compared with what we posted there:
#   ok         our round: the counter we posted and the intro points we gave it
#   older      a lower counter (the HSDir missed our upload): send it the same bytes again
#   missing    NOT_FOUND: the same
#   foreign    a greater counter, or ours with other intro points: someone else's descriptor
#              (another publisher, Onionbalance's after a migration: tor.md section 7)
#   bad        it does not verify for us
#   unanswered no answer (TIMEOUT) or another failure: nothing known
Verdict = Literal["ok", "older", "missing", "foreign", "bad", "unanswered"]


def served_verdict(
    posted_revision: int,
    posted_auth_keys: frozenset[bytes],
    served: DecodedDescriptor | None,
    reason: str | None = None,
) -> Verdict:
    """Compare what one HSDir serves with what we posted (docs/distinct-descriptors.md
    section 5). An HSDir replaces a descriptor only with a strictly greater counter
    (``hs_cache.c`` ``cache_store_v3_as_dir``), so a greater one is never ours and a
    republish cannot displace it; it is not a success either."""
    if served is None:
        if reason == "BAD_DESCRIPTOR":
            return "bad"
        return "missing" if reason == "NOT_FOUND" else "unanswered"
    if served.revision_counter < posted_revision:
        return "older"
    if served.revision_counter > posted_revision:
        return "foreign"
    keys = frozenset(p.auth_key for p in served.intro_points)
    return "ok" if keys == posted_auth_keys else "foreign"


def _hsdir_label(hsdir: str) -> str:
    """``$FINGERPRINT~nickname`` (status form) -> ``FINGERPRINT`` (a metric label value)."""
    return hsdir.removeprefix("$").split("~", 1)[0].split("=", 1)[0] or "unknown"


class PublishCounters:
    """Monotonic publish totals for metrics: per period and per HSDir upload."""

    def __init__(self) -> None:
        self.periods: dict[str, dict[str, int]] = {}
        self.hsdir_uploads = {"ok": 0, "failed": 0}
        self.hsdir_last: OrderedDict[str, bool] = OrderedDict()

    def record(self, outcome: PublishOutcome) -> None:
        for period, result in outcome.items():
            counts = self.periods.setdefault(str(period), {"ok": 0, "failed": 0})
            counts["ok" if result.ok else "failed"] += 1
            for hsdir in result.hsdirs:
                self.hsdir_uploads["ok" if hsdir.ok else "failed"] += 1
                label = _hsdir_label(hsdir.hsdir)
                self.hsdir_last[label] = hsdir.ok
                self.hsdir_last.move_to_end(label)
                while len(self.hsdir_last) > METRICS_MAX_HSDIRS:
                    self.hsdir_last.popitem(last=False)

    def record_failure(self) -> None:
        """A round that raised: the publish loop counts it as failed for every period."""
        self.record({p: PeriodResult(ok=False) for p in PERIODS})
