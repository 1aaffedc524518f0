"""node/snapshot.py: one typed snapshot rendered as the status document and as /metrics."""

from __future__ import annotations

import dataclasses
import json

from rustbalance.node.coordination import ClusterStatus, EtcdLink
from rustbalance.node.metrics import NodeMetrics
from rustbalance.node.publish_policy import HsDirResult, PeriodResult, PublishOutcome, PublishState
from rustbalance.node.snapshot import (
    BackendSnapshot,
    ClusterSnapshot,
    IntroSnapshot,
    NodeSnapshot,
    PublishSnapshot,
    TargetSnapshot,
    TorSnapshot,
    metrics_values,
    status_document,
)
from rustbalance.proxy.session import ProxyStats

MASTER = "a" * 56 + ".onion"
ALWAYS = {
    "node_id",
    "mode",
    "role",
    "master_onion_address",
    "tor",
    "intro_points",
    "last_publish",
    "peers",
    "proxy",
    "generated_at",
    "ready",
    "uptime_secs",
}


def single() -> NodeSnapshot:
    return NodeSnapshot(
        node_id="node-a",
        master_onion_address=MASTER,
        multi=False,
        publisher=True,
        ready=False,
        uptime_secs=1.5,
        generated_at=1_700_000_000.0,
        tor=TorSnapshot("managed", running=False),
    )


def full() -> NodeSnapshot:
    state = PublishState()
    outcome: PublishOutcome = {
        "current": PeriodResult(True, None, (HsDirResult("$AA~r1", True),)),
        "next": PeriodResult(False, "551 Unable to upload"),
    }
    state.record(outcome, 1_700_000_000.0)
    return NodeSnapshot(
        node_id="node-a",
        master_onion_address=MASTER,
        multi=True,
        publisher=False,
        ready=True,
        uptime_secs=99.0,
        generated_at=1_700_000_030.0,
        tor=TorSnapshot("system", running=True, restarts=2, restart_failures=1),
        intro=IntroSnapshot((b"\x01" * 32, b"\x02" * 32), (b"\x03" * 32,) * 5),
        publish=PublishSnapshot(
            state=state,
            descriptor_age=30.0,
            periods={"current": {"ok": 4, "failed": 0}, "next": {"ok": 3, "failed": 1}},
            hsdir_uploads={"ok": 20, "failed": 2},
            hsdir_last_upload={"AA": True, "BB": False},
        ),
        instance_onion_address="i" * 56 + ".onion",
        cluster=ClusterSnapshot(
            ClusterStatus(
                term=7,
                election_role="standby",
                publisher="node-b",
                counters={"heartbeats_sent": 11, "heartbeats_received": 9, "role_changes": 1},
                rejected={"future": 2},
                peer_intro_points={"node-b": 3, "node-c": 2},
                live_peers=("node-c", "node-b"),
                known_peers=("node-b", "node-c", "node-d"),
                members=({"node_id": "node-b", "fingerprint": "SHA256:x", "live": True},),
            ),
            native_publishing=False,
        ),
        proxy=ProxyStats(active=1, total=7, bytes_up=10, bytes_down=20, idle_timeouts=1),
        target=TargetSnapshot(True, 4, 0, "200 OK in 0.01 s"),
        backends=(
            BackendSnapshot("b" * 56, None, (b"\x04" * 32,)),
            BackendSnapshot("c" * 56, "2 failed reachability checks", ()),
        ),
        mesh={"joins_enabled": True, "peers": ["node-b"]},
    )


def test_a_single_node_has_exactly_the_keys_always_present() -> None:
    doc = status_document(single())
    assert set(doc) == ALWAYS
    assert (doc["mode"], doc["role"]) == ("single", "publisher")
    assert doc["tor"] == {"running": False, "restarts": 0, "restart_failures": 0, "mode": "managed"}
    assert doc["intro_points"] == {
        "own": 0,
        "published": 0,
        "own_auth_keys": [],
        "published_auth_keys": [],
    }
    assert doc["last_publish"] == {
        "current": None,
        "next": None,
        "last_attempt": None,
        "consecutive_failures": 0,
        "results": {},
    }
    assert (doc["peers"], doc["proxy"]) == ([], {})
    json.dumps(doc, allow_nan=False)


