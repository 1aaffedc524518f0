"""One typed snapshot of the node, rendered as the ``status`` document and as ``/metrics``.

The daemon assembles a :class:`NodeSnapshot` from its components (each gives its own typed
part); :func:`status_document` and :func:`metrics_values` are the only places that turn it
into the status JSON (node/status.py serves it) and into the metrics snapshot keys
(node/metrics.py). So ``status`` and ``/metrics`` can never disagree about a number.

Status document (what ``rustbalance status --format json`` prints)::

    {"node_id", "mode": "single"|"multi", "role": "publisher"|"standby",
     "master_onion_address", "tor": {"running", "restarts", "restart_failures", "mode"},
     "intro_points": {"own", "published", "own_auth_keys", "published_auth_keys"},
     "last_publish": {"current": unix|null, "next": unix|null, "last_attempt", ...,
                      "results": {"current": {"ok", "error", "hsdirs": [...]}, ...}},
     "peers": [{"node_id", "alive"}], "proxy": {counter: int}, "generated_at": unix,
     "ready", "uptime_secs",
     optional: "cluster", "target", "instance_onion_address", "backends", "mesh",
     "distinct_descriptors": {"mode": "auto"|"off", "active",
                              "periods": {"current": {"revision", "descriptors",
                                          "expected_share": {node_id: share},
                                          "hsdirs": [{"hsdir", "intro_points", "auth_keys",
                                                      "uploaded", "verified"}]}, ...}}}

With distinct descriptors, ``intro_points.published`` counts every intro point some HSDir's
descriptor lists (the union).

    "cluster": {"backend": "embedded"|"etcd", "term", "election_role", "publisher",
                "native_publishing", "counters", "rejected", "peer_intro_points",
                "revoked", "members",
                etcd only: "etcd": {"endpoint", "connected", "registered", "last_error"}}

``revoked``: this node was revoked (always false with etcd: a node's identity there is its TLS
certificate). ``members``: every admitted node (id, key fingerprint, priority, eligibility,
whether it holds the master key, addresses, live, last seen, role; what ``rustbalance cluster
members`` shows; empty with etcd).

Intro auth keys are public (every client that knows the address sees them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rustbalance.node.coordination import ClusterStatus
from rustbalance.node.metrics import MAX_BACKENDS, MAX_PEERS, proxy_snapshot
from rustbalance.node.publish_policy import PublishState
from rustbalance.proxy.session import ProxyStats

__all__ = [
    "BackendSnapshot",
    "ClusterSnapshot",
    "DistinctHsDir",
    "DistinctPeriodSnapshot",
    "DistinctSnapshot",
    "IntroSnapshot",
    "NodeSnapshot",
    "PublishSnapshot",
    "TargetSnapshot",
    "TorSnapshot",
    "metrics_values",
    "status_document",
]


@dataclass(frozen=True)
class TorSnapshot:
    mode: str  # "managed" or "system"
    running: bool
    restarts: int = 0
    restart_failures: int = 0


@dataclass(frozen=True)
class IntroSnapshot:
    own_auth_keys: tuple[bytes, ...] = ()
    # The intro points of the last successful publish (merged, in a cluster).
    published_auth_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class DistinctHsDir:
    """One HSDir's descriptor in a distinct round."""

    fingerprint: str
    auth_keys: tuple[bytes, ...]  # the intro points dealt to it (public, like every auth key)
    uploaded: bool | None  # the latest upload's verdict (None: unknown)
    verified: str | None  # the fetch-back verdict (None: not checked; publication.Verdict)


@dataclass(frozen=True)
class DistinctPeriodSnapshot:
    """One target's last published distinct round (docs/distinct-descriptors.md)."""

    revision: int
    # How many different intro-point sets went out.
    descriptors: int
    # Each node's exact expected share of fresh clients (node id -> 0..1).
    expected_shares: Mapping[str, float]
    # Per HSDir, in the deal's order (fetch HSDirs in tor's order, then the spares).
    hsdirs: tuple[DistinctHsDir, ...]


