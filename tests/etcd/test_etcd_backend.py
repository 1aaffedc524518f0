"""The etcd backend against a real 3-member etcd cluster (TLS, client certificates, RBAC).

Lease TTL 4 s (tests/etcd/conftest.py). Each test samples every backend's view while it runs
and checks that no two nodes ever held the publisher lease at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from rustbalance.cluster.etcd_backend import EtcdBackend, load_tls
from rustbalance.cluster.etcd_client import EtcdClient, EtcdUnavailable, WatchBatch
from rustbalance.config.schema import EtcdConfig
from rustbalance.errors import ConfigError
from rustbalance.testnet.etcd_cluster import EtcdCluster, TcpCutter, TestPki
from tests.etcd.conftest import TTL, Fleet, cert, holders, tls, until

Backend = EtcdBackend[bytes]


class NeverTwo:
    """Samples the nodes every 20 ms in the background; ``check()`` fails if two ever held
    the lease in the same sample, and returns the sequence of publishers seen."""

    def __init__(self, nodes: list[Backend]) -> None:
        self.nodes = nodes
        self.seen: list[tuple[str, ...]] = []
        self.task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            now = tuple(holders(self.nodes))
            if not self.seen or self.seen[-1] != now:
                self.seen.append(now)
            await asyncio.sleep(0.02)

    async def check(self) -> list[tuple[str, ...]]:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        assert all(len(h) <= 1 for h in self.seen), self.seen
        return self.seen


async def three(fleet: Fleet, **kwargs: object) -> list[Backend]:
    nodes = [fleet.start(n, **kwargs) for n in ("node-a", "node-b", "node-c")]  # type: ignore[arg-type]
    await until(lambda: len(holders(nodes)) == 1, 15)
    await until(lambda: all(len(b.facts().peer_intro_points) == 2 for b in nodes), 10)
    return nodes


def publisher_of(nodes: list[Backend]) -> Backend:
    (name,) = holders(nodes)
    return next(b for b in nodes if b.node_id == name)


async def test_three_nodes_elect_one_publisher_and_learn_changes_by_watch(fleet: Fleet) -> None:
    nodes = await three(fleet)
    watch = NeverTwo(nodes)
    publisher = publisher_of(nodes)
    standbys = [b for b in nodes if b is not publisher]
    facts = publisher.facts()
    assert facts.is_multi and facts.holds_lease
    assert facts.peer_intro_points == {
        b.node_id: (f"{b.node_id}-ip1".encode(), f"{b.node_id}-ip2".encode()) for b in standbys
    }
    assert await publisher.may_publish()
    assert not any([await b.may_publish() for b in standbys])
    assert {b.status().publisher for b in nodes} == {publisher.node_id}
    # A standby's new intro points reach the publisher through its watch, not a poll.
    publisher.clear_changed()
    started = time.monotonic()
    standbys[0].report_intro_points([b"fresh"])
    await asyncio.wait_for(publisher.changed.wait(), 5)
    await until(lambda: publisher.facts().peer_intro_points[standbys[0].node_id] == (b"fresh",), 5)
    latency = time.monotonic() - started
    print(f"intro point change seen by the publisher after {latency * 1000:.0f} ms")
    assert latency < 1.0
    assert publisher.counters.watch_restarts == 0
    assert await watch.check() == [(), (publisher.node_id,)] or len(await watch.check()) == 1


async def test_a_restarted_backend_task_carries_on_with_its_lease(fleet: Fleet) -> None:
    """The daemon's supervisor restarts a failed task by calling ``run()`` again: the client
    must still be open (phase 1 closed it when ``run()`` ended) and the lease carries on."""
    a = fleet.start("node-a")
    await until(lambda: a.is_publisher, 15)
    task = fleet.tasks.pop(id(a))
    task.cancel()
    await asyncio.wait([task], timeout=10)
    fleet.tasks[id(a)] = asyncio.create_task(a.run(), name="etcd-node-a-again")
    before = a.counters.keepalives
    await until(lambda: a.counters.keepalives >= before + 2, 3 * TTL)
    assert a.is_publisher and await a.may_publish()
    assert a.counters.leases_lost == 0
    assert a.last_error is None


async def test_sigterm_revokes_and_a_standby_takes_over_at_once(fleet: Fleet) -> None:
    nodes = await three(fleet)
    watch = NeverTwo(nodes)
    old = publisher_of(nodes)
    started = time.monotonic()
    await old.leave()
    rest = [b for b in nodes if b is not old]
    await until(lambda: len(holders(rest)) == 1, TTL)
    handover = time.monotonic() - started
    print(f"handover after lease revoke: {handover * 1000:.0f} ms (TTL {TTL} s)")
    assert handover < 1.5  # the revoke deletes the candidacy at once: no TTL wait
    assert not await old.may_publish()
    await until(lambda: all(old.node_id not in b.facts().peer_intro_points for b in rest), 5)
    await watch.check()


async def test_a_killed_publisher_expires_and_the_next_candidate_takes_over(
    fleet: Fleet,
) -> None:
    nodes = await three(fleet)
    watch = NeverTwo(nodes)
    old = publisher_of(nodes)
    started = time.monotonic()
    await fleet.kill(old)  # no revoke: its keep-alives just stop
    rest = [b for b in nodes if b is not old]
    await until(lambda: len(holders(rest)) == 1, 3 * TTL)
    takeover = time.monotonic() - started
    print(f"takeover after the publisher died: {takeover:.1f} s (TTL {TTL} s)")
    assert TTL - 2 <= takeover <= TTL + 3
    assert all(old.node_id not in b.facts().peer_intro_points for b in rest)
    seen = await watch.check()
    assert seen[-1] != (old.node_id,)


# The member killed below may be the raft leader: etcd then elects another (election timeout
# 1 s), and on 2 loaded cores that took long enough that a 4-s lease (trusted for 3 s after a
# keep-alive was sent) lapsed once in a while and the publisher stepped down and came back.
# That is the safe reaction to an outage longer than the lease allows; "changes nothing" is
# about a TTL that covers a leader election, as the default 10 s does: 8 s here.
ONE_MEMBER_TTL = 8


async def test_losing_one_member_of_three_changes_nothing(fleet: Fleet, etcd: EtcdCluster) -> None:
    nodes = await three(fleet, ttl=ONE_MEMBER_TTL)
    watch = NeverTwo(nodes)
    publisher = publisher_of(nodes)
    term = publisher.status().term
    before = {b.node_id: b.counters.role_changes for b in nodes}
    # Every client starts on the first endpoint: kill exactly that member.
    assert {b.client.endpoint for b in nodes} == {etcd.members[0].endpoint}
    etcd.kill(etcd.members[0].name)
    await asyncio.sleep(3 * TTL)
    assert holders(nodes) == [publisher.node_id]
    assert publisher.status().term == term
    counters = {b.node_id: b.status().counters for b in nodes}
    assert {n: c["role_changes"] for n, c in counters.items()} == before, counters
    assert all(c["leases_lost"] == 0 for c in counters.values()), counters
    assert all(b.client.rotations >= 1 for b in nodes)
    assert await publisher.may_publish()
    publisher.clear_changed()
    nodes[1 if publisher is nodes[0] else 0].report_intro_points([b"after-member-loss"])
    await asyncio.wait_for(publisher.changed.wait(), 5)
    assert await watch.check() == [(publisher.node_id,)]


async def test_quorum_loss_keeps_the_view_never_two_publishers_and_recovers(
    fleet: Fleet, etcd: EtcdCluster
) -> None:
    nodes = await three(fleet)
    watch = NeverTwo(nodes)
    publisher = publisher_of(nodes)
    views = {b.node_id: dict(b.facts().peer_intro_points) for b in nodes}
    started = time.monotonic()
    etcd.kill("m2")
    etcd.kill("m3")
    # No keep-alive can be answered without quorum: the publisher steps down within the TTL.
    await until(lambda: not holders(nodes), TTL + 1)
    step_down = time.monotonic() - started
    print(f"quorum lost: publisher stepped down after {step_down:.1f} s (TTL {TTL} s)")
    assert not any([await b.may_publish() for b in nodes])
    # Nobody publishes, and every node keeps what it knew: the last published descriptor stays
    # at the HSDirs, and each node keeps serving its own intro points.
    await asyncio.sleep(TTL)
    assert not holders(nodes)
    assert {b.node_id: dict(b.facts().peer_intro_points) for b in nodes} == views
    etcd.restart("m2", wait=False)
    etcd.restart("m3", wait=False)
    healed = time.monotonic()
    await until(lambda: len(holders(nodes)) == 1, 30)
    print(f"quorum back: a publisher again after {time.monotonic() - healed:.1f} s")
    await until(lambda: all(len(b.facts().peer_intro_points) == 2 for b in nodes), 15)
    assert await publisher_of(nodes).may_publish()
    seen = await watch.check()
    assert seen[0] == (publisher.node_id,) and () in seen


async def test_a_node_cut_off_from_etcd_steps_down_within_the_ttl(
    fleet: Fleet, etcd: EtcdCluster
) -> None:
    cutters = [TcpCutter("127.0.0.1", m.client_port) for m in etcd.members]
    for cutter in cutters:
        await cutter.start()
    try:
        a = fleet.start("node-a", endpoints=[c.endpoint for c in cutters])
        await until(lambda: a.is_publisher, 15)  # the first node to campaign publishes
        b = fleet.start("node-b")
        c = fleet.start("node-c")
        nodes = [a, b, c]
        await until(lambda: all(len(x.facts().peer_intro_points) == 2 for x in nodes), 10)
        watch = NeverTwo(nodes)
        started = time.monotonic()
        for cutter in cutters:
            cutter.cut()
        await until(lambda: not a.is_publisher, TTL)
        step_down = time.monotonic() - started
        assert not await a.may_publish()
        await until(lambda: len(holders([b, c])) == 1, 2 * TTL)
        takeover = time.monotonic() - started
        print(f"cut off: stepped down after {step_down:.1f} s, takeover after {takeover:.1f} s")
        assert step_down < TTL - 1 + 0.5  # TTL minus the margin, plus a loaded machine
        assert takeover > step_down
        for cutter in cutters:
            cutter.heal()
        # Back in touch: its old lease has expired, so it rejoins as a standby.
        await until(lambda: a.status().connected and len(a.facts().peer_intro_points) == 2, 15)
        assert a.counters.leases_lost >= 1
        assert not a.is_publisher
        await watch.check()
    finally:
        for cutter in cutters:
            await cutter.close()


async def test_a_node_without_the_right_certificate_cannot_register(
    fleet: Fleet, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    a = fleet.start("node-a")
    await until(lambda: a.is_publisher, 15)
    caplog.set_level(logging.INFO, logger="rustbalance.cluster.etcd_backend")
    intruders = [
        fleet.start("node-b", client_cert=cert(pki, "node-a", foreign=True)),  # untrusted CA
        fleet.start("node-b", client_cert=cert(pki, "stranger")),  # trusted CA, no such user
        fleet.start("node-c", client_cert=cert(pki, "node-b")),  # another node's identity
    ]
    await asyncio.sleep(TTL)
    for intruder in intruders:
        assert not intruder.is_publisher
        assert intruder.last_error is not None
        assert not await intruder.may_publish()
    assert "permission denied" in (intruders[1].last_error or "")
    assert "permission denied" in (intruders[2].last_error or "")
    assert a.facts().peer_intro_points == {}
    assert a.is_publisher and await a.may_publish()
    for intruder in intruders:
        status = intruder.status()
        assert not status.registered
        assert status.last_error == intruder.last_error
    assert a.status().registered
    # Each failing kind of call (lease, watch, write) is logged once, not at every retry,
    # even while they alternate; and a lease that works does not clear a refused write.
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged, "the refusals are logged"
    assert len(logged) <= 3 * len(intruders), [r.getMessage() for r in logged]
    assert not [r for r in caplog.records if "works again" in r.getMessage()]


def test_the_client_key_must_not_be_readable_by_others(pki: TestPki, tmp_path: Path) -> None:
    who = cert(pki, "node-a")
    key = tmp_path / "key.pem"
    key.write_bytes(who.key_path.read_bytes())
    settings = EtcdConfig(ca_path=pki.ca_path, cert_path=who.cert_path, key_path=key)
    os.chmod(key, 0o600)
    assert load_tls(settings).key == who.key_path.read_bytes()
    os.chmod(key, 0o640)
    with pytest.raises(ConfigError, match="lets others read it; run: chmod 600"):
        load_tls(settings)
    link = tmp_path / "link.pem"
    link.symlink_to(key)
    os.chmod(key, 0o600)
    with pytest.raises(ConfigError, match="cannot read"):
        load_tls(EtcdConfig(ca_path=pki.ca_path, cert_path=who.cert_path, key_path=link))
    assert "BEGIN" not in repr(load_tls(settings))


async def test_after_quorum_came_back_a_killed_publisher_is_still_replaced(
    fleet: Fleet, etcd: EtcdCluster
) -> None:
    """Found on the private Tor network: after quorum came back, a SIGKILLed publisher was
    never replaced. Two causes, both in the client: closing a rotated-away channel cancelled
    the watch on it as a task cancellation (the watcher ended silently, the view froze), and a
    keep-alive on a closing channel could wait for ever (the lease keeper hung, the lease ran
    out and was never renewed)."""
    nodes = await three(fleet)
    watch = NeverTwo(nodes)
    etcd.kill("m2")
    etcd.kill("m3")
    await until(lambda: not holders(nodes), TTL + 1)
    await asyncio.sleep(TTL)
    etcd.restart("m2", wait=False)
    etcd.restart("m3", wait=False)
    await until(lambda: len(holders(nodes)) == 1, 30)
    await until(lambda: all(b.status().registered for b in nodes), 15)
    old = publisher_of(nodes)
    started = time.monotonic()
    await fleet.kill(old)
    rest = [b for b in nodes if b is not old]
    await until(lambda: len(holders(rest)) == 1, 4 * TTL)
    print(f"takeover after quorum loss and a killed publisher: {time.monotonic() - started:.1f} s")
    await watch.check()


async def test_a_watch_on_a_rotated_channel_ends_as_unavailable(
    etcd: EtcdCluster, pki: TestPki
) -> None:
    """Another call's failure moves the client to the next member and closes the old channel;
    grpc then cancels the watch on it. That must end the watch as EtcdUnavailable (its owner
    lists again on the new member), never as a cancellation of the watcher task itself, which
    a TaskGroup drops silently."""
    client = EtcdClient(etcd.endpoints, tls(pki, cert(pki, "node-a")), timeout=2)
    try:
        revision, _ = await client.get_prefix(etcd.prefix.encode())
        batches: list[WatchBatch] = []

        async def watch() -> None:
            async for batch in client.watch_prefix(etcd.prefix.encode(), revision + 1):
                batches.append(batch)

        task = asyncio.create_task(watch())
        await until(lambda: bool(batches), 5)  # the "created" answer
        client._failed(client._generation, EtcdUnavailable("a keep-alive timed out"))
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the watch did not end"
        assert not task.cancelled()
        assert isinstance(task.exception(), EtcdUnavailable), task.exception()
        # A unary call cut by the same close is EtcdUnavailable too.
        listing = asyncio.create_task(client.get_prefix(etcd.prefix.encode()))
        await asyncio.sleep(0)
        client._failed(client._generation, EtcdUnavailable("again"))
        finished, _ = await asyncio.wait([listing], timeout=5)
        assert finished and not listing.cancelled()
        assert listing.exception() is None or isinstance(listing.exception(), EtcdUnavailable)
    finally:
        await client.close()
