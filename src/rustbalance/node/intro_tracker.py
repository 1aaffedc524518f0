"""The node's own intro points, as its tor last built them (pure).

Intro points are compared by content, the set of intro auth keys, never by count (system.md
W15: the original replaced its list only when the number changed, so a tor that rotated one
intro point kept publishing a dead one). ``flow-control`` and ``pow-params`` are kept from the
same descriptor: a single node copies them into the master descriptor, which is valid because
there is one node (system.md W11); with ``pow-params`` only into the first one, whose blinded
key these intro points are bound to (docs/pow.md).

The descriptor is the one tor hosts: the master's in ``shared`` mode, the node's own instance
descriptor in ``instance`` mode (decoded with the instance address; its intro points accept the
master's subcredentials through ``ob_config``, tor.md §11). ``pow-params`` is carried over only
in shared mode (a PoW solution is bound to the blinded key of the service that checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor

__all__ = ["IntroTracker"]


@dataclass
class IntroTracker:
    """What the last read of the node's own descriptor said."""

    intro_points: tuple[IntroPoint, ...] = ()
    flow_control: str | None = None
    pow_params: PowParams | None = None
    revision_counter: int | None = None
    updated_at: float | None = None
    changes: int = 0
    _auth_keys: frozenset[bytes] = field(default_factory=frozenset)

    @property
    def count(self) -> int:
        return len(self.intro_points)

    def clear(self) -> None:
        """Forget the intro points: their circuits died with the tor that built them."""
        self.intro_points = ()
        self._auth_keys = frozenset()
        self.updated_at = None

    def update(self, decoded: DecodedDescriptor, now: float) -> bool:
        """Record a freshly read descriptor; True if the set of intro points changed."""
        keys = frozenset(point.auth_key for point in decoded.intro_points)
        changed = keys != self._auth_keys
        self.intro_points = decoded.intro_points
        self._auth_keys = keys
        self.flow_control = decoded.flow_control
        self.pow_params = decoded.pow_params
        self.revision_counter = decoded.revision_counter
        self.updated_at = now
        if changed:
            self.changes += 1
        return changed
