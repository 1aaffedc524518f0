"""Fair merge of intro points from several instances (pure and deterministic).

The original product cut "own points first, then peers" at 20 (system.md W-list, 3.6); here
every instance gets a fair share: one point from each instance in turn (round-robin, in the
given order), skipping duplicates and points that expire too soon, until ``max_points``.

Duplicates: the same intro auth key (the same intro circuit) is taken once, and at most one
point per intro *relay*. A tor client maps an intro circuit to the first intro point of the
descriptor on the relay it extended to (core/or/circuituse.c ``circuit_get_open_circ_or_launch``
-> feature/hs/hs_client.c ``hs_client_setup_intro_circ_auth_key`` ->
``find_desc_intro_point_by_legacy_id``, which compares the relay's RSA identity), and a
re-extended intro circuit keeps the auth key it had (``hs_client_reextend_intro_circuit``). So
a second point on the same relay is never used, and once the first one dies the client notes
every failure against the first one's key: the second looks usable forever, the client never
concludes that all points failed and never refetches the descriptor (measured, issue 14: a
client held a dead descriptor until its period ended). An instance whose points all share
relays already taken gets none in this descriptor (it still serves the clients of older ones).
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

    def take(point: IntroPoint) -> None:
        seen_auth.add(point.auth_key)
        seen_relay.update(point.relay_ids)
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

    def new_relay_only(_index: int, point: IntroPoint) -> bool:
        return seen_relay.isdisjoint(point.relay_ids)

    round_robin(queues, new_relay_only)
    return merged
