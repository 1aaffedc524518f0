"""Case (c) of the front door through real tor (issue 15): one circuit opening streams as fast
as it can against an onion service behind the proxy, a legitimate client on its own circuit.

The private network's tors carry the PROXY lines (``HiddenServiceExportCircuitID haproxy``)
and close the cut circuit (CLOSECIRCUIT); nothing is faked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from benchmarks.frontdoor_tor import circuit_flood_through_tor

from rustbalance.testnet import PrivateTorNetwork, TorInstance


@pytest.mark.tor
async def test_a_flooding_circuit_is_cut_and_closed_by_tor_while_others_are_served(
    tor_network: PrivateTorNetwork, tor_client_factory: Callable[[], TorInstance]
) -> None:
    attacker = await asyncio.to_thread(tor_client_factory)
    legit = tor_network.clients[0]
    assert attacker.socks_address is not None and legit.socks_address is not None
    result = await circuit_flood_through_tor(
        tor_network, attacker.socks_address, legit.socks_address, limit=6, width=16, requests=15
    )
    print(
        f"\nlegitimate: {result.ok} of {result.ok + result.failed}, p95 "
        f"{result.percentile(0.95):.2f} s; attacker streams {result.attacker_streams}, "
        f"{len(result.cut)} circuits cut by the proxy, {len(result.closed_by_tor)} closed by tor"
    )
    assert result.success >= 0.99
    assert result.cut and result.closed_by_tor == result.cut  # cut by the proxy, closed by tor
    # A cut circuit is gone in tor: the attacker's tor had to build a new one to go on (had
    # tor kept it, its streams would have come on the same circuit, refused while cut).
    assert len(set(result.cut)) >= 2
    assert result.legit_circuits and not result.legit_circuits & {str(c) for c in result.cut}
