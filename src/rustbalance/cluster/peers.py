"""The peer table (pure: the caller passes ``now``; nothing here reads a clock or a socket).

Fixes W2 (peers never died) and the gossip half of W4 and W17 of the original:

- a peer is *live* while its last authenticated message is younger than the heartbeat timeout;
  :meth:`PeerTable.expire` drops dead peers together with their intro points, so a dead node's
  intro points leave the next descriptor;
- a peer's intro points are replaced by content: an update reports a change only when the *set*
  differs, not when the count does;
- addresses are learned only from authenticated messages (the inputs here are payloads that a
  :class:`~rustbalance.cluster.messages.Receiver` accepted), never from a datagram's source
  address. What a node says about itself outranks what others say about it, so one peer cannot
  redirect a live peer's address;
- every collection is bounded; known peers can be saved as JSON and strictly reloaded so a
  restarted node rejoins without help.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from rustbalance.cluster.messages import (
    MAX_KNOWN_PEERS,
    CoordinationError,
    Heartbeat,
    IntroPoints,
    PeerAnnounce,
    Role,
    check_node_id,
    check_peer_address,
    intro_points_digest,
)

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT_SECS",
    "PEERS_FILE_VERSION",
    "AddressSource",
    "KnownPeer",
    "PeerState",
    "PeerTable",
    "load_known_peers",
]

DEFAULT_HEARTBEAT_TIMEOUT_SECS = 15.0
PEERS_FILE_VERSION = 1
_MAX_PEERS_FILE_CHARS = 1_000_000


class AddressSource(StrEnum):
    """Where an address came from, strongest first."""

    SELF = "self"  # the node said it about itself (its heartbeat or its own announce)
    GOSSIP = "gossip"  # another authenticated node vouched for it
    RESTORED = "restored"  # loaded from the peers file at startup


@dataclass(frozen=True)
class KnownPeer:
    node_id: str
    address: str
    source: AddressSource
    updated_at: float


@dataclass(frozen=True)
class PeerState:
    """What we know about one live peer from its authenticated messages."""

    node_id: str
    role: Role
    priority: int
    term: int
    publisher_eligible: bool
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
        own_address: str | None = None,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_SECS,
        max_peers: int = MAX_KNOWN_PEERS,
    ) -> None:
        self.own_id = check_node_id(own_id)
        self.own_address = check_peer_address(own_address) if own_address is not None else None
        self.heartbeat_timeout = heartbeat_timeout
        self._max = max_peers
        self._live: dict[str, PeerState] = {}
        self._known: dict[str, KnownPeer] = {}

    def __repr__(self) -> str:
        return (
            f"PeerTable(own_id={self.own_id!r}, live={len(self._live)}, known={len(self._known)})"
        )

    # -- inputs (authenticated payloads only) -------------------------------------------------

    def on_heartbeat(self, sender: str, heartbeat: Heartbeat, now: float) -> bool:
        """Upsert ``sender``; learn gossiped peers. Returns True if the peer was not live before."""
        if sender == self.own_id:
            return False
        old = self._live.get(sender)
        if old is None and len(self._live) >= self._max:
            return False
        self._live[sender] = PeerState(
            node_id=sender,
            role=heartbeat.role,
            priority=heartbeat.priority,
            term=heartbeat.term,
            publisher_eligible=heartbeat.publisher_eligible,
            last_heard=now,
            last_publish=heartbeat.last_publish,
            advertised_digest=heartbeat.intro_digest,
            intro_points=old.intro_points if old is not None else (),
            intro_points_at=old.intro_points_at if old is not None else None,
        )
        for node_id, address in heartbeat.known_peers:
            source = AddressSource.SELF if node_id == sender else AddressSource.GOSSIP
            self._learn(node_id, address, source, now)
        return old is None

    def on_intro_points(self, sender: str, message: IntroPoints, now: float) -> bool:
        """Replace ``sender``'s intro points; True if the set of intro points changed.

        Ignored (False) for a sender without a heartbeat yet: without its priority and role the
        peer is not usable, and its periodic messages bring the intro points again.
        """
        peer = self._live.get(sender)
        if peer is None:
            return False
        # Duplicates would be published twice; keep the first occurrence and the sender's order.
        points = tuple(dict.fromkeys(message.intro_points))
        changed = intro_points_digest(points) != intro_points_digest(peer.intro_points)
        self._live[sender] = replace(peer, intro_points=points, intro_points_at=now, last_heard=now)
        return changed

    def on_peer_announce(self, sender: str, message: PeerAnnounce, now: float) -> bool:
        """Learn an announced peer; True if the known-peer table changed."""
        source = AddressSource.SELF if message.node_id == sender else AddressSource.GOSSIP
        return self._learn(message.node_id, message.address, source, now)

    def restore(self, peers: tuple[KnownPeer, ...] | list[KnownPeer], now: float) -> None:
        """Add peers loaded by :func:`load_known_peers` (never overriding fresher knowledge)."""
        for peer in peers:
            self._learn(peer.node_id, peer.address, AddressSource.RESTORED, now)

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

    def known_peers(self) -> list[KnownPeer]:
        return [self._known[k] for k in sorted(self._known)]

    def address_of(self, node_id: str) -> str | None:
        known = self._known.get(node_id)
        return known.address if known is not None else None

    def gossip(self, limit: int = MAX_KNOWN_PEERS) -> tuple[tuple[str, str], ...]:
        """The ``known_peers`` list for our heartbeat: ourselves first, then the freshest."""
        entries: list[tuple[str, str]] = []
        if self.own_address is not None:
            entries.append((self.own_id, self.own_address))
        freshest = sorted(self._known.values(), key=lambda p: (-p.updated_at, p.node_id))
        entries.extend((p.node_id, p.address) for p in freshest)
        return tuple(entries[:limit])

    def to_json(self) -> str:
        """The known peers as JSON for the peers file (addresses only; no liveness or secrets)."""
        doc = {
            "version": PEERS_FILE_VERSION,
            "peers": [{"node_id": p.node_id, "address": p.address} for p in self.known_peers()],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    # -- internals ----------------------------------------------------------------------------

    def _learn(self, node_id: str, address: str, source: AddressSource, now: float) -> bool:
        if node_id == self.own_id:
            return False
        old = self._known.get(node_id)
        if old is not None and not self._may_replace(old, source, now):
            return False
        if old is None and len(self._known) >= self._max and not self._evict_one(now):
            return False
        self._known[node_id] = KnownPeer(node_id, address, source, now)
        return old is None or old.address != address or old.source != source

    def _may_replace(self, old: KnownPeer, source: AddressSource, now: float) -> bool:
        if source is AddressSource.SELF:
            return True
        if source is AddressSource.RESTORED:
            return False  # anything learned at runtime is fresher than the file
        # Third-party gossip may not move a live peer that told us its own address (W4 hijack);
        # it may update a dead one, which has perhaps moved and is reachable only that way.
        return old.source is not AddressSource.SELF or not self.is_live(old.node_id, now)

    def _evict_one(self, now: float) -> bool:
        candidates = [p for p in self._known.values() if not self.is_live(p.node_id, now)]
        if not candidates:
            return False
        victim = min(candidates, key=lambda p: (p.updated_at, p.node_id))
        del self._known[victim.node_id]
        return True


def _fail(message: str) -> CoordinationError:
    return CoordinationError(f"peers file: {message}")


def load_known_peers(text: str, *, max_peers: int = MAX_KNOWN_PEERS) -> tuple[KnownPeer, ...]:
    """Strictly parse a peers file written by :meth:`PeerTable.to_json`.

    Raises only :class:`CoordinationError` (unknown keys, wrong types, bad ids or addresses,
    duplicates, too many entries, unknown version).
    """
    if not isinstance(text, str) or len(text) > _MAX_PEERS_FILE_CHARS:
        raise _fail("not text or too large")
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise _fail("not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "peers"}:
        raise _fail("expected an object with exactly 'version' and 'peers'")
    version = doc["version"]
    if isinstance(version, bool) or version != PEERS_FILE_VERSION:
        raise _fail(f"unsupported version {version!r}")
    entries = doc["peers"]
    if not isinstance(entries, list) or len(entries) > max_peers:
        raise _fail(f"'peers' must be a list of at most {max_peers} entries")
    peers: list[KnownPeer] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"node_id", "address"}:
            raise _fail(f"peers[{index}] must have exactly 'node_id' and 'address'")
        node_id, address = entry["node_id"], entry["address"]
        if not isinstance(node_id, str) or not isinstance(address, str):
            raise _fail(f"peers[{index}]: node_id and address must be strings")
        check_node_id(node_id)
        canonical = check_peer_address(address)
        if node_id in seen:
            raise _fail(f"duplicate node id {node_id!r}")
        seen.add(node_id)
        peers.append(KnownPeer(node_id, canonical, AddressSource.RESTORED, 0.0))
    return tuple(peers)
