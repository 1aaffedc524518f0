"""PNG charts of the benchmark results (``benchmarks/results.json``), shown in BENCHMARKS.md.

``render(results, out_dir)`` draws each chart whose data is in ``results`` and returns what it
drew, in order; ``markdown(charts, relative_to)`` is the BENCHMARKS.md section that shows them.
Charts are drawn from the JSON only (``python -m benchmarks.charts`` redraws them from the
committed file without running a benchmark). matplotlib (dev extra) with the Agg backend: no
display needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from benchmarks import results as results_file

CHARTS_DIR = Path(__file__).resolve().parent / "charts"
HEADING = "## Charts"
_DPI = 110
# One colour per system, the same in every chart.
_COLOURS = {
    "direct": "#9e9e9e",
    "HAProxy": "#e07b39",
    "RustBalance": "#2b6cb0",
    "Onionbalance": "#7b4ea3",
}
_OB = "Onionbalance"


@dataclass(frozen=True)
class Chart:
    file: str
    title: str
    caption: str


def _family(name: str) -> str:
    """'HAProxy (tcp)' -> 'HAProxy'; 'Onionbalance 0.2.4 (2 backends)' -> 'Onionbalance'."""
    for family in _COLOURS:
        if name.startswith(family):
            return family
    return name


def _bars(ax: Axes, groups: list[str], series: Mapping[str, list[float | None]], unit: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v or 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name, color=_COLOURS.get(name))
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                text = f"{value:.2f}" if value < 10 else f"{value:.0f}"
                ax.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _by_family(
    groups: list[str], group_rows: Callable[[str], Mapping[str, Any]], key: str
) -> dict[str, list[float | None]]:
    """One value list per system family ('direct', 'HAProxy', 'RustBalance'), one per group."""
    series: dict[str, list[float | None]] = {}
    for g, group in enumerate(groups):
        for name, values in group_rows(group).items():
            series.setdefault(_family(name), [None] * len(groups))[g] = values.get(key)
    return series


def _proxy(data: Mapping[str, Any]) -> Figure | None:
    bulk, rps = data.get("proxy_bulk", {}), data.get("proxy_rps", {})
    if not bulk and not rps:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[2, 1])
    if bulk:
        groups = sorted(bulk, key=lambda g: (g.split("/")[0] != "tcp", g))
        series = _by_family(groups, lambda g: bulk[g]["paths"], "gib_per_s")
        _bars(left, [g.replace("/", ", ") for g in groups], series, "GiB/s")
        left.set_title("Bulk download, one connection (mode, source)")
        left.legend(fontsize=8)
    if rps:
        groups = sorted(rps, key=lambda g: g != "tcp")
        series = _by_family(groups, lambda g: rps[g]["paths"], "rps")
        _bars(right, groups, series, "requests/s")
        right.set_title("HTTP keep-alive, 16 connections")
    fig.suptitle("Reverse proxy throughput: RustBalance vs HAProxy vs direct (higher is better)")
    return fig


def _memory(data: Mapping[str, Any]) -> Figure | None:
    memory = data.get("memory_idle", {})
    rows = memory.get("rows", [])
    node = data.get("onion", {}).get("node_memory")
    if not rows and not node:
        return None
    goal_connections = memory.get("goal_connections", 10_000)
    names, per_kb, at_goal = [], [], []
    for row in rows:
        per = (row["rss_loaded_mb"] - row["rss_rest_mb"]) / row["connections"]
        names.append(row["process"])
        per_kb.append(per * 1024)
        at_goal.append(row["rss_rest_mb"] + per * goal_connections)
    if node:
        per = (node["rss_loaded_mb"] - node["rss_rest_mb"]) / node["connections"]
        names.append("RustBalance node (daemon)")
        per_kb.append(per * 1024)
        at_goal.append(node["rss_rest_mb"] + per * goal_connections)
    colours = [_COLOURS.get(_family(n), "#555555") for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, values, unit, title in (
        (left, per_kb, "KB", "Memory per idle connection"),
        (right, at_goal, "MB", f"RSS with {goal_connections} idle connections"),
    ):
        bars = ax.barh(names, values, color=colours)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.margins(x=0.15)
    goal_mb = memory.get("goal_mb", 200.0)
    right.axvline(goal_mb, color="#c53030", linestyle="--", linewidth=1)
    right.annotate(
        f"goal {goal_mb:.0f} MB",
        (goal_mb, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-4, -12),
        textcoords="offset points",
        ha="right",
        fontsize=8,
        color="#c53030",
    )
    right.set_yticks(range(len(names)), [""] * len(names))
    fig.suptitle("Memory of idle proxied connections (lower is better)")
    fig.tight_layout()
    return fig


# The attacks of bench_frontdoor, as short group labels.
_ATTACKS = {
    "slow": "slow headers",
    "idle": "idle connections",
    "circuit": "one circuit flooding",
}


def _frontdoor(data: Mapping[str, Any]) -> Figure | None:
    front = data.get("frontdoor", {})
    attacks: Mapping[str, Any] = front.get("attacks", {})
    through_tor: Mapping[str, Any] = front.get("through_tor", {})
    if not attacks and not through_tor:
        return None
    groups = [_ATTACKS.get(kind, kind) for kind in attacks]
    rows: list[Mapping[str, Any]] = [attacks[kind]["paths"] for kind in attacks]
    if through_tor:
        groups.append("one circuit flooding,\nthrough tor")
        rows.append(through_tor)

    def series(key: str, scale: float) -> dict[str, list[float | None]]:
        out: dict[str, list[float | None]] = {}
        for g, paths in enumerate(rows):
            for name, figures in paths.items():
                value = figures.get(key)
                out.setdefault(name, [None] * len(groups))[g] = (
                    None if value is None else value * scale
                )
        return out

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    _bars(left, groups, series("success", 100.0), "% of requests answered within 5 s")
    goal = front.get("goal")
    if goal is not None:
        left.axhline(goal * 100, color="#c53030", linestyle="--", linewidth=1)
        left.annotate(
            f"goal {goal:.0%}",
            (1.0, goal * 100),
            xycoords=("axes fraction", "data"),
            xytext=(-4, -12),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="#c53030",
        )
    left.set_ylim(0, 110)
    left.set_title("Legitimate client's success (higher is better)")
    left.legend(fontsize=8, loc="lower left")
    _bars(right, groups, series("p95_ms", 1.0), "ms")
    right.set_title("Legitimate client's p95 latency (lower is better)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    count = front.get("attack_connections")
    held = f"{count} attacking connections" if count else "an attack"
    fig.suptitle(f"The front door under attack ({held}): RustBalance vs HAProxy")
    fig.tight_layout()
    return fig


# Events of the failover timeline: key -> (label, marker).
_START_EVENTS = {
    "formed": ("every node's intro points fetched", "s"),
    "answering": ("master answers", "o"),
}
_KILL_EVENTS = {
    "backend_gone": ("kill a backend/standby: its intro points gone", "X"),
    "takeover_accepted": ("kill the publisher: new publisher's upload accepted", "D"),
    "takeover_fetched": ("kill the publisher: new descriptor fetched", "s"),
    "takeover_answering": ("kill the publisher: fresh client reaches the master", "o"),
}
_EVENT_COLOURS = ["#2f855a", "#2b6cb0", "#d69e2e", "#c53030"]


def _timeline_panel(
    ax: Axes,
    systems: Mapping[str, Mapping[str, float | None]],
    bounds: Mapping[str, float],
    events: Mapping[str, tuple[str, str]],
    title: str,
) -> float:
    """One lane per system, one sub-lane per event (a line from 0 to the event, its marker
    and its time); a bound that was hit is an arrow to the bound. Returns the largest x."""
    names = list(systems)
    lanes = len(events)
    largest = 0.0
    drawn: set[str] = set()
    for y, name in enumerate(names):
        figures = systems[name]
        if not any(key in figures for key in events):
            ax.annotate(
                "n/a",
                (0, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="#777777",
            )
            continue
        for k, (key, (label, marker)) in enumerate(events.items()):
            if key not in figures:
                continue
            lane = y + (k - (lanes - 1) / 2) * (0.7 / max(1, lanes))
            colour = _EVENT_COLOURS[k % len(_EVENT_COLOURS)]
            value = figures[key]
            if value is None:  # the bound was hit
                bound = bounds.get(key, 0.0)
                ax.annotate(
                    "",
                    (bound, lane),
                    xytext=(0, lane),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5},
                )
                ax.annotate(
                    f"> {bound:.0f} s (bound hit)",
                    (bound, lane),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
                largest = max(largest, bound)
                continue
            ax.hlines(lane, 0, value, color=colour, linewidth=1.2, alpha=0.5)
            ax.plot(
                [value],
                [lane],
                marker=marker,
                color=colour,
                markersize=7,
                linestyle="none",
                label=None if key in drawn else label,
            )
            drawn.add(key)
            ax.annotate(
                f"{value:.1f} s",
                (value, lane),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
            largest = max(largest, value)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10)
    if drawn:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return largest


def _failover(data: Mapping[str, Any]) -> Figure | None:
    onion = data.get("onion", {})
    systems: Mapping[str, Mapping[str, float | None]] = onion.get("systems", {})
    if not systems:
        return None
    bounds = onion.get("bounds", {})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 2.4 + 1.6 * len(systems)))
    issue_bound = onion.get("issue_bound_secs")
    for ax, events, title, floor in (
        (top, _START_EVENTS, "From start", 0.0),
        (bottom, _KILL_EVENTS, "After a SIGKILL", issue_bound or 0.0),
    ):
        largest = _timeline_panel(ax, systems, bounds, events, title)
        # Room on the right for the last label.
        ax.set_xlim(0, max(largest, floor) * 1.25 + 1.0)
    if issue_bound:
        bottom.axvline(issue_bound, color="#c53030", linestyle="--", linewidth=1)
        bottom.annotate(
            f"bound {issue_bound:.0f} s",
            (issue_bound, 0),
            xytext=(3, -10),
            textcoords="offset points",
            fontsize=7,
            color="#c53030",
        )
    fig.suptitle(
        "Private Tor network: failover timelines, RustBalance vs Onionbalance (earlier is better)"
    )
    fig.tight_layout()
    return fig


# Availability timeline: outcome colours (fresh circuit / keep-alive) and boundary marks.
_OUTCOME_COLOURS = ("#2f855a", "#c53030", "#90cdf4", "#dd6b20")
_OUTCOME_LABELS = ("fresh circuit ok", "fresh circuit failed", "keep-alive ok", "keep-alive failed")
_MARK_STYLES = {
    "rotation": ("#6b46c1", "--"),
    "period": ("#2b6cb0", ":"),
    "fault": ("#000000", "-"),
}
_MARK_LABELS = {"rotation": "descriptor rotation", "period": "period change", "fault": "fault"}


def _availability(data: Mapping[str, Any]) -> Figure | None:
    section = data.get("availability", {})
    scenarios: Mapping[str, Mapping[str, Any]] = section.get("scenarios", {})
    if not scenarios:
        return None
    width = float(section.get("bucket_secs", 2.0))
    fig, axes = plt.subplots(
        len(scenarios), 1, figsize=(13, 1.0 + 2.3 * len(scenarios)), squeeze=False
    )
    for ax, (name, run) in zip(axes[:, 0], scenarios.items(), strict=True):
        buckets = run.get("buckets", [])
        starts = [b[0] for b in buckets]
        bottom = [0.0] * len(buckets)
        for column, (colour, label) in enumerate(
            zip(_OUTCOME_COLOURS, _OUTCOME_LABELS, strict=True), start=1
        ):
            heights = [b[column] / width for b in buckets]
            ax.bar(starts, heights, width, bottom=bottom, align="edge", color=colour, label=label)
            bottom = [a + b for a, b in zip(bottom, heights, strict=True)]
        for gap in run.get("fresh", {}).get("gaps", []):
            start, length = gap["start_secs"], gap["length_secs"]
            ax.axvspan(start, start + max(length, width), color="#c53030", alpha=0.12, lw=0)
        top = max(bottom, default=1.0) * 1.35 or 1.0
        seen: set[str] = set()
        for mark in run.get("marks", []):
            colour, style = _MARK_STYLES.get(mark["kind"], ("#555555", "-"))
            label = _MARK_LABELS.get(mark["kind"], mark["kind"])
            ax.axvline(
                mark["at"],
                color=colour,
                linestyle=style,
                lw=1.2,
                label=None if label in seen else label,
            )
            seen.add(label)
            if mark["kind"] == "fault":
                ax.annotate(
                    mark["label"],
                    (mark["at"], top * 0.97),
                    fontsize=7,
                    ha="left",
                    va="top",
                    xytext=(2, 0),
                    textcoords="offset points",
                )
        fresh = run.get("fresh", {})
        ax.set_title(
            f"{run.get('label', name)}: success {run.get('success_rate', 0):.1%}, longest gap "
            f"{fresh.get('longest_gap_secs')} s (fresh circuits), "
            f"{run.get('keepalive', {}).get('longest_gap_secs')} s (keep-alive)",
            fontsize=9,
        )
        ax.set_ylim(0, top)
        ax.set_xlim(0, run.get("duration_secs") or (starts[-1] + width if starts else 1.0))
        ax.set_ylabel("requests/s")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0, 0].legend(
        fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0.0, 1.45), frameon=False
    )
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.suptitle(
        "Private Tor network, 10 s voting: the master address under load through descriptor\n"
        "rotations, period changes and a killed node (red: failed requests; shaded: gaps)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


_MODE_COLOURS = {"auto": _COLOURS["RustBalance"], "off": "#9e9e9e"}


def _distinct(data: Mapping[str, Any]) -> Figure | None:
    """One panel per cluster size: every node's share of the fresh clients' requests, sorted,
    with distinct descriptors on ("auto") and off, the expected shares and the fair 1/N."""
    rows: list[Mapping[str, Any]] = data.get("distinct", {}).get("rows", [])
    if not rows:
        return None
    sizes = sorted({row["nodes"] for row in rows})
    width = max(11.0, 4.2 * len(sizes) + 1)
    fig, axes = plt.subplots(1, len(sizes), figsize=(width, 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for row in (r for r in rows if r["nodes"] == size):
            answered = max(row["answered"], 1)
            observed = sorted((100 * c / answered for c in row["counts"].values()), reverse=True)
            expected = sorted((100 * p for p in row["expected"].values()), reverse=True)
            ranks = range(1, len(observed) + 1)
            colour = _MODE_COLOURS.get(row["mode"], "#555555")
            label = "distinct on (auto)" if row["mode"] == "auto" else f"distinct {row['mode']}"
            ax.plot(ranks, observed, marker="o", markersize=4, color=colour, label=label)
            ax.plot(ranks, expected, linestyle=":", color=colour, label=f"{label}: expected")
        ax.axhline(100 / size, color="#c53030", linestyle="--", linewidth=1, label="fair 1/N")
        ax.set_title(f"{size} nodes")
        ax.set_xlabel("node (by share)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share of requests %")
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fresh clients per node, distinct descriptors on vs off (flatter is fairer)")
    fig.tight_layout()
    return fig


_CHARTS: tuple[tuple[Chart, Callable[[Mapping[str, Any]], Figure | None]], ...] = (
    (
        Chart(
            "proxy_throughput.png",
            "Proxy throughput",
            "Bulk download and keep-alive requests through RustBalance, HAProxy and direct "
            "(same run).",
        ),
        _proxy,
    ),
    (
        Chart(
            "frontdoor_under_attack.png",
            "Front door under attack",
            "A legitimate client's success rate and p95 latency while slow-header, idle and "
            "flooding connections are held against each proxy (same run).",
        ),
        _frontdoor,
    ),
    (
        Chart(
            "memory_per_connection.png",
            "Memory per connection",
            "RSS cost of idle proxied connections, RustBalance vs HAProxy, and one whole node.",
        ),
        _memory,
    ),
    (
        Chart(
            "failover_timeline.png",
            "Failover timelines",
            "Seconds from start and from a SIGKILL until each event, on the private Tor "
            "network; an arrow is a bound that was hit.",
        ),
        _failover,
    ),
    (
        Chart(
            "availability_timeline.png",
            "Availability timeline",
            "Requests per second through real Tor clients by outcome, per scenario of "
            "benchmarks/bench_availability.py; lines mark tor's descriptor rotations, period "
            "changes and the killed node.",
        ),
        _availability,
    ),
    (
        Chart(
            "distinct_shares.png",
            "Requests per node",
            "Each node's share of fresh clients' requests on the private Tor network, sorted, "
            "with distinct descriptors per HSDir on and off; dotted: the shares expected from "
            "what the HSDirs served.",
        ),
        _distinct,
    ),
)


def render(data: Mapping[str, Any], out_dir: Path = CHARTS_DIR) -> list[Chart]:
    """Draw every chart ``data`` has results for into ``out_dir``; returns those drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for chart, draw in _CHARTS:
        figure = draw(data)
        if figure is None:
            continue
        try:
            figure.savefig(out_dir / chart.file, dpi=_DPI, metadata={"Software": None})
        finally:
            plt.close(figure)
        drawn.append(chart)
    return drawn


def markdown(
    charts: list[Chart],
    out_dir: Path,
    relative_to: Path,
    provenance: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``## Charts`` section of BENCHMARKS.md (image paths relative to ``relative_to``);
    ``provenance`` notes where a results section came from when not from its own run."""
    lines = [HEADING, "", "Drawn from `benchmarks/results.json` by `benchmarks/charts.py`.", ""]
    for section, note in sorted((provenance or {}).items()):
        lines += [f"- `{section}`: {note}."]
    if provenance:
        lines.append("")
    for chart in charts:
        path = os.path.relpath(out_dir / chart.file, relative_to)
        lines += [f"![{chart.title}]({path})", "", f"_{chart.caption}_", ""]
    return lines


if __name__ == "__main__":
    for drawn in render(results_file.load()):
        print(CHARTS_DIR / drawn.file)
