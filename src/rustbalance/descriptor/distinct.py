"""Distinct descriptors per HSDir: which intro points each responsible HSDir's descriptor lists.

Pure and deterministic (no I/O, no clock, no randomness). The design, with every tor rule it
rests on, is in ``docs/distinct-descriptors.md``; in short:

* A client asks one HSDir, chosen uniformly from the union over replicas of the first
  ``hsdir_spread_fetch`` HSDirs after each replica's index (rend-spec-v3 [WHERE-HSDESC]; tor
  ``hs_client.c`` ``pick_hsdir_v3`` -> ``hs_common.c`` ``hs_pick_hsdir``: ``smartlist_choose``),
  keeps that descriptor until the next time period, and picks its intro points uniformly
  (``hs_client.c`` ``client_get_random_intro``: ``crypto_rand_int``). So with F fetch HSDirs
  node ``n`` is reached with probability ``(1/F) * sum over h of k(n, h) / |D_h|``.
* Up to ``max_points`` intro points (no more than 20) in total, every HSDir gets the same
  descriptor, exactly :func:`~rustbalance.descriptor.merge.merge_intro_points` (today's
  behaviour).
* Beyond it, the publisher deals *slots* from one endless round-robin stream over the live
  nodes: stream position ``i`` is node ``i mod N`` with that node's point ``(i div N) mod p_n``.
  The fetch HSDirs, in tor's order, take consecutive chunks of ``cap`` slots, then the
  store-only HSDirs (the ``hsdir_spread_store - hsdir_spread_fetch`` spares per replica that
  clients ask only once the ring shifts) take the following chunks. A node already holding all
  its points in the current chunk is skipped. Consequences (proved in the design document, and
  checked by ``tests/descriptor/test_distinct.py``):

  - every descriptor is full (``cap`` points) and lists ``min(N, cap)`` different nodes, so no
    HSDir's answer depends on one node, and each node's points rotate over the descriptors;
  - when every node has at least ``ceil(cap / N)`` points (always so with equal counts),
    node ``n`` is reached with probability within ``1 / (F * cap)`` of ``1/N``; with unequal
    counts within ``1 / cap`` of its water-filling share (round-robin with each node capped at
    its own count, the rule of today's merge);
  - at most one point per intro relay in each descriptor (``descriptor/merge.py``: a tor
    client maps an intro circuit to the first point of the descriptor on that relay, so a
    second one is useless and hides the first one's death). A node's turn then takes its
    next point on a free relay; a node none of whose points fits keeps its turn and comes
    first in the next descriptor (:func:`deal_slots`). On a large network collisions are
    rare and change nothing; on a small one (the 10-relay test network) a descriptor holds
    at most as many points as there are relays and the shares depend on the relay layout
    (no node starved: tested);
  - beyond ``F * cap`` nodes (120 with 6 fetch HSDirs) some nodes cannot be listed at all; the
    ``epoch`` moves the stream on by ``F * cap`` positions, so over ``K`` consecutive epochs
    every node's slot count is within one of ``K * F * cap / N`` and each node is listed at
    least once in every ``ceil(N / (F * cap))`` consecutive epochs. When every node would get
    the same share anyway, the epoch is ignored, so a rotation never causes needless uploads.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Generic, TypeVar

from rustbalance.descriptor.builder import MAX_INTRO_POINTS
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.errors import DescriptorError

__all__ = [
    "DistinctAssignment",
    "Slot",
    "assign_intro_points",
    "deal_slots",
    "effective_epoch",
    "needs_distinct",
    "reach_probabilities",
]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """One listed intro point: ``point`` of live node ``node`` (indices, not objects)."""

    node: int
    point: int


def _chunk_order(fetch: Sequence[K], store: Sequence[K]) -> list[K]:
    """Fetch HSDirs first (tor's order: they decide what clients see), then the store-only
    spares. ``fetch`` is a subset of ``store`` whenever ``hsdir_spread_fetch <=
    hsdir_spread_store`` (the defaults); were a consensus to set it larger, the extra fetch
    HSDirs are part of the union, so clients asking them find a descriptor too."""
    if len(set(fetch)) != len(fetch) or len(set(store)) != len(store):
        raise DescriptorError("an HSDir is listed twice")
    seen = set(fetch)
    return [*fetch, *(h for h in store if h not in seen)]


def effective_epoch(point_counts: Sequence[int], n_fetch: int, cap: int, epoch: int) -> int:
    """``epoch``, or 0 when the rotation could not make the shares any fairer: every node can
    take its turn in every chunk (at least ``ceil(cap / N)`` points each) and the fetch
    chunks hold a whole number of turns (``N`` divides ``n_fetch * cap``), so every node
    already gets exactly ``n_fetch * cap / N`` slots."""
    n = len(point_counts)
    if n == 0 or n_fetch == 0:
        return 0
    everyone_takes_turns = min(point_counts) >= math.ceil(cap / n)
    if everyone_takes_turns and (n_fetch * cap) % n == 0:
        return 0
    return epoch


def deal_slots(
    point_counts: Sequence[int],
    n_chunks: int,
    n_fetch: int,
    cap: int,
    epoch: int = 0,
    relays: Sequence[Sequence[Collection[Hashable]]] | None = None,
) -> list[list[Slot]]:
    """The slot-dealing core: ``n_chunks`` lists of at most ``cap`` slots each.

    ``point_counts[n]`` is how many distinct intro points live node ``n`` offers (each >= 1).
    Chunks ``0 .. n_fetch - 1`` belong to the fetch HSDirs, the rest to the store-only ones.
    Within a chunk a node's slots are distinct points. ``relays[n][k]``, when given, are the
    identities of the relay that point ``k`` of node ``n`` sits on: a chunk never holds two
    points whose relays share an identity (one point per intro relay, as in the merge).

    The deal is the round-robin stream of the module docstring, kept as each node's next
    stream position: node ``n`` after ``t`` turns is next at position ``t * N + n``, and the
    next slot goes to the node whose next position is lowest. A turn takes the node's point
    ``t mod count``, or its next point that fits; a node that already gave all its points to
    this chunk loses the turn (the stream's skip). Without shared relays this *is* the stream.

    With shared relays (a small network): a node none of whose remaining points fits (their
    relays are taken) is passed over for the rest of the chunk *without* losing its turn, so
    its position stays the lowest and it comes first in the next chunk: an unlucky relay
    layout never starves a node. And a node already in the chunk takes another point only
    while no node passed over in it is a whole lap (N positions) behind: otherwise the nodes
    whose relays happen to be free would fill every descriptor's leftover room, always the
    same ones. A chunk ends when it holds ``cap`` slots or no node can add a point (a chunk
    only fills up, so that is final): a chunk with room left lists every node one of whose
    points fits.
    """
    if not 1 <= cap <= MAX_INTRO_POINTS:
        raise DescriptorError(f"cap must be 1-{MAX_INTRO_POINTS}, got {cap}")
    if not 0 <= n_fetch <= n_chunks:
        raise DescriptorError("n_fetch must be between 0 and n_chunks")
    if epoch < 0:
        raise DescriptorError("epoch must not be negative")
    if any(count < 1 for count in point_counts):
        raise DescriptorError("every live node needs at least one intro point")
    if relays is not None and [len(r) for r in relays] != list(point_counts):
        raise DescriptorError("relays must name one relay per intro point")
    nodes = len(point_counts)
    if nodes == 0:
        return [[] for _ in range(n_chunks)]
    want = min(cap, sum(point_counts))
    start = effective_epoch(point_counts, n_fetch, cap, epoch) * n_fetch * cap
    # Each node's first position at or after ``start``: the nodes before ``start mod N`` come
    # one turn later.
    turns = [start // nodes + (1 if node < start % nodes else 0) for node in range(nodes)]
    chunks: list[list[Slot]] = []
    for _ in range(n_chunks):
        taken: list[set[int]] = [set() for _ in range(nodes)]
        used_relays: set[Hashable] = set()
        passed_over: set[int] = set()  # no remaining point of theirs fits this chunk
        exhausted: set[int] = set()  # every point of theirs is in this chunk
        chunk: list[Slot] = []
        while len(chunk) < want:
            node = _next_in_stream(turns, passed_over)
            if node is None:
                break  # no node can add a point to this chunk: it is as full as it gets
            count = point_counts[node]
            if len(taken[node]) >= count:
                # All its points are in this chunk: it loses the turn, as in the stream (and
                # again on every lap); when only such nodes are left, the chunk is done.
                turns[node] += 1
                exhausted.add(node)
                if len(exhausted | passed_over) == nodes:
                    break
                continue
            if taken[node] and _laps_ahead(turns, node, passed_over):
                # A second point in this chunk only while nobody passed over is a whole lap
                # behind: a full descriptor is not bought with an unfair one.
                passed_over.add(node)
                continue
            point = _next_fitting(
                turns[node] % count,
                count,
                taken[node],
                relays[node] if relays else None,
                used_relays,
            )
            if point is None:
                passed_over.add(node)  # relays taken: it keeps its turn for the next chunk
                continue
            taken[node].add(point)
            if relays:
                used_relays.update(relays[node][point])
            chunk.append(Slot(node, point))
            turns[node] += 1
        chunks.append(chunk)
    return chunks


def _laps_ahead(turns: Sequence[int], node: int, passed_over: set[int]) -> bool:
    """Whether ``node``'s next position is a whole lap (N positions) or more beyond a node
    passed over in this chunk: it would take a second turn before that one had its first."""
    nodes = len(turns)
    position = turns[node] * nodes + node
    return any(position >= turns[n] * nodes + n + nodes for n in passed_over)


def _next_in_stream(turns: Sequence[int], passed_over: set[int]) -> int | None:
    """The node whose next stream position (``turns[n] * N + n``) is lowest, among those not
    passed over in this chunk; None when every node is."""
    candidates = (n for n in range(len(turns)) if n not in passed_over)
    return min(candidates, key=lambda n: (turns[n], n), default=None)


def _next_fitting(
    first: int,
    count: int,
    taken: set[int],
    relays: Sequence[Collection[Hashable]] | None,
    used_relays: set[Hashable],
) -> int | None:
    """The node's first point from ``first`` on (cyclically) that is not in the chunk and
    whose relay is free; None if there is none."""
    for step in range(count):
        point = (first + step) % count
        if point in taken:
            continue
        if relays is not None and not used_relays.isdisjoint(relays[point]):
            continue
        return point
    return None


@dataclass(frozen=True)
class DistinctAssignment(Generic[K]):
    """The intro points of each HSDir's descriptor for one descriptor target (one blinded key).

    ``per_hsdir`` covers the fetch HSDirs and the store HSDirs (upload to every key). With
    ``distinct`` False every HSDir holds the same list: today's merged descriptor.
    ``owner`` maps each listed intro point's auth key to the index of its node in the
    caller's ``instances``; ``fetch`` keeps the fetch HSDirs for :func:`reach_probabilities`.
    ``epoch`` is the epoch the deal used (0 when the rotation changes nothing); ``rotates``
    says whether another epoch would deal differently (so a new epoch needs a new round).
    """

    per_hsdir: Mapping[K, tuple[IntroPoint, ...]]
    distinct: bool
    fetch: tuple[K, ...]
    owner: Mapping[bytes, int]
    epoch: int
    rotates: bool = False


def _live_points(
    instances: Sequence[Sequence[IntroPoint]], deadline: int
) -> tuple[list[int], list[list[IntroPoint]]]:
    """Each node's points that outlive ``deadline``, duplicates (same auth key, the same intro
    circuit) kept once at their first node; nodes left with none are not live."""
    seen: set[bytes] = set()
    live_index: list[int] = []
    live: list[list[IntroPoint]] = []
    for index, points in enumerate(instances):
        mine: list[IntroPoint] = []
        for point in points:
            if point.expires_at > deadline and point.auth_key not in seen:
                seen.add(point.auth_key)
                mine.append(point)
        if mine:
            live_index.append(index)
            live.append(mine)
    return live_index, live


def needs_distinct(
    instances: Sequence[Sequence[IntroPoint]],
    *,
    max_points: int,
    now: int,
    min_remaining_validity: int,
) -> bool:
    """Whether one descriptor cannot list every live node's valid intro points: more than
    ``max_points`` of them (duplicates counted once). The one rule that switches distinct
    descriptors on (``[publish] distinct_descriptors = "auto"``)."""
    _, live = _live_points(instances, now + min_remaining_validity)
    return sum(len(points) for points in live) > max_points


def assign_intro_points(
    instances: Sequence[Sequence[IntroPoint]],
    fetch_hsdirs: Sequence[K],
    store_hsdirs: Sequence[K],
    *,
    max_points: int,
    now: int,
    min_remaining_validity: int,
    epoch: int = 0,
) -> DistinctAssignment[K]:
    """Intro points per HSDir for one descriptor target.

    ``instances``: each node's intro points, in a stable node order (sorted by node id, so
    that a new publisher after a failover deals the same layout). ``fetch_hsdirs`` and
    ``store_hsdirs``: the responsible HSDirs for ``hsdir_spread_fetch`` and
    ``hsdir_spread_store`` in tor's order (``tor.hashring.responsible_hsdirs``), as any
    hashable keys (fingerprints). Points whose certificates expire before ``now +
    min_remaining_validity`` are left out, as in the merge. ``epoch`` is the rotation epoch
    (see the module docstring); it matters only beyond what a fair deal can give everyone.
    Each descriptor lists at most one point per intro relay (the merge's rule, issue 14: a
    client uses only the first point of a descriptor on a relay).
    """
    if not 1 <= max_points <= MAX_INTRO_POINTS:
        raise DescriptorError(f"max_points must be 1-{MAX_INTRO_POINTS}, got {max_points}")
    if min_remaining_validity < 0:
        raise DescriptorError("min_remaining_validity must not be negative")
    if epoch < 0:
        raise DescriptorError("epoch must not be negative")
    order = _chunk_order(fetch_hsdirs, store_hsdirs)
    live_index, live = _live_points(instances, now + min_remaining_validity)
    owner = {p.auth_key: live_index[n] for n, points in enumerate(live) for p in points}
    if not needs_distinct(
        instances, max_points=max_points, now=now, min_remaining_validity=min_remaining_validity
    ):
        merged = tuple(merge_intro_points(instances, max_points, now, min_remaining_validity))
        return DistinctAssignment({h: merged for h in order}, False, tuple(fetch_hsdirs), owner, 0)
    counts = [len(points) for points in live]
    n_fetch = len(fetch_hsdirs)
    used_epoch = effective_epoch(counts, n_fetch, max_points, epoch)
    relays = [[p.relay_ids for p in points] for points in live]
    chunks = deal_slots(counts, len(order), n_fetch, max_points, used_epoch, relays)
    per_hsdir = {
        hsdir: tuple(live[slot.node][slot.point] for slot in chunk)
        for hsdir, chunk in zip(order, chunks, strict=True)
    }
    rotates = effective_epoch(counts, n_fetch, max_points, 1) != 0
    return DistinctAssignment(
        per_hsdir, True, tuple(fetch_hsdirs), owner, used_epoch, rotates=rotates
    )


def reach_probabilities(assignment: DistinctAssignment[K]) -> dict[int, Fraction]:
    """Exactly how likely a fresh client is to reach each node (by index in ``instances``),
    choosing as tor does: one fetch HSDir uniformly (``hs_pick_hsdir``), then one intro point
    of its descriptor uniformly (``client_get_random_intro``), every intro point working.
    Nodes that no fetch descriptor lists are absent (probability 0)."""
    result: dict[int, Fraction] = {}
    for hsdir in assignment.fetch:
        points = assignment.per_hsdir.get(hsdir, ())
        for point in points:  # an empty descriptor reaches nobody
            node = assignment.owner[point.auth_key]
            share = Fraction(1, len(assignment.fetch) * len(points))
            result[node] = result.get(node, Fraction(0)) + share
    return result
