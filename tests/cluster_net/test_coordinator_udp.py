"""Coordinators on real UDP sockets on 127.0.0.1: gossip, election, failover, intro points,
restart from the members file, partition and heal through a fault-injecting relay.

Timings are short (interval 0.5 s, timeout 1.5 s, grace 1.5 s); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME, ChangeKind
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.messages import Role
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
from tests.descriptor.helpers import make_intro_point, rng
from tests.trust import MASTER, now_ms

# A crashed publisher is replaced timeout + grace after its last heartbeat reached the best
# standby: at most one interval after the crash, plus one coordinator tick (interval / 2).
FAILOVER_BOUND = TIMEOUT + GRACE + INTERVAL + INTERVAL / 2
# Startup: nobody claims before timeout + grace after its boot.
STARTUP_BOUND = TIMEOUT + GRACE + 2.0
SLACK = 0.5  # scheduling noise on a loaded test machine


async def test_gossip_one_publisher_and_crash_failover(tmp_path: Path) -> None:
    pa, pb, pc = free_udp_ports(3)
    async with cluster() as c:
        # A chain: a knows b, b knows c, c knows b. a and c only meet through b: b relays the
        # master-signed records it holds (a's and c's), which say where each one is.
        a = make_node("a", 1, pa, [pb], tmp_path / "a")
        b = make_node("b", 2, pb, [pc], tmp_path / "b")
        cc = make_node("c", 3, pc, [pb], tmp_path / "c")
        for node in (a, b, cc):
            await c.start(node)
        nodes = [a, b, cc]

        def full_mesh() -> bool:
            return all(len(n.live_peers()) == 2 for n in nodes)

        await wait_until(full_mesh, 3.0, "a full mesh through the membership")
        assert a.membership.member("c").coordination == f"127.0.0.1:{pc}"  # type: ignore[union-attr]
        assert cc.membership.member("a").coordination == f"127.0.0.1:{pa}"  # type: ignore[union-attr]
        assert all(n.is_multi for n in nodes)

        await wait_until(lambda: publishers(nodes) == ["a"], STARTUP_BOUND, "a to publish")
        await wait_until(
            lambda: b.publisher() == "a" and cc.publisher() == "a", 2.0, "all to agree on a"
        )
        # Stable: exactly one publisher over several heartbeats.
        for _ in range(10):
            assert publishers(nodes) == ["a"]
            await asyncio.sleep(INTERVAL / 2)

        await c.kill("a")  # a crash: no lease_release
        took = await wait_until(
            lambda: b.role is Role.PUBLISHER, FAILOVER_BOUND + SLACK, "b to take over"
        )
        print(f"\nfailover after a crash: {took:.2f} s (bound {FAILOVER_BOUND:.2f} s)")
        assert took >= TIMEOUT  # not before a is considered dead
        assert cc.role is Role.STANDBY
        await wait_until(lambda: cc.publisher() == "b", 2.0, "c to see b publishing")
        assert [p.node_id for p in b.live_peers()] == ["c"]
        assert b.counters.lease_claims_sent >= 1


async def test_graceful_shutdown_hands_over_within_a_second(tmp_path: Path) -> None:
    pa, pb, pc = free_udp_ports(3)
    async with cluster() as c:
        a = make_node("a", 1, pa, [pb, pc], tmp_path / "a")
        b = make_node("b", 2, pb, [pa, pc], tmp_path / "b")
        cc = make_node("c", 3, pc, [pa, pb], tmp_path / "c")
        for node in (a, b, cc):
            await c.start(node)
        nodes = [a, b, cc]
        await wait_until(lambda: publishers(nodes) == ["a"], STARTUP_BOUND, "a to publish")
        await wait_until(lambda: b.publisher() == "a", 2.0, "b to see a")

        await a.shutdown()  # the daemon's SIGTERM hook
        assert a.role is Role.STANDBY
        assert a.counters.lease_releases_sent >= 2  # two copies to two peers... at least
        await c.kill("a")
        took = await wait_until(lambda: b.role is Role.PUBLISHER, 2.0, "b to take over")
        print(f"\nfailover after lease_release: {took:.3f} s")
        assert took < 1.0
        assert cc.role is Role.STANDBY
        assert b.counters.lease_releases_received >= 1


async def test_intro_points_propagate_by_content(tmp_path: Path) -> None:
    pa, pb, pc = free_udp_ports(3)
    r = rng(5)
    ip1, ip2, ip3 = (make_intro_point(r, index=i) for i in range(3))
    async with cluster() as c:
        a = make_node("a", 1, pa, [pb], None)
        b = make_node("b", 2, pb, [pa], None)
        changes: list[ChangeKind] = []
        b._on_change = changes.append
        await c.start(a)
        await c.start(b)
        await wait_until(lambda: a.is_multi and b.is_multi, 3.0, "a and b to meet")

        def at_b() -> tuple[IntroPoint, ...]:
            return b.peer_intro_points().get("a", ())

        assert a.set_intro_points([ip1, ip2])
        took = await wait_until(lambda: set(at_b()) == {ip1, ip2}, 2.0, "ip1, ip2 at b")
        assert took < INTERVAL  # sent at once, not with the next heartbeat
        assert ChangeKind.INTRO_POINTS in changes

        # Same count, other content: must propagate (W15: the original compared counts).
        changes.clear()
        assert a.set_intro_points([ip1, ip3])
        await wait_until(lambda: set(at_b()) == {ip1, ip3}, 2.0, "ip1, ip3 at b")
        assert changes.count(ChangeKind.INTRO_POINTS) == 1
        # The next heartbeat of a advertises the digest of what b now holds.
        await wait_until(
            lambda: b.live_peers()[0].intro_points_current, 2 * INTERVAL, "a's digest at b"
        )

        # Same set in another order: nothing is sent.
        sent = a.counters.intro_points_sent
        assert not a.set_intro_points([ip3, ip1])
        assert a.counters.intro_points_sent == sent

        # A node that joins later gets the current set without any change on a.
        cc = make_node("c", 3, pc, [pa], None)
        await c.start(cc)
        await wait_until(
            lambda: set(cc.peer_intro_points().get("a", ())) == {ip1, ip3}, 3.0, "points at c"
        )

        # A dead node's intro points leave with it.
        changes.clear()
        await c.kill("a")
        await wait_until(lambda: "a" not in b.peer_intro_points(), TIMEOUT + 1.5, "a to expire")
        # The expiry sweep (next tick) reports it.
        await wait_until(lambda: ChangeKind.PEER_DOWN in changes, INTERVAL, "peer-down event")
        assert b.is_multi  # c is still there


async def test_restart_rejoins_from_the_members_file_without_seeds(tmp_path: Path) -> None:
    pa, pb, pc = free_udp_ports(3)
    async with cluster() as c:
        a = make_node("a", 1, pa, [pb], tmp_path / "a")
        b = make_node("b", 2, pb, [pa], tmp_path / "b")
        cc = make_node("c", 3, pc, [pa], tmp_path / "c")
        for node in (a, b, cc):
            await c.start(node)
        await wait_until(
            lambda: all(len(n.live_peers()) == 2 for n in (a, b, cc)), 3.0, "a full mesh"
        )
        members_file = tmp_path / "c" / MEMBERS_FILE_NAME

        def saved() -> set[str]:
            if not members_file.exists():
                return set()
            membership = Membership(MASTER.public_key)
            membership.load_json(members_file.read_text(), now_ms())
            return {r.node_id for r in membership.members()}

        await wait_until(lambda: saved() == {"a", "b", "c"}, 2.0, "c's members file")
        assert stat.S_IMODE(members_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(members_file.parent.stat().st_mode) == 0o700
        await wait_until(lambda: publishers([a, b, cc]) == ["a"], STARTUP_BOUND, "a to publish")

        await c.kill("c")
        restarted = make_node("c", 3, pc, [], tmp_path / "c")  # no seed peers at all
        assert not restarted.config.peers
        await c.start(restarted)
        took = await wait_until(
            lambda: {p.node_id for p in restarted.live_peers()} == {"a", "b"},
            3.0,
            "the restarted node to rejoin",
        )
        print(f"\nrejoin from the members file: {took:.2f} s")
        await wait_until(lambda: restarted.publisher() == "a", 2.0, "c to see a publishing")
        # It never claims while a better publisher is live, even after timeout + grace.
        await asyncio.sleep(TIMEOUT + GRACE + INTERVAL)
        assert publishers([a, b, restarted]) == ["a"]


async def test_partition_each_side_elects_and_heal_leaves_one(tmp_path: Path) -> None:
    ports = free_udp_ports(8)
    real, front = ports[:4], ports[4:]
    names = ["a", "b", "c", "d"]
    group = {"a": "left", "b": "left", "c": "right", "d": "right"}
    relay = FaultRelay()
    try:
        for i, name in enumerate(names):
            await relay.add_front(front[i], real[i], group[name])
        async with cluster() as c:
            nodes = []
            for i, name in enumerate(names):
                node = make_node(
                    name,
                    i + 1,
                    real[i],
                    [front[(i + 1) % 4]],  # each knows only the next one, via the relay
                    tmp_path / name,
                    advertise=f"127.0.0.1:{front[i]}",
                )
                nodes.append(node)
                await c.start(node)
            a, b, cc, d = nodes
            await wait_until(lambda: all(len(n.live_peers()) == 3 for n in nodes), 4.0, "mesh")
            await wait_until(lambda: publishers(nodes) == ["a"], STARTUP_BOUND, "a to publish")
            assert relay.forwarded > 0 and relay.dropped == 0

            relay.partition("left", "right")
            took = await wait_until(
                lambda: publishers(nodes) == ["a", "c"],
                FAILOVER_BOUND + SLACK,
                "each side to have its own publisher",
            )
            print(f"\npartition: right side elected c after {took:.2f} s")
            assert {p.node_id for p in cc.live_peers()} == {"d"}
            assert {p.node_id for p in a.live_peers()} == {"b"}
            # d learns of c's claim a moment later (it travels through the relay).
            await wait_until(
                lambda: d.publisher() == "c" and b.publisher() == "a", INTERVAL, "sides agree"
            )

            relay.heal()
            took = await wait_until(
                lambda: publishers(nodes) == ["a"], TIMEOUT + SLACK, "one publisher after heal"
            )
            print(f"convergence after heal: {took:.2f} s")
            await wait_until(
                lambda: all(n.publisher() == "a" for n in nodes), TIMEOUT, "all to agree on a"
            )
            # Stays converged.
            for _ in range(6):
                assert publishers(nodes) == ["a"]
                await asyncio.sleep(INTERVAL / 2)
            assert relay.dropped > 0
    finally:
        relay.close()
