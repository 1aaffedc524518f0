"""Metrics: snapshot -> private registry -> /metrics served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from rustbalance.config import parse_config
from rustbalance.crypto.keys import IdentityKey
from rustbalance.node.clock import SYSTEM_CLOCK
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.metrics import (
    MetricsError,
    MetricsServer,
    NodeMetrics,
    proxy_snapshot,
    start_metrics_server,
)
from rustbalance.node.runtime import NodeRuntime
from rustbalance.proxy import ProxyStats

SNAPSHOT = {
    "publishes": {"current": {"ok": 4, "failed": 1}, "next": {"ok": 3, "failed": 0}},
    "hsdir_uploads": {"ok": 30, "failed": 2},
    "hsdir_last_upload": {"AAAA1111": True, "BBBB2222": False},
    "descriptor_age_seconds": 42.5,
    "is_publisher": True,
    "peers_alive": 2,
    "heartbeats_sent": 100,
    "heartbeats_received": 180,
    "rejected_messages": {"bad_mac": 3, "stale": 1},
    "intro_points": {"own": 3, "peers": 6, "merged": 9},
    "tor_up": True,
    "tor_restarts": 1,
    "target_up": False,
}


async def _get(port: int, raw: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def _sample(text: str, line_start: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    assert len(lines) == 1, (line_start, lines)
    return float(lines[0].rsplit(" ", 1)[1])


async def test_metrics_endpoint_serves_the_snapshot() -> None:
    metrics = NodeMetrics()
    stats = ProxyStats(active=2, total=50, bytes_up=1000, bytes_down=9000, connect_timeouts=1)
    metrics.update({**SNAPSHOT, **proxy_snapshot(stats)})
    async with MetricsServer(metrics, "127.0.0.1", 0) as server:
        status, text = await _get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        expected = {
            'rustbalance_publishes_total{period="current",result="ok"}': 4,
            'rustbalance_publishes_total{period="current",result="failed"}': 1,
            'rustbalance_publishes_total{period="next",result="ok"}': 3,
            'rustbalance_hsdir_uploads_total{result="failed"}': 2,
            'rustbalance_hsdir_last_upload_ok{hsdir="BBBB2222"}': 0,
            "rustbalance_descriptor_age_seconds": 42.5,
            "rustbalance_is_publisher": 1,
            "rustbalance_peers_alive": 2,
            "rustbalance_heartbeats_sent_total": 100,
            "rustbalance_heartbeats_received_total": 180,
            'rustbalance_rejected_messages_total{reason="bad_mac"}': 3,
            'rustbalance_intro_points{source="merged"}': 9,
            "rustbalance_tor_up": 1,
            "rustbalance_tor_restarts_total": 1,
            "rustbalance_proxy_connections_active": 2,
            "rustbalance_proxy_connections_total": 50,
            'rustbalance_proxy_bytes_total{direction="down"}': 9000,
            'rustbalance_proxy_timeouts_total{kind="connect"}': 1,
            "rustbalance_target_up": 0,
        }
        for name, value in expected.items():
            assert _sample(text, name) == value, name
        # A partial update changes only what it names.
        metrics.update({"is_publisher": False, "peers_alive": 3})
        _, text = await _get(server.port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _sample(text, "rustbalance_is_publisher") == 0
        assert _sample(text, "rustbalance_peers_alive") == 3
        assert _sample(text, "rustbalance_tor_up") == 1
        assert (await _get(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 404
        assert (await _get(server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 405
        status, body = await _get(server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == ""
        assert (await _get(server.port, b"NONSENSE\r\n\r\n"))[0] == 400
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await _get(server.port, huge))[0] in (400, 431)
    # The private registry leaves prometheus-client's global one alone.
    assert REGISTRY.get_sample_value("rustbalance_peers_alive") is None


async def test_the_front_door_counters_are_exported() -> None:
    """Issue 15: cut circuits, refusals by reason, the new timeouts."""
    metrics = NodeMetrics()
    stats = ProxyStats(
        rejected=1, evicted=7, throttled=3, circuit_refused=4, circuits_cut=2, head_timeouts=5
    )
    metrics.update(proxy_snapshot(stats))
    async with MetricsServer(metrics, "127.0.0.1", 0) as server:
        _, text = await _get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _sample(text, "rustbalance_proxy_circuits_cut_total") == 2
    assert _sample(text, 'rustbalance_proxy_refused_total{reason="displaced"}') == 7
    assert _sample(text, 'rustbalance_proxy_refused_total{reason="throttled"}') == 3
    assert _sample(text, 'rustbalance_proxy_refused_total{reason="circuit_cut"}') == 4
    assert _sample(text, 'rustbalance_proxy_refused_total{reason="full"}') == 1
    assert _sample(text, 'rustbalance_proxy_timeouts_total{kind="head"}') == 5


async def test_slow_client_times_out() -> None:
    async with MetricsServer(NodeMetrics(), "127.0.0.1", 0, read_timeout=0.2) as server:
        status, _ = await _get(server.port, b"GET /metr")
        assert status == 408


async def test_off_switch_and_default_listen() -> None:
    assert (
        await start_metrics_server(NodeMetrics(), enabled=False, host="127.0.0.1", port=0) is None
    )
    server = await start_metrics_server(NodeMetrics(), enabled=True, host="127.0.0.1", port=0)
    assert server is not None
    try:
        status, text = await _get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        # Nothing from a snapshot yet: only what is always there (test_monitoring.py).
        assert status == 200 and "rustbalance_tor_up" not in text
        assert "rustbalance_is_publisher" not in text and "rustbalance_build_info" in text
    finally:
        await server.close()
    assert MetricsServer(NodeMetrics()).host == "127.0.0.1"
    # The endpoint's own default is the config's (one place: config/schema.py).
    default = parse_config(
        '[node]\nid = "a"\n[master]\nidentity_key_path = "k"\n[target]\naddress = "h:1"\n',
        "/",
    ).metrics.listen
    assert MetricsServer(NodeMetrics()).port == default.port


@pytest.mark.parametrize(
    "bad",
    [
        {"peers_alive": -1},
        {"peers_alive": True},
        {"is_publisher": 1},
        {"descriptor_age_seconds": float("nan")},
        {"publishes": {"current": {"maybe": 1}}},
        {"rejected_messages": {"bad reason!": 1}},
        {"hsdir_last_upload": {f"h{i}": True for i in range(65)}},
        {"no_such_metric": 1},
    ],
)
def test_bad_snapshots_are_refused_and_change_nothing(bad: dict[str, object]) -> None:
    metrics = NodeMetrics()
    metrics.update({"peers_alive": 5})
    with pytest.raises(MetricsError):
        metrics.update({"tor_up": True, **bad})
    text = metrics.render().decode()
    assert "rustbalance_peers_alive 5.0" in text and "rustbalance_tor_up" not in text


# --- issue 17: a taken metrics port is not a failed start ------------------------------------


async def test_a_taken_metrics_port_is_a_warning_and_metrics_are_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under ``Restart=always`` a start-up failure over a port another program holds (two
    nodes on one host, an exporter on the same port) loops; the node serves without
    ``/metrics`` instead and says so at WARNING, naming the key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(
            '[node]\nid = "node-a"\n[master]\nidentity_key_path = "k"\n'
            '[target]\naddress = "127.0.0.1:8000"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
            tmp_path,
        )
        key = IdentityKey.generate(secrets.token_bytes)
        identity = NodeIdentity("shared", key.onion_address, key, key)
        runtime = NodeRuntime(config, identity, SYSTEM_CLOCK)
        with caplog.at_level(logging.WARNING):
            serving = await runtime.start_metrics(NodeMetrics())
    assert serving is False
    assert runtime.metrics_server is None
    (record,) = [r for r in caplog.records if "metrics.listen" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"127.0.0.1:{port}" in record.getMessage()
    assert "metrics are off" in record.getMessage()
