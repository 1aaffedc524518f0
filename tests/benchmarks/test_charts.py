"""The benchmark charts are drawn from the results JSON (a small sample here), and `make
bench`'s runner writes the JSON, the PNGs and the BENCHMARKS.md section that shows them."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from benchmarks import charts, results, run

# The shape of what the benchmark modules record (figures from a real run, trimmed).
SAMPLE: dict[str, Any] = {
    "run": {"started": "2026-12-03 05:41:23 UTC", "machine": "x86_64", "python": "3.11.7",
            "cores": 2},
    "proxy_bulk": {
        "tcp/memory": {"bytes": 1 << 30, "rounds": 5, "paths": {
            "direct": {"gib_per_s": 5.79, "cpu_s_per_gib": None},
            "HAProxy (tcp)": {"gib_per_s": 1.89, "cpu_s_per_gib": 0.32},
            "RustBalance (tcp)": {"gib_per_s": 1.84, "cpu_s_per_gib": 0.27}}},
        "http/file": {"bytes": 1 << 30, "rounds": 5, "paths": {
            "direct": {"gib_per_s": 2.13, "cpu_s_per_gib": None},
            "HAProxy (http)": {"gib_per_s": 1.31, "cpu_s_per_gib": 0.71},
            "RustBalance (http)": {"gib_per_s": 1.61, "cpu_s_per_gib": 0.36}}},
    },
    "proxy_rps": {
        "tcp": {"connections": 16, "seconds": 3.0, "paths": {
            "direct": {"rps": 93716, "p50_ms": 0.17, "p99_ms": 0.24},
            "HAProxy (tcp)": {"rps": 59369, "p50_ms": 0.25, "p99_ms": 0.62},
            "RustBalance (tcp)": {"rps": 52007, "p50_ms": 0.30, "p99_ms": 0.55}}},
    },
    "frontdoor": {
        "goal": 0.99, "attack_connections": 2000,
        "attacks": {
            "slow": {"what": "2000 slow-header connections", "displaced": 65595,
                     "circuits_cut": 0, "paths": {
                "HAProxy": {"success": 0.503, "ok": 75, "failed": 74, "p50_ms": 2508.0,
                            "p95_ms": 4773.0},
                "RustBalance": {"success": 1.0, "ok": 147, "failed": 0, "p50_ms": 9.0,
                                "p95_ms": 173.0}}},
            "circuit": {"what": "one circuit flooding", "displaced": 229350,
                        "circuits_cut": 3, "paths": {
                "HAProxy": {"success": 1.0, "ok": 149, "failed": 0, "p50_ms": 16.0,
                            "p95_ms": 112.0},
                "RustBalance": {"success": 1.0, "ok": 148, "failed": 0, "p50_ms": 8.0,
                                "p95_ms": 145.0}}},
        },
        "through_tor": {
            "HAProxy": {"success": 1.0, "ok": 40, "failed": 0, "p50_ms": 94.0, "p95_ms": 167.0,
                        "attacker_streams": 8580, "circuits_cut": 0, "closed_by_tor": 0},
            "RustBalance": {"success": 1.0, "ok": 40, "failed": 0, "p50_ms": 192.0,
                            "p95_ms": None, "attacker_streams": 2216, "circuits_cut": 62,
                            "closed_by_tor": 62},
        },
    },
    "memory_idle": {
        "goal_mb": 200.0, "goal_connections": 10000,
        "rows": [
            {"process": "RustBalance (tcp)", "connections": 9900, "rss_rest_mb": 23.2,
             "rss_loaded_mb": 153.0},
            {"process": "HAProxy (tcp)", "connections": 9800, "rss_rest_mb": 15.3,
             "rss_loaded_mb": 46.9},
        ],
    },
    "onion": {
        "bounds": {"answering": 180.0, "formed": 240.0, "backend_gone": 120.0,
                   "takeover_accepted": 120.0, "takeover_fetched": 120.0,
                   "takeover_answering": 180.0},
        "issue_bound_secs": 45.0,
        "systems": {
            "Onionbalance 0.2.4 (2 backends)": {"answering": 16.4, "backend_gone": None},
            "RustBalance (1 node)": {"answering": 5.7},
            "RustBalance (3 nodes): publisher killed, then standby": {
                "answering": 14.0, "formed": 14.2, "backend_gone": 15.2,
                "takeover_accepted": 28.7, "takeover_fetched": 29.7,
                "takeover_answering": 30.0},
        },
        "node_memory": {"rss_rest_mb": 43.8, "rss_loaded_mb": 145.2, "connections": 10000,
                        "tor_rss_mb": 13.3},
    },
    "availability": {
        "bucket_secs": 2.0, "kill_at_secs": 20.0,
        "scenarios": {
            "instance": {
                "label": "instance", "duration_secs": 40.0, "success_rate": 0.995,
                "fresh": {"success_rate": 0.99, "longest_gap_secs": 0.5,
                          "gaps": [{"start_secs": 21.0, "length_secs": 0.5, "failed": 1}]},
                "keepalive": {"success_rate": 1.0, "longest_gap_secs": 0.0, "gaps": []},
                "ttfb_p50_secs": 0.4, "ttfb_p95_secs": 1.2,
                "marks": [{"at": 12.0, "kind": "rotation", "label": "rotation"},
                          {"at": 20.0, "kind": "fault", "label": "kill node-a"},
                          {"at": 32.0, "kind": "period", "label": "period 7"}],
                "buckets": [[2.0 * i, 4, 1 if i == 10 else 0, 4, 0] for i in range(20)],
            },
            "shared": {
                "label": "shared", "duration_secs": 40.0, "success_rate": 0.9,
                "fresh": {"success_rate": 0.85, "longest_gap_secs": 13.0,
                          "gaps": [{"start_secs": 12.0, "length_secs": 13.0, "failed": 26}]},
                "keepalive": {"success_rate": 0.95, "longest_gap_secs": 4.0, "gaps": []},
                "ttfb_p50_secs": 0.5, "ttfb_p95_secs": 2.0,
                "marks": [{"at": 12.0, "kind": "rotation", "label": "rotation"}],
                "buckets": [[2.0 * i, 0 if 6 <= i < 12 else 4, 4 if 6 <= i < 12 else 0, 4, 0]
                            for i in range(20)],
            },
        },
    },
    "distinct": {
        "clients": 8,
        "rows": [
            {"nodes": 3, "mode": "auto", "answered": 60,
             "counts": {"node-00": 21, "node-01": 19, "node-02": 20},
             "expected": {"node-00": 0.33, "node-01": 0.34, "node-02": 0.33}},
            {"nodes": 3, "mode": "off", "answered": 60,
             "counts": {"node-00": 40, "node-01": 20, "node-02": 0},
             "expected": {"node-00": 0.6, "node-01": 0.4, "node-02": 0.0}},
        ],
    },
}  # fmt: skip


def _image(path: Path) -> np.ndarray[Any, Any]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels: np.ndarray[Any, Any] = matplotlib.image.imread(path)
    return pixels


def test_every_chart_is_drawn_from_the_sample(tmp_path: Path) -> None:
    drawn = charts.render(SAMPLE, tmp_path)
    assert [c.file for c in drawn] == [
        "proxy_throughput.png",
        "frontdoor_under_attack.png",
        "memory_per_connection.png",
        "failover_timeline.png",
        "availability_timeline.png",
        "distinct_shares.png",
    ]
    for chart in drawn:
        pixels = _image(tmp_path / chart.file)
        height, width = pixels.shape[:2]
        assert width >= 1000 and height >= 400, chart.file
        # Not a blank canvas: bars, markers and text in colour.
        assert pixels[..., :3].std() > 0.05, chart.file
        colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2
        assert colourful.mean() > 0.002, chart.file


def test_charts_follow_the_data(tmp_path: Path) -> None:
    """Other numbers draw another picture: the chart is the data's, not a fixed image."""
    charts.render(SAMPLE, tmp_path / "a")
    changed = json.loads(json.dumps(SAMPLE))
    changed["proxy_bulk"]["tcp/memory"]["paths"]["RustBalance (tcp)"]["gib_per_s"] = 4.5
    charts.render(changed, tmp_path / "b")
    a = (tmp_path / "a" / "proxy_throughput.png").read_bytes()
    b = (tmp_path / "b" / "proxy_throughput.png").read_bytes()
    assert a != b
    # The same data draws the same bytes (no timestamp in the PNG).
    charts.render(SAMPLE, tmp_path / "c")
    assert (tmp_path / "c" / "proxy_throughput.png").read_bytes() == a


