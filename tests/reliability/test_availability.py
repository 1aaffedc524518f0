"""Always reachable (issue 14), CI length: the master address answers through a time-period
change, tor's descriptor rotation and a node killed in between, with no gap over 5 s.

The harness (rustbalance.testnet.availability, availability_run) on its own private network
with 10 s voting (4-minute periods: a descriptor rotation every 240 s, a period change 120 s
after each), three ``rustbalance run`` nodes in ``instance`` identity mode, product timings.
The load starts ``LEAD_SECS`` before a period change and lasts until ``TAIL_SECS`` after the
next rotation, so both are inside; node-a (the publisher: a takeover too) is SIGKILLed with
its tor halfway. Fresh-circuit clients (a new circuit per request, 2 per second) and two
keep-alive clients on two Tor clients. The report and the timeline picture are written to
``test-logs/availability-ci/`` (pass or fail). A second test runs the rolling ``shared`` ->
``instance`` migration under the same load (``test-logs/availability-migration/``). The long
runs, in every mode, are in ``make bench`` (benchmarks/bench_availability.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.availability import FRESH, KEEPALIVE
from rustbalance.testnet.availability_run import Scenario, run_scenario

LEAD_SECS = 20.0
# period change -> rotation is 120 s with 10 s voting; 30 s after it for the failover to show
LOAD_SECS = LEAD_SECS + 120.0 + 30.0
MAX_GAP_SECS = 5.0
# The rolling migration: node-c, node-b, node-a (the publisher) switched at these seconds.
MIGRATE_AT_SECS = (20.0, 80.0, 140.0)
MIGRATION_LOAD_SECS = 200.0


@pytest.fixture(scope="module")
def ten_second_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTorNetwork]:
    """A private network of its own with 10 s voting (the session's votes every 20 s)."""
    net = PrivateTorNetwork(tmp_path_factory.mktemp("tornet10"), n_relays=4, voting_interval=10)
    try:
        net.start()
        yield net
    finally:
        net.stop()


@pytest.mark.tor
async def test_no_gap_over_5_s_through_a_period_change_a_rotation_and_a_node_kill(
    ten_second_network: PrivateTorNetwork,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    net = ten_second_network
    clients = [await asyncio.to_thread(net.add_client, f"availclient{i}") for i in range(2)]
    out = request.config.rootpath / "test-logs" / "availability-ci"
    scenario = Scenario(
        identity_mode="instance",
        load_secs=LOAD_SECS,
        kill_node="node-a",
        kill_at_secs=LEAD_SECS + 60.0,
        lead_secs=LEAD_SECS,
        align_to="period",
    )
    try:
        summary = await run_scenario(net, clients, tmp_path / "cluster", out, scenario)
    finally:
        for client in clients:
            net.remove(client)
    print("availability: " + json.dumps({k: v for k, v in summary.items() if k != "marks"}))
    kinds = {m["kind"] for m in summary["marks"]}
    assert {"rotation", "period", "fault"} <= kinds, summary["marks"]
    fresh, keepalive = summary["kinds"][FRESH], summary["kinds"][KEEPALIVE]
    assert fresh["requests"] >= 2 * LOAD_SECS * 0.9, fresh  # the open-loop rate held
    assert fresh["longest_gap_secs"] <= MAX_GAP_SECS, fresh["gaps"]
    assert keepalive["longest_gap_secs"] <= MAX_GAP_SECS, keepalive["gaps"]
    # More than one node answered: the load was spread, and survived the kill.
    assert len(fresh["answered_by"]) >= 2, fresh


@pytest.mark.tor
async def test_rolling_shared_to_instance_migration_keeps_the_address_reachable(
    ten_second_network: PrivateTorNetwork,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The documented path from a ``shared`` cluster to ``instance`` mode (docs/config.md):
    one node at a time is stopped, switched to ``identity_mode = "instance"`` and started
    again, the best-ranked (the publisher) last. The master address stays the same and keeps
    answering throughout (no gap over 5 s); every node ends up hosting its own instance key."""
    net = ten_second_network
    clients = [await asyncio.to_thread(net.add_client, f"migclient{i}") for i in range(2)]
    out = request.config.rootpath / "test-logs" / "availability-migration"
    scenario = Scenario(
        identity_mode="shared",
        load_secs=MIGRATION_LOAD_SECS,
        kill_node=None,
        migrate_at_secs=MIGRATE_AT_SECS,
    )
    try:
        summary = await run_scenario(net, clients, tmp_path / "cluster", out, scenario)
    finally:
        for client in clients:
            net.remove(client)
    print("migration: " + json.dumps({k: v for k, v in summary.items() if k != "marks"}))
    assert len(summary["faults"]) == 3, summary["faults"]
    assert all("restarted in instance mode" in f for f in summary["faults"])
    fresh, keepalive = summary["kinds"][FRESH], summary["kinds"][KEEPALIVE]
    assert fresh["longest_gap_secs"] <= MAX_GAP_SECS, fresh["gaps"]
    assert keepalive["longest_gap_secs"] <= MAX_GAP_SECS, keepalive["gaps"]
    for name in ("node-a", "node-b", "node-c"):
        log = (out / "nodes" / f"{name}.log").read_text()
        # The same master address before and after; tor now hosts the node's own key.
        assert f"master {summary['master']}" in log
        assert "Identity mode instance: tor hosts" in log, name
