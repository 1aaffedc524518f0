"""The live-peer table (pure: the caller passes ``now``; nothing here reads a clock or a socket).

Fixes W2 (peers never died) of the original:

- a peer is *live* while its last authenticated message is younger than the heartbeat timeout;
  :meth:`PeerTable.expire` drops dead peers together with their intro points, so a dead node's
  intro points leave the next descriptor; :meth:`PeerTable.remove` does the same at once for a
  revoked node;
- a peer's intro points are replaced by content: an update reports a change only when the *set*
  differs, not when the count does;
- only admitted members get here (the coordinator checks every sender against the membership,
  issue 16), with the priority and eligibility of their admission records; where a member is
  reached is its record's business, not this table's (there is no address gossip any more);
- every collection is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rustbalance.cluster.messages import (
    Heartbeat,
    IntroPoints,
    Role,
    check_node_id,
    intro_points_digest,
)

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT_SECS", "DEFAULT_MAX_PEERS", "PeerState", "PeerTable"]

DEFAULT_HEARTBEAT_TIMEOUT_SECS = 15.0
DEFAULT_MAX_PEERS = 256


@dataclass(frozen=True)
class PeerState:
    """What we know about one live peer from its authenticated messages."""

    node_id: str
    role: Role
    priority: int  # from its admission record
    term: int
    publisher_eligible: bool  # its record's eligibility, lowered by its heartbeat if it says so
    last_heard: float
    last_publish: int | None
    advertised_digest: bytes  # digest of the intro points the peer says it has
    intro_points: tuple[bytes, ...] = ()
    intro_points_at: float | None = None

    @property
    def intro_points_current(self) -> bool:
        """True if the intro points we hold are the ones the peer's last heartbeat advertised."""
        return intro_points_digest(self.intro_points) == self.advertised_digest


class PeerTable:
    def __init__(
        self,
        own_id: str,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_SECS,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        self.own_id = check_node_id(own_id)
        self.heartbeat_timeout = heartbeat_timeout
        self._max = max_peers
        self._live: dict[str, PeerState] = {}

    def __repr__(self) -> str:
        return f"PeerTable(own_id={self.own_id!r}, live={len(self._live)})"

    # -- inputs (authenticated payloads of admitted members only) -----------------------------

    def on_heartbeat(
        self,
        sender: str,
        heartbeat: Heartbeat,
        now: float,
        *,
        priority: int,
        eligible: bool,
    ) -> bool:
        """Upsert ``sender``. Returns True if the peer was not live before."""
        if sender == self.own_id:
            return False
        old = self._live.get(sender)
        if old is None and len(self._live) >= self._max:
            return False
        self._live[sender] = PeerState(
            node_id=sender,
            role=heartbeat.role,
            priority=priority,
            term=heartbeat.term,
            publisher_eligible=eligible and heartbeat.publisher_eligible,
            last_heard=now,
            last_publish=heartbeat.last_publish,
            advertised_digest=heartbeat.intro_digest,
            intro_points=old.intro_points if old is not None else (),
            intro_points_at=old.intro_points_at if old is not None else None,
        )
        return old is None

    def on_intro_points(self, sender: str, message: IntroPoints, now: float) -> bool:
        """Replace ``sender``'s intro points; True if the set of intro points changed.

        Ignored (False) for a sender without a heartbeat yet: without its role the peer is not
        usable, and its periodic messages bring the intro points again.
        """
        peer = self._live.get(sender)
        if peer is None:
            return False
        # Duplicates would be published twice; keep the first occurrence and the sender's order.
        points = tuple(dict.fromkeys(message.intro_points))
        changed = intro_points_digest(points) != intro_points_digest(peer.intro_points)
        self._live[sender] = replace(peer, intro_points=points, intro_points_at=now, last_heard=now)
        return changed

    def expire(self, now: float) -> tuple[str, ...]:
        """Drop peers silent for longer than the heartbeat timeout; returns their ids (sorted)."""
        dead = sorted(
            node_id
            for node_id, peer in self._live.items()
            if now - peer.last_heard > self.heartbeat_timeout
        )
        for node_id in dead:
            del self._live[node_id]
        return tuple(dead)

    def remove(self, node_id: str) -> bool:
        """Forget ``node_id`` at once (it was revoked); True if it was live."""
        return self._live.pop(node_id, None) is not None

    # -- queries ------------------------------------------------------------------------------

    def get(self, node_id: str) -> PeerState | None:
        return self._live.get(node_id)

    def is_live(self, node_id: str, now: float) -> bool:
        peer = self._live.get(node_id)
        return peer is not None and now - peer.last_heard <= self.heartbeat_timeout

    def live_peers(self, now: float) -> list[PeerState]:
        """Live peers sorted by id (expired ones are excluded even before :meth:`expire`)."""
        return [self._live[k] for k in sorted(self._live) if self.is_live(k, now)]

    def intro_points(self, now: float) -> dict[str, tuple[bytes, ...]]:
        """Intro points of every live peer that sent any, by node id (for the merge)."""
        return {p.node_id: p.intro_points for p in self.live_peers(now) if p.intro_points}
