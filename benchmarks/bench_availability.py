"""Client-visible availability over tor's descriptor rotations (issue 14): the long runs.

The same harness as tests/reliability/test_availability.py (rustbalance.testnet.availability,
availability_run), for longer: each scenario on its own private network with 10 s voting
(4-minute periods), three ``rustbalance run`` nodes with product timings, ``LOAD_SECS`` of load
(at least two descriptor rotations and two period changes), node-a (the first publisher)
SIGKILLed with its tor at ``KILL_AT_SECS``. Scenarios: the default configuration (no
``identity_mode``: ``instance`` in a cluster), ``instance`` mode with two plain tor backends
merged (``[master] backends``), and ``shared`` mode as the peer (the mode that cannot survive a
rotation with 2+ nodes, docs/architecture.md; refused in a cluster since issue 14, so its
nodes run as the release before it: testnet/previous_release.py).

Written: the figures below into BENCHMARKS.md; the figures and a compact timeline per
scenario (requests per 2 s by kind and outcome, gaps, rotations, period changes, faults) into
``benchmarks/results.json`` (section ``availability``), from which ``benchmarks/charts.py``
draws the availability timeline of BENCHMARKS.md's Charts section; and per scenario the full
``availability.json`` (every request) and ``timeline.png`` under
``test-logs/bench-availability/<scenario>/``.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.results import record
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.availability import FRESH, KEEPALIVE, RequestRecord, bucket_outcomes
from rustbalance.testnet.availability_run import Fault, Scenario, run_scenario

LOAD_SECS = 540.0
KILL_AT_SECS = 200.0
OUT = Path("test-logs") / "bench-availability"
# Width of the chart's time buckets (results.json holds counts per bucket, not every request).
BUCKET_SECS = 2.0

_KILL = (Fault("kill", "node-a", KILL_AT_SECS),)
SCENARIOS: tuple[tuple[str, Scenario], ...] = (
    # No identity_mode: the default of a cluster (instance).
    ("default", Scenario("", 0, LOAD_SECS, _KILL)),
    ("instance-backends", Scenario("instance", 2, LOAD_SECS, _KILL)),
    # The peer: shared, refused in a cluster since issue 14, run as the release before it.
    ("shared", Scenario("shared", 0, LOAD_SECS, _KILL, previous_release=True)),
)


async def _one(
    name: str, scenario: Scenario, base: Path, records: list[RequestRecord]
) -> dict[str, Any]:
    net = PrivateTorNetwork(base / f"net-{name}", n_relays=4, voting_interval=10)
    try:
        await asyncio.to_thread(net.start)
        clients = [await asyncio.to_thread(net.add_client, f"benchav{i}") for i in range(2)]
        return await run_scenario(
            net, clients, base / f"cluster-{name}", OUT / name, scenario, records=records
        )
    finally:
        await asyncio.to_thread(net.stop)


def _chart_data(summary: dict[str, Any], records: list[RequestRecord]) -> dict[str, Any]:
    """What the chart needs of one scenario (benchmarks/charts.py ``_availability``)."""
    fresh, keep = summary["kinds"][FRESH], summary["kinds"][KEEPALIVE]
    return {
        "label": summary["scenario"]["label"],
        "duration_secs": summary["duration_secs"],
        "success_rate": summary["success_rate"],
        "fresh": {k: fresh[k] for k in ("success_rate", "longest_gap_secs", "gaps")},
        "keepalive": {k: keep[k] for k in ("success_rate", "longest_gap_secs", "gaps")},
        "ttfb_p50_secs": fresh["ttfb_p50_secs"],
        "ttfb_p95_secs": fresh["ttfb_p95_secs"],
        "marks": summary["marks"],
        "buckets": bucket_outcomes(records, summary["duration_secs"], BUCKET_SECS),
    }


def _row(name: str, summary: dict[str, Any], peer_gap: float | None) -> str:
    fresh, keep = summary["kinds"][FRESH], summary["kinds"][KEEPALIVE]
    marks = summary["marks"]
    rotations = sum(1 for m in marks if m["kind"] == "rotation")
    periods = sum(1 for m in marks if m["kind"] == "period")
    ratio = (
        f"{fresh['longest_gap_secs'] / peer_gap:.2f}x"
        if peer_gap and name != "shared"
        else "1.00x (peer)"
    )
    return (
        f"| {summary['scenario']['label']} | {rotations} / {periods} | "
        f"{summary['success_rate']:.1%} | {fresh['success_rate']:.1%} | "
        f"{fresh['longest_gap_secs']} s | {ratio} | {keep['longest_gap_secs']} s | "
        f"{fresh['ttfb_p50_secs']} / {fresh['ttfb_p95_secs']} s |"
    )


def run() -> list[str]:
    base = Path(tempfile.mkdtemp(prefix="rb-bench-avail-"))
    summaries: dict[str, dict[str, Any]] = {}
    charted: dict[str, dict[str, Any]] = {}
    for name, scenario in SCENARIOS:
        records: list[RequestRecord] = []
        summaries[name] = asyncio.run(_one(name, scenario, base, records))
        charted[name] = _chart_data(summaries[name], records)
    record("availability", "scenarios", charted)
    record("availability", "bucket_secs", BUCKET_SECS)
    record("availability", "kill_at_secs", KILL_AT_SECS)
    peer = summaries["shared"]["kinds"][FRESH]["longest_gap_secs"] or None
    lines = [
        "## Availability over descriptor rotations (issue 14)",
        "",
        f"3 nodes, 10 s voting (4-minute periods), {LOAD_SECS:.0f} s of load: fresh-circuit "
        "requests (a new circuit each, 2/s) and 2 keep-alive clients on 2 Tor clients; node-a "
        f"(the first publisher) and its tor SIGKILLed at {KILL_AT_SECS:.0f} s. Longest gap "
        "ratio against `shared` mode in the same run. Timelines: "
        f"`{OUT}/<scenario>/timeline.png`.",
        "",
        "| scenario | rotations / period changes | success | fresh success | "
        "fresh longest gap | vs shared | keep-alive longest gap | fresh TTFB p50 / p95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, summary, peer) for name, summary in summaries.items()]
    return lines