@dataclass(frozen=True)
class DistinctSnapshot:
    """``[publish] distinct_descriptors`` and, when the last publish was distinct, its rounds
    by period ("current"/"next"); no periods: one descriptor for all HSDirs."""

    mode: str
    periods: Mapping[str, DistinctPeriodSnapshot] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class PublishSnapshot:
    """The publish state (a copy) and the monotonic publish totals for metrics."""

    state: PublishState = dataclasses.field(default_factory=PublishState)
    # Descriptor age at ``generated_at`` (None: never published).
    descriptor_age: float | None = None
    periods: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    hsdir_uploads: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"ok": 0, "failed": 0}
    )
    hsdir_last_upload: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    distinct: DistinctSnapshot | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    status: ClusterStatus
    # PublishHidServDescriptors as last applied (None: not yet).
    native_publishing: bool | None


@dataclass(frozen=True)
class TargetSnapshot:
    healthy: bool
    probes: int
    consecutive_failures: int
    last_probe: str | None


@dataclass(frozen=True)
class BackendSnapshot:
    address: str  # <56 chars>, without .onion
    down_reason: str | None
    auth_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    master_onion_address: str
    multi: bool
    publisher: bool
    ready: bool
    uptime_secs: float
    generated_at: float
    tor: TorSnapshot
    intro: IntroSnapshot = IntroSnapshot()
    publish: PublishSnapshot = dataclasses.field(default_factory=PublishSnapshot)
    # Instance mode: the address this node's tor hosts.
    instance_onion_address: str | None = None
    cluster: ClusterSnapshot | None = None
    proxy: ProxyStats | None = None
    target: TargetSnapshot | None = None
    backends: tuple[BackendSnapshot, ...] | None = None
    mesh: Mapping[str, Any] | None = None


def _peers(cluster: ClusterSnapshot | None) -> list[dict[str, Any]]:
    if cluster is None:
        return []
    live = set(cluster.status.live_peers)
    known = live | set(cluster.status.known_peers)
    return [{"node_id": node_id, "alive": node_id in live} for node_id in sorted(known)]


def status_document(s: NodeSnapshot) -> dict[str, Any]:
    """The ``rustbalance status`` JSON document."""
    doc: dict[str, Any] = {
        "node_id": s.node_id,
        "mode": "multi" if s.multi else "single",
        "role": "publisher" if s.publisher else "standby",
        "master_onion_address": s.master_onion_address,
        "tor": {
            "running": s.tor.running,
            "restarts": s.tor.restarts,
            "restart_failures": s.tor.restart_failures,
            "mode": s.tor.mode,
        },
        "intro_points": {
            "own": len(s.intro.own_auth_keys),
            "published": len(s.intro.published_auth_keys),
            "own_auth_keys": [key.hex() for key in s.intro.own_auth_keys],
            "published_auth_keys": [key.hex() for key in s.intro.published_auth_keys],
        },
        "last_publish": s.publish.state.to_status(),
        "peers": _peers(s.cluster),
        "proxy": (
            {k: int(v) for k, v in dataclasses.asdict(s.proxy).items()}
            if s.proxy is not None
            else {}
        ),
        "generated_at": s.generated_at,
    }
    if s.cluster is not None:
        status = s.cluster.status
        doc["cluster"] = {
            "backend": status.backend,
            "term": status.term,
            "election_role": status.election_role,
            "publisher": status.publisher,
            "native_publishing": s.cluster.native_publishing,
            "counters": dict(status.counters),
            "rejected": dict(status.rejected),
            "peer_intro_points": dict(status.peer_intro_points),
            "revoked": status.revoked,
            "members": [dict(member) for member in status.members],
        }
        if status.etcd is not None:
            doc["cluster"]["etcd"] = {
                "endpoint": status.etcd.endpoint,
                "connected": status.etcd.connected,
                "registered": status.etcd.registered,
                "last_error": status.etcd.last_error,
            }
    if s.target is not None:
        doc["target"] = {
            "healthy": s.target.healthy,
            "probes": s.target.probes,
            "consecutive_failures": s.target.consecutive_failures,
            "last_probe": s.target.last_probe,
        }
    if s.instance_onion_address is not None:
        doc["instance_onion_address"] = s.instance_onion_address
    if s.backends is not None:
        doc["backends"] = {
            f"{b.address}.onion": {
                "up": b.down_reason is None,
                "reason": b.down_reason,
                "intro_points": len(b.auth_keys),
                "auth_keys": [key.hex() for key in b.auth_keys],
            }
            for b in s.backends
        }
    if s.mesh is not None:
        doc["mesh"] = dict(s.mesh)
    if s.publish.distinct is not None:
        doc["distinct_descriptors"] = _distinct_status(s.publish.distinct)
    doc["ready"] = s.ready
    doc["uptime_secs"] = s.uptime_secs
    return doc