def test_the_availability_timeline_shows_failures_in_red(tmp_path: Path) -> None:
    """A scenario with a gap draws more red than one without: the picture follows the
    requests' outcomes (issue 14: where service was lost, at a glance)."""

    def red_share(name: str) -> float:
        only = {"availability": {**SAMPLE["availability"], "scenarios": {
            name: SAMPLE["availability"]["scenarios"][name]}}}  # fmt: skip
        charts.render(only, tmp_path / name)
        pixels = _image(tmp_path / name / "availability_timeline.png")
        red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
        return float(red.mean())

    assert red_share("shared") > 4 * red_share("instance") > 0


def test_missing_sections_draw_only_what_there_is(tmp_path: Path) -> None:
    assert charts.render({}, tmp_path) == []
    only_memory = {"memory_idle": SAMPLE["memory_idle"]}
    assert [c.file for c in charts.render(only_memory, tmp_path)] == ["memory_per_connection.png"]


def test_markdown_shows_each_chart(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks" / "charts"
    drawn = charts.render(SAMPLE, out)
    lines = charts.markdown(drawn, out, tmp_path)
    assert lines[0] == "## Charts"
    images = [line for line in lines if line.startswith("![")]
    assert images == [f"![{c.title}](benchmarks/charts/{c.file})" for c in drawn]
    for chart in drawn:
        assert (tmp_path / "benchmarks" / "charts" / chart.file).is_file()


def test_record_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(ValueError):
        results.record("x", "y", float("nan"))
    results.take()
    assert results.finite(float("inf")) is None and results.finite(2.0) == 2.0


def test_runner_writes_json_charts_and_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m benchmarks.run --only MODULE`` with a stand-in module that records the
    sample's memory section: results.json, the PNG and BENCHMARKS.md's ## Charts."""
    module = types.ModuleType("benchmarks.bench_standin")

    def standin_run() -> list[str]:
        for key, value in SAMPLE["memory_idle"].items():
            results.record("memory_idle", key, value)
        return ["## Stand-in", "", "a table", ""]

    module.run = standin_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_standin", module)
    monkeypatch.setattr(run, "MODULES", ("benchmarks.bench_standin",))
    monkeypatch.setattr(results, "RESULTS_FILE", tmp_path / "results.json")
    monkeypatch.setattr(results.load, "__defaults__", (tmp_path / "results.json",))
    monkeypatch.setattr(results.save, "__defaults__", (tmp_path / "results.json",))
    monkeypatch.setattr(charts, "CHARTS_DIR", tmp_path / "benchmarks" / "charts")
    monkeypatch.chdir(tmp_path)
    provenance = {"onion": "transcribed from an older run", "memory_idle": "old numbers"}
    (tmp_path / "results.json").write_text(
        json.dumps({"onion": SAMPLE["onion"], "provenance": provenance})
    )
    (tmp_path / "BENCHMARKS.md").write_text(
        "# Benchmarks\n\nintro\n\n## Other\n\nx\n\n## Charts\n\nstale chart text\n"
    )
    assert run.main(["--only", "bench_standin"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["memory_idle"] == SAMPLE["memory_idle"] and saved["onion"] == SAMPLE["onion"]
    # The re-measured section is its own run's now; the other keeps its note.
    assert saved["provenance"] == {"onion": "transcribed from an older run"}
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "- `onion`: transcribed from an older run." in text and "old numbers" not in text
    assert "stale chart text" not in text and "## Other" in text and "## Stand-in" in text
    # The pictures come right after the intro, before every table section.
    assert text.index("intro") < text.index("## Charts") < text.index("## Other")
    assert "![Memory per connection](benchmarks/charts/memory_per_connection.png)" in text
    assert "![Failover timelines](benchmarks/charts/failover_timeline.png)" in text
    assert (tmp_path / "benchmarks" / "charts" / "failover_timeline.png").is_file()
