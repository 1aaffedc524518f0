"""Both halves of a time period (tor.md §3.2, §10), end to end on the private Tor network.

With 20 s voting a period is 24 voting intervals (8 min): segment A (new SRV -> period start)
and segment B (period start -> next SRV) alternate every 4 minutes. Clients fetch the first
descriptor's ring in A and the second descriptor's in B, and the intro points the node reads
from tor belong to tor's *first* descriptor: in segment B that is the previous period. The node
runs its tor as an Onionbalance instance of the master address (``ob_config``), so its intro
points accept introductions made with the master subcredentials of the previous, current and
next period. One node, fresh clients in both segments, waiting across one boundary (bounded by
the consensus valid-after, never the local clock alone).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rustbalance.crypto.time_period import (
    in_period_between_tp_and_srv,
    srv_run_start,
    time_period_num,
    time_period_start,
)
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.tor.consensus import Consensus, parse_consensus, time_params
from tests.node_e2e import running_node
from tests.torhelpers import get_with_retries


def _consensus(net: PrivateTorNetwork, client: TorInstance) -> Consensus:
    text = net.consensus_text(client)
    assert text is not None, f"{client.name} has no consensus"
    return parse_consensus(text)


def _segment(consensus: Consensus) -> str:
    return (
        "B" if in_period_between_tp_and_srv(consensus.valid_after, time_params(consensus)) else "A"
    )


def _next_boundary(consensus: Consensus) -> int:
    """Unix time of the next segment boundary after the consensus valid-after."""
    params = time_params(consensus)
    va = consensus.valid_after
    run_start = srv_run_start(va, params)
    candidates = (
        time_period_start(time_period_num(run_start, params) + 1, params),
        run_start + params.srv_run_seconds,
    )
    return min(t for t in candidates if t > va)


async def _fetch_in_segment(
    net: PrivateTorNetwork, factory: Callable[[], TorInstance], address: str, label: str
) -> tuple[str, str]:
    """A fresh client fetches the master address; returns (segment of the client's consensus
    before and after the fetch); the caller checks they agree."""
    client = await asyncio.to_thread(factory)
    assert client.socks_address is not None
    before = _segment(_consensus(net, client))
    body = await get_with_retries(
        client.socks_address, address, isolation=f"seg-{label}", deadline_s=120
    )
    assert body.strip() == "hello from node-a-target"
    after = _segment(_consensus(net, client))
    net.remove(client)
    return before, after


@pytest.mark.tor
async def test_master_answers_in_both_halves_of_a_period(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    net = tor_network
    with running_node(net, tmp_path / "node") as node:
        await asyncio.to_thread(node.wait_published)
        hs_dir = node.work_dir / "tor" / "hidden_service"
        assert (hs_dir / "ob_config").read_text() == f"MasterOnionAddress {node.address}\n"
        assert (
            "HiddenServiceOnionbalanceInstance 1" in (node.work_dir / "tor" / "torrc").read_text()
        )

        # A fetch in the segment we are in (if a boundary is too close, in the next one).
        reference = net.clients[0]
        consensus = _consensus(net, reference)
        if _next_boundary(consensus) - time.time() < 45:
            await _wait_for_segment_change(net, reference, _segment(consensus))
        first, first_after = await _fetch_in_segment(net, tor_client_factory, node.address, "1")
        if first != first_after:  # crossed a boundary during the fetch: still one segment each
            first = first_after

        # Wait across the next boundary (at most 4 min + a consensus), then fetch again.
        await _wait_for_segment_change(net, reference, first)
        crossed_at = time.time()
        second, _ = await _fetch_in_segment(net, tor_client_factory, node.address, "2")
        assert {first, second} == {"A", "B"}, (first, second)

        # The node published across the boundary: at the new SRV (B -> A) the periods change
        # and it republishes; at the period start (A -> B) its descriptors stay the same, and
        # the "next" descriptor it published in A is the one clients fetch in B.
        view_now = _consensus(net, reference)
        params = time_params(view_now)
        tp_now = time_period_num(view_now.valid_after, params)
        log = node.process.log_text()
        if second == "A":
            # At the new SRV tor rotates its descriptors: the node must republish, and its first
            # descriptor is now for the current period (whichever signal noticed it first: the
            # consensus watcher or the changed own intro points).
            # The fetch above may come before the node's next consensus check: wait (bounded).
            await asyncio.to_thread(
                node.wait_line,
                rf"^Published current descriptor \(period {tp_now},",
                150,
                after=crossed_at - 60,
            )
        else:
            periods = [
                int(p) for p in re.findall(r"Published next descriptor \(period (\d+),", log)
            ]
            assert tp_now in periods, (tp_now, periods)
        print(
            f"\nfetched in segment {first}, then in segment {second} "
            f"(period {tp_now}; second fetch done {time.time() - crossed_at:.0f} s after the "
            "boundary showed in the consensus)"
        )


async def _wait_for_segment_change(
    net: PrivateTorNetwork, client: TorInstance, current: str, limit: float = 330
) -> str:
    """Wait until ``client``'s consensus is in the other segment (4 min + a consensus)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        seg = _segment(_consensus(net, client))
        if seg != current:
            return seg
        await asyncio.sleep(2)
    raise AssertionError(f"still in segment {current} after {limit:.0f} s")