def _distinct_status(d: DistinctSnapshot) -> dict[str, Any]:
    return {
        "mode": d.mode,
        "active": bool(d.periods),
        "periods": {
            label: {
                "revision": period.revision,
                "descriptors": period.descriptors,
                "expected_share": dict(period.expected_shares),
                "hsdirs": [
                    {
                        "hsdir": h.fingerprint,
                        "intro_points": len(h.auth_keys),
                        "auth_keys": [key.hex() for key in h.auth_keys],
                        "uploaded": h.uploaded,
                        "verified": h.verified,
                    }
                    for h in period.hsdirs
                ],
            }
            for label, period in sorted(d.periods.items())
        },
    }


def metrics_values(s: NodeSnapshot) -> dict[str, Any]:
    """The :class:`~rustbalance.node.metrics.NodeMetrics` snapshot keys."""
    age = s.publish.descriptor_age
    values: dict[str, Any] = {
        "publishes": {p: dict(c) for p, c in s.publish.periods.items()},
        "hsdir_uploads": dict(s.publish.hsdir_uploads),
        "hsdir_last_upload": dict(s.publish.hsdir_last_upload),
        # A wall clock that stepped back must not make the age negative.
        "descriptor_age_seconds": None if age is None else max(age, 0.0),
        "is_publisher": s.publisher,
        "tor_up": s.tor.running,
        "tor_restarts": s.tor.restarts,
    }
    intro = {"own": len(s.intro.own_auth_keys), "merged": len(s.intro.published_auth_keys)}
    if s.cluster is not None:
        status = s.cluster.status
        intro["peers"] = sum(status.peer_intro_points.values())
        values["peers_alive"] = len(status.live_peers)
        values["heartbeats_sent"] = status.counters.get("heartbeats_sent", 0)
        values["heartbeats_received"] = status.counters.get("heartbeats_received", 0)
        values["rejected_messages"] = dict(status.rejected)
        if status.etcd is not None:
            values["etcd_connected"] = status.etcd.connected
            values["etcd_registered"] = status.etcd.registered
            values["etcd_fencing"] = {
                result: status.counters.get(f"fencing_{result}", 0)
                for result in ("passed", "refused", "failed")
            }
    else:
        values["peers_alive"] = 0
    values["intro_points"] = intro
    # What the alerts read (deploy/prometheus/): the descriptor's age per period, and which
    # peers and plain backends are up; the same facts as the status document's.
    values["last_publish_time"] = {
        period: when for period, when in s.publish.state.last_success.items()
    }
    values["peers_up"] = _peers_up(s.cluster)
    if s.backends is not None:
        values["backends_up"] = _backends_up(s.backends)
    if s.proxy is not None:
        values.update(proxy_snapshot(s.proxy))
    if s.target is not None:
        values["target_up"] = s.target.healthy
    distinct = s.publish.distinct
    if distinct is not None:
        values["distinct_descriptors"] = {
            label: period.descriptors for label, period in distinct.periods.items()
        }
        values["expected_node_share"] = {
            label: {
                "min": min(period.expected_shares.values(), default=0.0),
                "max": max(period.expected_shares.values(), default=0.0),
            }
            for label, period in distinct.periods.items()
        }
    return values


def _peers_up(cluster: ClusterSnapshot | None) -> dict[str, bool]:
    """Peer id -> live, at most :data:`~rustbalance.node.metrics.MAX_PEERS`: the silent peers
    first, because ``RustBalancePeerMissing`` alerts on them (a live peer left out alerts
    nothing)."""
    peers = _peers(cluster)
    peers.sort(key=lambda p: bool(p["alive"]))  # stable: by id among the silent, the live
    return {p["node_id"]: p["alive"] for p in peers[:MAX_PEERS]}


def _backends_up(backends: tuple[BackendSnapshot, ...]) -> dict[str, bool]:
    """``<56>.onion`` -> merged, at most :data:`~rustbalance.node.metrics.MAX_BACKENDS`, the
    ones that dropped out first (``RustBalanceBackendDown`` alerts on them)."""
    ordered = sorted(backends, key=lambda b: b.down_reason is None)
    return {f"{b.address}.onion": b.down_reason is None for b in ordered[:MAX_BACKENDS]}