def test_every_optional_part_renders() -> None:
    doc = status_document(full())
    assert set(doc) == ALWAYS | {"cluster", "target", "instance_onion_address", "backends", "mesh"}
    assert (doc["mode"], doc["role"]) == ("multi", "standby")
    assert doc["intro_points"]["own"] == 2
    assert doc["intro_points"]["published"] == 5
    assert doc["intro_points"]["own_auth_keys"] == ["01" * 32, "02" * 32]
    assert doc["peers"] == [
        {"node_id": "node-b", "alive": True},
        {"node_id": "node-c", "alive": True},
        {"node_id": "node-d", "alive": False},
    ]
    assert doc["cluster"] == {
        "backend": "embedded",
        "term": 7,
        "election_role": "standby",
        "publisher": "node-b",
        "native_publishing": False,
        "counters": {"heartbeats_sent": 11, "heartbeats_received": 9, "role_changes": 1},
        "rejected": {"future": 2},
        "peer_intro_points": {"node-b": 3, "node-c": 2},
        "revoked": False,
        "members": [{"node_id": "node-b", "fingerprint": "SHA256:x", "live": True}],
    }
    assert doc["target"] == {
        "healthy": True,
        "probes": 4,
        "consecutive_failures": 0,
        "last_probe": "200 OK in 0.01 s",
    }
    assert doc["backends"] == {
        f"{'b' * 56}.onion": {
            "up": True,
            "reason": None,
            "intro_points": 1,
            "auth_keys": ["04" * 32],
        },
        f"{'c' * 56}.onion": {
            "up": False,
            "reason": "2 failed reachability checks",
            "intro_points": 0,
            "auth_keys": [],
        },
    }
    assert doc["proxy"]["total"] == 7 and doc["proxy"]["idle_timeouts"] == 1
    assert doc["last_publish"]["results"]["next"]["error"] == "551 Unable to upload"
    json.dumps(doc, allow_nan=False)


def etcd() -> NodeSnapshot:
    """A standby of the etcd backend, cut off from etcd (issue 20)."""
    base = full()
    assert base.cluster is not None
    status = dataclasses.replace(
        base.cluster.status,
        term=1042,
        rejected={"bad_record": 1},
        counters={
            "keepalives": 30,
            "fencing_passed": 5,
            "fencing_refused": 2,
            "fencing_failed": 1,
            "role_changes": 3,
        },
        backend="etcd",
        etcd=EtcdLink(
            "127.0.0.1:2379",
            connected=False,
            registered=False,
            last_error="keep-alive: unavailable",
        ),
        # As EtcdCoordination reports them: etcd knows nodes by their TLS certificates.
        revoked=False,
        members=(),
    )
    return dataclasses.replace(base, cluster=ClusterSnapshot(status, native_publishing=False))


def test_the_etcd_backend_reports_like_the_embedded_one_plus_its_link() -> None:
    doc = status_document(etcd())
    assert doc["cluster"] == {
        "backend": "etcd",
        "term": 1042,
        "election_role": "standby",
        "publisher": "node-b",
        "native_publishing": False,
        "counters": {
            "keepalives": 30,
            "fencing_passed": 5,
            "fencing_refused": 2,
            "fencing_failed": 1,
            "role_changes": 3,
        },
        "rejected": {"bad_record": 1},
        "peer_intro_points": {"node-b": 3, "node-c": 2},
        "revoked": False,
        "members": [],
        "etcd": {
            "endpoint": "127.0.0.1:2379",
            "connected": False,
            "registered": False,
            "last_error": "keep-alive: unavailable",
        },
    }
    assert doc["peers"] == status_document(full())["peers"]
    values = metrics_values(etcd())
    assert values["etcd_connected"] is False
    assert values["etcd_registered"] is False
    assert values["etcd_fencing"] == {"passed": 5, "refused": 2, "failed": 1}
    assert values["peers_alive"] == 2
    assert values["rejected_messages"] == {"bad_record": 1}
    # The embedded backend exports no etcd metrics.
    assert "etcd_connected" not in metrics_values(full())
    metrics = NodeMetrics()
    metrics.update(values)
    text = metrics.render().decode()
    for line in (
        "rustbalance_etcd_connected 0.0",
        "rustbalance_etcd_registered 0.0",
        'rustbalance_etcd_fencing_total{result="passed"} 5.0',
        'rustbalance_etcd_fencing_total{result="refused"} 2.0',
        'rustbalance_etcd_fencing_total{result="failed"} 1.0',
        "rustbalance_peers_alive 2.0",
        "rustbalance_is_publisher 0.0",
    ):
        assert line in text, line


def test_status_and_metrics_agree() -> None:
    for snap in (single(), full(), etcd()):
        doc = status_document(snap)
        values = metrics_values(snap)
        assert values["is_publisher"] == (doc["role"] == "publisher")
        assert values["tor_up"] == doc["tor"]["running"]
        assert values["tor_restarts"] == doc["tor"]["restarts"]
        assert values["intro_points"]["own"] == doc["intro_points"]["own"]
        assert values["intro_points"]["merged"] == doc["intro_points"]["published"]
        assert values["peers_alive"] == sum(p["alive"] for p in doc["peers"])
        if "cluster" in doc:
            assert values["intro_points"]["peers"] == sum(
                doc["cluster"]["peer_intro_points"].values()
            )
            assert values["rejected_messages"] == doc["cluster"]["rejected"]
        if "etcd" in doc.get("cluster", {}):
            assert values["etcd_connected"] == doc["cluster"]["etcd"]["connected"]
        if "target" in doc:
            assert values["target_up"] == doc["target"]["healthy"]
        if doc["proxy"]:
            assert values["proxy_connections_total"] == doc["proxy"]["total"]


