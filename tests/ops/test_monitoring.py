"""Monitoring files and the metrics they use: deploy/prometheus/ alert rules (checked and
unit-tested with the real promtool), the Grafana dashboard, and the metrics added for them
(build info, process metrics, last successful publish time per descriptor, peer and backend
up), checked with ``promtool check metrics``."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rustbalance import __version__
from rustbalance.node.metrics import MetricsError, NodeMetrics, proxy_snapshot
from rustbalance.proxy import ProxyStats
from tests.ops.test_metrics import SNAPSHOT

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rustbalance-alerts.yml"
RULE_TESTS = PROMETHEUS / "rustbalance-alerts.test.yml"
DASHBOARD = PROMETHEUS / "grafana-dashboard.json"

NEW_KEYS: dict[str, Any] = {
    "last_publish_time": {"current": 1_700_000_000.0, "next": 1_700_000_005.5},
    "peers_up": {"node-b": True, "node-c": False},
    "backends_up": {"5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwfmxqd.onion": False},
}


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _full_render() -> str:
    metrics = NodeMetrics()
    stats = ProxyStats(active=2, total=50, bytes_up=1000, bytes_down=9000, connect_timeouts=1)
    metrics.update({**SNAPSHOT, **proxy_snapshot(stats), **NEW_KEYS})
    return metrics.render().decode()


def test_build_info_process_and_publish_times_are_there_from_the_start() -> None:
    """Before any snapshot: alerts on the publish time need no absent()."""
    samples = _samples(NodeMetrics().render().decode())
    python = platform.python_version()
    assert samples[f'rustbalance_build_info{{python="{python}",version="{__version__}"}}'] == 1
    assert samples['rustbalance_last_publish_timestamp_seconds{period="current"}'] == 0
    assert samples['rustbalance_last_publish_timestamp_seconds{period="next"}'] == 0
    assert samples["process_resident_memory_bytes"] > 1e6
    assert samples["process_open_fds"] >= 3
    assert samples["process_start_time_seconds"] > 0
    assert "process_cpu_seconds_total" in samples


def test_publish_times_peers_and_backends_are_exported() -> None:
    samples = _samples(_full_render())
    assert samples['rustbalance_last_publish_timestamp_seconds{period="current"}'] == 1.7e9
    assert samples['rustbalance_last_publish_timestamp_seconds{period="next"}'] == 1700000005.5
    assert samples['rustbalance_peer_up{peer="node-b"}'] == 1
    assert samples['rustbalance_peer_up{peer="node-c"}'] == 0
    backend = "5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwfmxqd.onion"
    assert samples[f'rustbalance_backend_up{{backend="{backend}"}}'] == 0
    # A period not reported yet stays at 0 next to one that was.
    metrics = NodeMetrics()
    metrics.update({"last_publish_time": {"current": 5.0}})
    samples = _samples(metrics.render().decode())
    assert samples['rustbalance_last_publish_timestamp_seconds{period="next"}'] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"last_publish_time": {"previous": 1.0}},
        {"last_publish_time": {"current": -1.0}},
        {"last_publish_time": {"current": float("inf")}},
        {"last_publish_time": {"current": True}},
        {"peers_up": {"node b": True}},
        {"peers_up": {"node-b": 1}},
        {"peers_up": {f"n{i}": True for i in range(257)}},
        {"backends_up": {"x.onion": "yes"}},
    ],
)
def test_bad_new_snapshot_values_are_refused(bad: dict[str, object]) -> None:
    metrics = NodeMetrics()
    with pytest.raises(MetricsError):
        metrics.update(bad)
    assert "rustbalance_peer_up" not in metrics.render().decode()


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_promtool_check_metrics_passes_on_every_metric() -> None:
    result = _promtool("check", "metrics", stdin=_full_render())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_every_alert() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the rules file is unit-tested, firing at least once.
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts and alerts <= tested, alerts - tested
    fired = re.findall(r"exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text())
    assert len(fired) >= len(alerts)


def _exported_names() -> set[str]:
    names = set()
    for line in _full_render().splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
    return names


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\b((?:rustbalance|process)_[a-z_]+)", text))


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    exported = _exported_names()
    for path in (RULES, DASHBOARD):
        missing = _referenced(path.read_text()) - exported
        assert not missing, f"{path.name} uses metrics nobody exports: {missing}"


def test_dashboard_is_importable_grafana_json() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and len(panels) >= 8
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert exprs and all(e.strip() for e in exprs)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["gridPos"]["w"] > 0 and panel["targets"], panel["title"]
    # Each thing an alert watches has a panel too.
    joined = "\n".join(exprs)
    for metric in (
        "rustbalance_is_publisher",
        "rustbalance_last_publish_timestamp_seconds",
        "rustbalance_hsdir_uploads_total",
        "rustbalance_tor_up",
        "rustbalance_target_up",
        "rustbalance_peer_up",
        "rustbalance_backend_up",
    ):
        assert metric in joined, metric
