"""Always reachable (issue 14), and the soak (issue 7): what a visitor of the master address
sees through tor's descriptor rotation, a time-period change and faults, in the default
configuration.

One private network of their own with 10 s voting (4-minute periods: a descriptor rotation
every 240 s, a period change 120 s after each) for both tests; three ``rustbalance run``
nodes with product timings whose configs name coordination peers and leave
``identity_mode`` out (what ``init`` and ``join`` give resolves the same way:
tests/ops/test_init_join_cli.py). The load is the availability harness
(rustbalance.testnet.availability): fresh-circuit requests (a new circuit each, 2 per second)
and two keep-alive clients on two Tor clients. Reports and timeline pictures go to
``test-logs/availability-*/`` (pass or fail).

- The proof and soak: the load runs until it has seen a period change and a descriptor
  rotation (each at least 10 s after it started), plus 20 s. Meanwhile, at seeded random
  times (``RB_SOAK_SEED`` replays a schedule): one node's tor is SIGKILLed (its watchdog
  restarts it), node-a (the first publisher) and its tor are SIGKILLed for good between the
  two boundaries (a takeover), and another node is SIGKILLed and started again 3 s later, as
  systemd's ``Restart=always`` would. No gap over 5 s anywhere, rotations and faults
  included; the cluster re-forms afterwards.
- The rolling migration of a ``shared`` cluster to the default mode, node by node, the
  publisher last, without a boundary to wait for: the address stays the same and answers
  throughout.

The long runs (540 s, two rotations and two period changes, ``instance`` mode with and
without plain backends against ``shared`` as the peer) are ``make bench``
(benchmarks/bench_availability.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.availability import FRESH, KEEPALIVE
from rustbalance.testnet.availability_run import Fault, Scenario, run_scenario

pytestmark = pytest.mark.tor

MAX_GAP_SECS = 5.0
# Upper bound of the proof run's load: the boundaries come within 10 + 120 + 120 s of its
# start, the last fault needs a little after (testnet.availability.plan_cover).
PROOF_LOAD_BOUND_SECS = 330.0
# The rolling migration starts this long after the load and ends 10 s after the last step.
MIGRATION_FROM_SECS = 10.0
# ... on a cluster launched away from a descriptor rotation: until the first node is changed
# every node is shared, and a rotation then is the gap the migration removes (launch, ready,
# the first step and its node back: well under a minute).
CALM_START_SECS = 45.0


@pytest.fixture(scope="module")
def ten_second_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateTorNetwork]:
    """A private network of its own with 10 s voting (the session's votes every 20 s)."""
    net = PrivateTorNetwork(tmp_path_factory.mktemp("tornet10"), n_relays=4, voting_interval=10)
    try:
        net.start()
        yield net
    finally:
        net.stop()


async def _run(
    net: PrivateTorNetwork, scenario: Scenario, name: str, work: Path, out: Path
) -> dict[str, Any]:
    clients = [await asyncio.to_thread(net.add_client, f"{name}client{i}") for i in range(2)]
    try:
        summary = await run_scenario(net, clients, work / "cluster", out, scenario)
    finally:
        for client in clients:
            net.remove(client)
    print(f"{name}: " + json.dumps({k: v for k, v in summary.items() if k != "marks"}))
    return summary


def _no_long_gap(summary: dict[str, Any]) -> None:
    fresh, keepalive = summary["kinds"][FRESH], summary["kinds"][KEEPALIVE]
    assert fresh["requests"] >= 2 * summary["duration_secs"] * 0.9, fresh  # the rate held
    assert fresh["longest_gap_secs"] <= MAX_GAP_SECS, fresh["gaps"]
    assert keepalive["longest_gap_secs"] <= MAX_GAP_SECS, keepalive["gaps"]


def soak_faults(rng: random.Random) -> tuple[Fault, ...]:
    """A tor kill early (its node's watchdog restarts it), node-a (the first publisher) killed
    for good between the two boundaries, and a kill-and-restart of the third node shortly
    before the second boundary; the two standbys draw lots for the first and the last."""
    tor_node, restart_node = rng.sample(["node-b", "node-c"], 2)
    return (
        Fault("kill_tor", tor_node, rng.uniform(3.0, 8.0)),
        Fault("kill", "node-a", rng.uniform(20.0, 50.0), after_boundary=True),
        Fault("restart", restart_node, rng.uniform(70.0, 95.0), after_boundary=True),
    )


async def test_always_reachable_through_a_period_change_a_rotation_and_faults(
    ten_second_network: PrivateTorNetwork, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    seed_text = os.environ.get("RB_SOAK_SEED", "").strip()
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1 << 32)
    print(f"\nsoak: seed {seed} (set RB_SOAK_SEED={seed} to replay the schedule)")
    faults = soak_faults(random.Random(seed))
    scenario = Scenario(
        identity_mode="",
        load_secs=PROOF_LOAD_BOUND_SECS,
        faults=faults,
        cover=("period", "rotation"),
        lead_secs=10.0,
        tail_secs=20.0,
    )
    out = request.config.rootpath / "test-logs" / "availability-proof"
    summary = await _run(ten_second_network, scenario, "proof", tmp_path, out)
    summary["seed"] = seed
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    assert set(summary["covered_at_secs"]) == {"period", "rotation"}
    assert {m["kind"] for m in summary["marks"]} == {"rotation", "period", "fault"}
    assert len(summary["faults"]) == 3, summary["faults"]
    _no_long_gap(summary)
    # Every fault may cost at most one gap's worth of requests, and so may each boundary.
    bound = 1.0 - (len(faults) + 2) * MAX_GAP_SECS / summary["duration_secs"]
    assert summary["success_rate"] >= bound, summary["success_rate"]
    fresh = summary["kinds"][FRESH]
    assert len(fresh["answered_by"]) >= 2, fresh  # spread over the nodes, and survived
    # The soak's recovery: the killed tor was restarted by its watchdog, the restarted node
    # rejoined, one publisher among the two live nodes.
    assert all(n >= 1 for n in summary["watchdog_restarts"].values()), summary
    assert len(summary["watchdog_restarts"]) == 1
    assert summary["recovered_secs_after_load"] is not None, summary
    assert len(summary["publishers_after"]) == 1, summary["publishers_after"]
    for name in ("node-b", "node-c"):
        log = (out / "nodes" / f"{name}.log").read_text()
        assert "Identity mode instance: tor hosts" in log, name  # the default in a cluster


async def test_rolling_shared_to_default_migration_keeps_the_address_reachable(
    ten_second_network: PrivateTorNetwork, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The documented path from a ``shared`` cluster to the default (``instance``) mode
    (docs/config.md): one node at a time is stopped, its ``identity_mode`` line removed and
    started again with today's release, the best-ranked (the publisher) last, each once the
    one before is back in the published descriptor. The nodes start as the release before
    issue 14, the only one that ran ``shared`` in a cluster (testnet/previous_release.py: the
    refusal lifted, nothing else). The master address stays the same and keeps answering (no
    gap over 5 s); every node ends up hosting its own instance key; a node of today's release
    refuses the old config."""
    scenario = Scenario(
        identity_mode="shared",
        load_secs=300.0,
        migrate_to="",
        migrate_from_secs=MIGRATION_FROM_SECS,
        tail_secs=10.0,
        previous_release=True,
        calm_start_secs=CALM_START_SECS,
    )
    out = request.config.rootpath / "test-logs" / "availability-migration"
    summary = await _run(ten_second_network, scenario, "migration", tmp_path, out)
    steps = summary["migration"]
    assert [s["node"] for s in steps] == ["node-c", "node-b", "node-a"], steps
    # No rotation while every node was still shared (the known gap the migration removes).
    early = [
        m for m in summary["marks"] if m["kind"] == "rotation" and m["at"] < steps[0]["at_secs"]
    ]
    assert not early, summary["marks"]
    _no_long_gap(summary)
    for name in ("node-a", "node-b", "node-c"):
        log = (out / "nodes" / f"{name}.log").read_text()
        # The same master address before and after; tor now hosts the node's own key.
        starts = [line for line in log.splitlines() if "Starting rustbalance:" in line]
        assert len(starts) == 2, starts
        assert all(line.endswith(f"master {summary['master']}") for line in starts), starts
        assert "Identity mode instance: tor hosts" in log, name
