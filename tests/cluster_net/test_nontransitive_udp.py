"""Non-transitive partitions with real coordinators on 127.0.0.1 UDP (issue 5, multi-node).

Three coordinators a, b, c (priorities 1, 2, 3: a ranks best, c worst) talk only through a
:class:`~tests.cluster_net.support.FaultRelay` in which every node is its own group, so the
relay can cut one *pair* of nodes while the others keep talking. Cutting a <-> b leaves c as
the only link between them: c ranks worse than both, so a and b each see nothing better than
themselves, and before heartbeats carried the believed publisher both published for good.
Here c relays "a publishes" to b, so there is exactly one publisher in the component.

Timings are short (interval 0.5 s, timeout 1.5 s, grace 1.5 s); every wait is bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.descriptor.intro_point import IntroPoint
from tests.cluster_net.support import (
    GRACE,
    INTERVAL,
    TIMEOUT,
    FaultRelay,
    cluster,
    free_udp_ports,
    make_node,
    publishers,
    wait_until,
)

NAMES = ("a", "b", "c")
STARTUP_BOUND = TIMEOUT + GRACE + 2.0
# A crashed publisher is replaced timeout + grace after its last sign of life reached the
# successor (here through c: one more datagram transit), plus an interval and a tick.
FAILOVER_BOUND = TIMEOUT + GRACE + INTERVAL + INTERVAL / 2
SLACK = 0.5  # scheduling noise on a loaded test machine


@asynccontextmanager
async def three_nodes(
    tmp_path: Path, relay: FaultRelay
) -> AsyncIterator[list[Coordinator[IntroPoint]]]:
    ports = free_udp_ports(6)
    real, front = ports[:3], ports[3:]
    for i, name in enumerate(NAMES):
        await relay.add_front(front[i], real[i], name)  # one group per node: pairs can be cut
    async with cluster() as c:
        nodes = []
        for i, name in enumerate(NAMES):
            node = make_node(
                name,
                i + 1,
                real[i],
                [front[j] for j in range(3) if j != i],
                tmp_path / name,
                advertise=f"127.0.0.1:{front[i]}",
            )
            nodes.append(node)
            await c.start(node)
        yield nodes


def live_ids(node: Coordinator[IntroPoint]) -> set[str]:
    return {p.node_id for p in node.live_peers()}


async def hold(nodes: list[Coordinator[IntroPoint]], seconds: float, expected: list[str]) -> None:
    """Sample every 50 ms for ``seconds``: the publishers never differ from ``expected``."""
    for _ in range(int(seconds / 0.05)):
        assert publishers(nodes) == expected, publishers(nodes)
        await asyncio.sleep(0.05)


async def test_worst_node_in_the_middle_keeps_one_publisher(tmp_path: Path) -> None:
    relay = FaultRelay()
    try:
        async with three_nodes(tmp_path, relay) as nodes:
            a, b, c = nodes
            await wait_until(lambda: all(len(live_ids(n)) == 2 for n in nodes), 4.0, "mesh")
            await wait_until(lambda: publishers(nodes) == ["a"], STARTUP_BOUND, "a to publish")

            relay.partition("a", "b")
            await wait_until(
                lambda: live_ids(a) == {"c"} and live_ids(b) == {"c"},
                TIMEOUT + SLACK,
                "a and b to lose each other",
            )
            # Longer than b would wait before taking over from a silent a (timeout + grace),
            # several times over: b never publishes, because c keeps reporting a.
            await hold(nodes, 2 * (TIMEOUT + GRACE) + 2 * INTERVAL, ["a"])
            assert [n.publisher() for n in nodes] == ["a", "a", "a"]

            # a drops off the network: b (better than c) takes over through c's view alone.
            relay.partition("a", "c")
            took = await wait_until(
                lambda: publishers(nodes) == ["a", "b"], FAILOVER_BOUND + SLACK, "b to take over"
            )
            print(f"\nfailover through the relay node: {took:.2f} s")
            assert took >= TIMEOUT + GRACE - INTERVAL  # the grace was honoured, not skipped
            await wait_until(lambda: c.publisher() == "b", 2 * INTERVAL, "c to name b")

            # a comes back to c only: a non-transitive heal; b steps down within an interval
            # or two of c's report of the better a, and a stays the only publisher.
            relay.blocked.discard(frozenset(("a", "c")))
            took = await wait_until(
                lambda: publishers(nodes) == ["a"], TIMEOUT + SLACK, "one publisher again"
            )
            print(f"non-transitive heal converged in {took:.2f} s")
            await hold(nodes, TIMEOUT + GRACE, ["a"])
            assert all(n.publisher() == "a" for n in nodes)

            relay.heal()
            await wait_until(lambda: all(len(live_ids(n)) == 2 for n in nodes), 3.0, "mesh")
            await hold(nodes, TIMEOUT + GRACE, ["a"])
            assert relay.dropped > 0
    finally:
        relay.close()


async def test_partial_heal_makes_the_worse_publisher_step_down(tmp_path: Path) -> None:
    relay = FaultRelay()
    try:
        async with three_nodes(tmp_path, relay) as nodes:
            b = nodes[1]
            await wait_until(lambda: all(len(live_ids(n)) == 2 for n in nodes), 4.0, "mesh")
            await wait_until(lambda: publishers(nodes) == ["a"], STARTUP_BOUND, "a to publish")
            # A full partition {a} | {b, c}: each side elects its own publisher.
            relay.partition("a", "b")
            relay.partition("a", "c")
            await wait_until(
                lambda: publishers(nodes) == ["a", "b"],
                TIMEOUT + GRACE + INTERVAL + SLACK,
                "b to publish on its side",
            )
            # Only a <-> c comes back. a and b still cannot talk; c, the worst, is between them.
            relay.blocked.discard(frozenset(("a", "c")))
            took = await wait_until(
                lambda: publishers(nodes) == ["a"], TIMEOUT + SLACK, "b to step down"
            )
            print(f"\nworse publisher stepped down {took:.2f} s after the partial heal")
            await hold(nodes, TIMEOUT + GRACE + INTERVAL, ["a"])
            assert live_ids(b) == {"c"} and b.publisher() == "a"
    finally:
        relay.close()
