"""The availability timeline as a PNG (issue 14): where service was lost, at a glance.

x: seconds since the start of the run. Top panel: every request at its start time, its time to
first byte on the y axis (a failure is drawn at the time it took to fail), coloured by outcome
and kind; gaps shaded. Bottom strip: the success ratio per bucket. Vertical lines mark tor's
descriptor rotations, time-period changes and injected faults.

matplotlib is a development dependency (the ``dev`` extra), imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rustbalance.testnet.availability import (
    FRESH,
    KEEPALIVE,
    Mark,
    RequestRecord,
    find_gaps,
)

__all__ = ["bucket_success", "write_timeline_png"]

_MARK_STYLE = {
    "rotation": ("tab:purple", "--"),
    "period": ("tab:blue", ":"),
    "fault": ("black", "-"),
}


def bucket_success(
    records: Sequence[RequestRecord], duration: float, bucket: float
) -> list[tuple[float, float | None]]:
    """(bucket start, success ratio of the requests that started in it, None if none)."""
    count = max(1, int(duration // bucket) + (1 if duration % bucket else 0))
    totals = [0] * count
    oks = [0] * count
    for record in records:
        index = min(count - 1, max(0, int(record.started // bucket)))
        totals[index] += 1
        oks[index] += record.ok
    return [(i * bucket, oks[i] / totals[i] if totals[i] else None) for i in range(count)]


def write_timeline_png(
    path: Path,
    records: Sequence[RequestRecord],
    marks: Sequence[Mark],
    duration: float,
    title: str,
    timeout: float,
) -> Path:
    """Draw the timeline of ``records`` into ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, strip) = plt.subplots(
        2,
        1,
        figsize=(14, 6.5),
        sharex=True,
        gridspec_kw={"height_ratios": [4, 1]},
        constrained_layout=True,
    )
    styles: dict[tuple[str, bool], dict[str, Any]] = {
        (FRESH, True): {"color": "tab:green", "marker": "o", "s": 10, "label": "fresh circuit ok"},
        (FRESH, False): {
            "color": "tab:red",
            "marker": "x",
            "s": 30,
            "label": "fresh circuit failed",
        },
        (KEEPALIVE, True): {"color": "tab:cyan", "marker": ".", "s": 8, "label": "keep-alive ok"},
        (KEEPALIVE, False): {
            "color": "tab:orange",
            "marker": "x",
            "s": 30,
            "label": "keep-alive failed",
        },
    }
    for (kind, ok), style in styles.items():
        chosen = [r for r in records if r.kind == kind and r.ok == ok]
        if not chosen:
            continue
        ys = [
            (r.ttfb if ok and r.ttfb is not None else max(0.01, r.finished - r.started))
            for r in chosen
        ]
        ax.scatter([r.started for r in chosen], ys, **style)
    for gap in find_gaps([r for r in records if r.kind == FRESH], duration):
        ax.axvspan(gap.start, gap.start + gap.length, color="tab:red", alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_ylim(0.05, max(timeout * 1.5, 1.0))
    ax.set_ylabel("time to first byte / to failure (s, log)")
    ax.set_title(title, fontsize=10)
    top = ax.get_ylim()[1]
    seen: set[str] = set()
    for mark in marks:
        color, line = _MARK_STYLE[mark.kind]
        label = {"rotation": "descriptor rotation", "period": "period change"}.get(
            mark.kind, "fault"
        )
        for axis in (ax, strip):
            axis.axvline(
                mark.at,
                color=color,
                linestyle=line,
                lw=1.4,
                label=label if axis is ax and label not in seen else None,
            )
        seen.add(label)
        ax.text(
            mark.at,
            top,
            " " + mark.label,
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=color,
        )
    ax.legend(loc="lower left", fontsize=7, ncol=4, framealpha=0.8)
    ax.grid(True, which="major", alpha=0.3)
    buckets = bucket_success(records, duration, 5.0)
    strip.bar(
        [b for b, _ in buckets],
        [1.0 if r is None else r for _, r in buckets],
        width=5.0,
        align="edge",
        color=[
            "lightgrey" if r is None else ("tab:green" if r >= 0.999 else "tab:red")
            for _, r in buckets
        ],
    )
    strip.set_ylim(0, 1.05)
    strip.set_ylabel("ok / 5 s")
    strip.set_xlabel("seconds since the load started")
    strip.set_xlim(0, duration)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