def test_metrics_accept_the_snapshot_and_keep_their_names() -> None:
    metrics = NodeMetrics()
    metrics.update(metrics_values(full()))
    text = metrics.render().decode()
    for line in (
        'rustbalance_publishes_total{period="next",result="failed"} 1.0',
        'rustbalance_hsdir_uploads_total{result="ok"} 20.0',
        'rustbalance_hsdir_last_upload_ok{hsdir="BB"} 0.0',
        "rustbalance_descriptor_age_seconds 30.0",
        "rustbalance_is_publisher 0.0",
        "rustbalance_peers_alive 2.0",
        "rustbalance_heartbeats_sent_total 11.0",
        "rustbalance_heartbeats_received_total 9.0",
        'rustbalance_rejected_messages_total{reason="future"} 2.0',
        'rustbalance_intro_points{source="peers"} 5.0',
        "rustbalance_tor_up 1.0",
        "rustbalance_tor_restarts_total 2.0",
        "rustbalance_proxy_connections_active 1.0",
        'rustbalance_proxy_bytes_total{direction="down"} 20.0',
        'rustbalance_proxy_timeouts_total{kind="idle"} 1.0',
        "rustbalance_target_up 1.0",
    ):
        assert line in text, line
    single_metrics = NodeMetrics()
    single_metrics.update(metrics_values(single()))
    text = single_metrics.render().decode()
    assert "rustbalance_peers_alive 0.0" in text
    assert "rustbalance_descriptor_age_seconds" not in text  # never published
    assert "rustbalance_target_up" not in text


def test_a_wall_clock_that_stepped_back_never_gives_a_negative_age() -> None:
    snap = single()
    stepped = dataclasses.replace(snap, publish=PublishSnapshot(descriptor_age=-3.0))
    assert metrics_values(stepped)["descriptor_age_seconds"] == 0.0


# --- issue 18: the three metrics the alerts read are fed from the snapshot -------------------


def test_metrics_carry_last_publish_time_peers_and_backends() -> None:
    """``RustBalanceDescriptorStale`` reads ``rustbalance_last_publish_timestamp_seconds``:
    without it fed every real node alerts. The per-peer and per-backend flags come from the
    same snapshot as ``status``."""
    values = metrics_values(full())
    assert values["last_publish_time"] == {"current": 1_700_000_000.0}  # "next" failed
    assert values["peers_up"] == {"node-b": True, "node-c": True, "node-d": False}
    assert values["backends_up"] == {f"{'b' * 56}.onion": True, f"{'c' * 56}.onion": False}
    doc = status_document(full())
    assert values["last_publish_time"]["current"] == doc["last_publish"]["current"]
    assert values["peers_up"] == {p["node_id"]: p["alive"] for p in doc["peers"]}
    assert values["backends_up"] == {a: b["up"] for a, b in doc["backends"].items()}
    metrics = NodeMetrics()
    metrics.update(values)
    text = metrics.render().decode()
    for line in (
        'rustbalance_last_publish_timestamp_seconds{period="current"} 1.7e+09',
        'rustbalance_last_publish_timestamp_seconds{period="next"} 0.0',
        'rustbalance_peer_up{peer="node-d"} 0.0',
        'rustbalance_peer_up{peer="node-b"} 1.0',
        f'rustbalance_backend_up{{backend="{"c" * 56}.onion"}} 0.0',
        f'rustbalance_backend_up{{backend="{"b" * 56}.onion"}} 1.0',
    ):
        assert line in text, line


def test_a_single_node_without_a_publish_feeds_empty_maps() -> None:
    values = metrics_values(single())
    assert values["last_publish_time"] == {}
    assert values["peers_up"] == {}
    assert "backends_up" not in values  # no [master] backends: no rustbalance_backend_up


def test_peer_and_backend_flags_stay_within_the_metrics_limits() -> None:
    snap = full()
    assert snap.cluster is not None
    many = tuple(f"node-{i:03d}" for i in range(300))
    status = dataclasses.replace(snap.cluster.status, known_peers=many, live_peers=many[2:])
    backends = tuple(BackendSnapshot(f"{i:056d}", None, ()) for i in range(70))
    backends += (BackendSnapshot("d" * 56, "descriptor expired", ()),)
    crowded = dataclasses.replace(
        snap, cluster=dataclasses.replace(snap.cluster, status=status), backends=backends
    )
    values = metrics_values(crowded)
    assert len(values["peers_up"]) == 256
    assert len(values["backends_up"]) == 64
    # The silent peers and the dropped backend, which the alerts fire on, are never left out.
    assert values["peers_up"]["node-000"] is False and values["peers_up"]["node-001"] is False
    assert values["backends_up"][f"{'d' * 56}.onion"] is False
    NodeMetrics().update(values)
