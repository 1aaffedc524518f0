"""Fair merge of intro points from several instances (pure and deterministic).

The original product cut "own points first, then peers" at 20 (system.md W-list, 3.6); here
every instance gets a fair share: one point from each instance in turn (round-robin, in the
given order), skipping duplicates and points that expire too soon, until ``max_points``.

Duplicates: the same intro auth key (the same intro circuit) is taken once. Two points on the
same intro relay (ed25519 identity link specifier) are distinct intro circuits, often of two
different instances; dropping one could leave an instance with no point at all (on a small
network that happens), so the merge only *prefers* relay diversity: a first round-robin pass
takes points on relays not chosen yet, a second pass fills the remaining places with the
points the first pass skipped, again round-robin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rustbalance.descriptor.builder import MAX_INTRO_POINTS
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import DescriptorError

__all__ = ["merge_intro_points"]


def merge_intro_points(
    instances: Sequence[Sequence[IntroPoint]],
    max_points: int,
    now: int,
    min_remaining_validity: int,
) -> list[IntroPoint]:
    """Merge round-robin; drop points whose 09/0B certs expire before
    ``now + min_remaining_validity`` (seconds)."""
    if not 1 <= max_points <= MAX_INTRO_POINTS:
        raise DescriptorError(f"max_points must be 1-{MAX_INTRO_POINTS}, got {max_points}")
    if min_remaining_validity < 0:
        raise DescriptorError("min_remaining_validity must not be negative")
    deadline = now + min_remaining_validity
    queues = [[point for point in points if point.expires_at > deadline] for points in instances]
    seen_auth: set[bytes] = set()
    seen_relay: set[bytes] = set()
    merged: list[IntroPoint] = []
    skipped: list[list[IntroPoint]] = [[] for _ in queues]

    def take(point: IntroPoint) -> None:
        seen_auth.add(point.auth_key)
        relay = point.relay_ed25519_id
        if relay is not None:
            seen_relay.add(relay)
        merged.append(point)

    def round_robin(
        queues: Sequence[Sequence[IntroPoint]], accept: Callable[[int, IntroPoint], bool]
    ) -> None:
        """One accepted point per instance per round, until the cap or the queues run out."""
        positions = [0] * len(queues)
        while len(merged) < max_points:
            progressed = False
            for index, queue in enumerate(queues):
                if len(merged) >= max_points:
                    break
                while positions[index] < len(queue):
                    point = queue[positions[index]]
                    positions[index] += 1
                    if point.auth_key not in seen_auth and accept(index, point):
                        take(point)
                        progressed = True
                        break
            if not progressed:
                return

    def new_relay_only(index: int, point: IntroPoint) -> bool:
        relay = point.relay_ed25519_id
        if relay is not None and relay in seen_relay:
            skipped[index].append(point)
            return False
        return True

    # Pass 1: new relays only; pass 2: fill with the points that shared a relay.
    round_robin(queues, new_relay_only)
    round_robin(skipped, lambda _index, _point: True)
    return merged
