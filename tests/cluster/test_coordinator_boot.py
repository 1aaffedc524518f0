"""The fast first election through the real shell: coordinators over UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from tests.cluster_net.support import (
    GRACE,
    INTERVAL,
    TIMEOUT,
    cluster,
    coordination_config,
    free_udp_ports,
    make_node,
    publishers,
    self_admitted,
    wait_until,
)
from tests.trust import node_key


def slow_node(
    node_id: str, priority: int, port: int, seeds: list[int], state_dir: Path
) -> Coordinator[IntroPoint]:
    """Heartbeats every 2 s: slow enough to tell an answer from the next periodic heartbeat."""
    config = dataclasses.replace(
        coordination_config(port, seeds),
        heartbeat_interval_secs=2.0,
        heartbeat_timeout_secs=5.0,
        takeover_grace_secs=5.0,
    )
    key = node_key(node_id)
    return Coordinator(
        node_id=node_id,
        node_key=key,
        membership=self_admitted(
            node_id, key, f"127.0.0.1:{port}", priority=priority, state_dir=state_dir
        ),
        config=config,
        state_dir=state_dir,
        encode_intro_point=encode_intro_point,
        decode_intro_point=decode_intro_point,
    )


async def test_fresh_pair_elects_when_the_window_ends(tmp_path: Path) -> None:
    pa, pb = free_udp_ports(2)
    async with cluster() as c:
        a = make_node("a", 1, pa, [pb], tmp_path / "a")
        b = make_node("b", 2, pb, [pa], tmp_path / "b")
        window = a.timings.discovery_window
        assert window == 2 * INTERVAL
        await c.start(a)
        await c.start(b)
        took = await wait_until(lambda: publishers([a, b]) == ["a"], TIMEOUT + GRACE, "a")
        print(f"\nfirst publisher {took:.2f} s after start (window {window} s)")
        # Not before the window, and well before timeout + grace (what it waited before).
        assert window - 0.1 <= took <= window + 1.0 < TIMEOUT + GRACE
        # b hears a's claim by its next heartbeat at the latest (UDP: not the same instant).
        heard = await wait_until(lambda: b.publisher() == "a", 2 * INTERVAL, "b to hear a")
        print(f"b heard the claim {heard:.2f} s later")


async def test_node_started_alone_claims_when_the_window_ends(tmp_path: Path) -> None:
    pa, nobody = free_udp_ports(2)  # its only seed peer is not running
    async with cluster() as c:
        b = make_node("b", 2, pa, [nobody], tmp_path / "b")
        await c.start(b)
        took = await wait_until(lambda: b.is_publisher, TIMEOUT + GRACE, "b to claim alone")
        print(f"\nalone: publisher {took:.2f} s after start")
        assert b.timings.discovery_window - 0.1 <= took <= b.timings.discovery_window + 1.0
        assert not b.is_multi


async def test_restarted_node_is_told_the_publisher_at_once(tmp_path: Path) -> None:
    pa, pb = free_udp_ports(2)
    async with cluster() as c:
        a = slow_node("a", 1, pa, [pb], tmp_path / "a")
        b = slow_node("b", 2, pb, [pa], tmp_path / "b")
        await c.start(a)
        await c.start(b)
        await wait_until(lambda: publishers([a, b]) == ["a"], 10.0, "a to publish")
        await wait_until(lambda: b.publisher() == "a", 3.0, "b to follow a")
        # A heartbeat b sent before a's claim may have been answered; answers to one peer are
        # at most one per half interval, so let that pass.
        await asyncio.sleep(1.5)
        # Restart b right after a periodic heartbeat of a: the next one is an interval away.
        sent = a.counters.heartbeats_sent
        await wait_until(lambda: a.counters.heartbeats_sent > sent, 3.0, "a's heartbeat")
        # b restarts within the timeout: a still counts it live, so only the answer to b's
        # boot heartbeat (which names no publisher) can reach it before a's next heartbeat.
        await c.kill("b")
        restarted = slow_node("b", 2, pb, [pa], tmp_path / "b")
        await c.start(restarted)
        took = await wait_until(lambda: restarted.publisher() == "a", 2.0, "b to learn a")
        print(f"\nrestarted node learned the publisher {took:.3f} s after start")
        assert took < 0.5  # the periodic heartbeat would take up to an interval (2 s)
        assert a.counters.inform_heartbeats_sent >= 1
        # It follows a for its whole discovery window and beyond: nobody's role changes.
        roles = a.counters.role_changes
        await asyncio.sleep(restarted.timings.discovery_window + 1.0)
        assert publishers([a, restarted]) == ["a"]
        assert restarted.counters.role_changes == 0 and a.counters.role_changes == roles
