"""Issue 16, finding 7 end to end: a gossiped IPv6 zone id must not forge a log line.

A real coordinator on 127.0.0.1 receives an authentic heartbeat (right cluster token) whose
list of known peers names ``[fe80::1%<zone>]:9`` with a newline in the zone. Before the shared
endpoint rule refused such zone ids, the node adopted the address, heartbeated to it, and the
failed send was logged with the newline: the second half read as a log line of its own.
Now the datagram is dropped as malformed, the node learns nothing and every log record it
writes stays on one line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from rustbalance.cluster.messages import (
    ClusterKey,
    Heartbeat,
    RejectReason,
    Role,
    encode_body,
)
from rustbalance.proxy.eventloop import ENV_VAR, run
from tests.cluster_net.support import (
    GRACE,
    INTERVAL,
    LOCALHOST,
    TIMEOUT,
    TOKEN,
    cluster,
    free_udp_ports,
    make_node,
    wait_until,
)

# Same length as the forged zone: the heartbeat is built with this valid zone, then the bytes
# are swapped before sealing (the message classes would refuse to build the forged one).
VALID_ZONE = "aaaaaaaaaaa"
FORGED_ZONE = "a\nWARNING x"


def gossip(key: ClusterKey, now: float, address: str, forge: bool) -> bytes:
    """An authentic standby heartbeat from ``mallory`` that names ``evil`` at ``address``;
    with ``forge``, ``VALID_ZONE`` in it becomes ``FORGED_ZONE`` after encoding."""
    payload = Heartbeat(Role.STANDBY, 50, 0, bytes(32), None, False, (("evil", address),))
    seq = int(now * 1000)
    body = encode_body(seq, seq, payload)
    if forge:
        assert body.count(VALID_ZONE.encode()) == 1
        body = body.replace(VALID_ZONE.encode(), FORGED_ZONE.encode())
    return key.seal("mallory", body, os.urandom(12))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_gossiped_zone_id_with_a_newline_is_dropped_and_never_logged(
    loop: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On uvloop (what ``rustbalance run`` uses in http mode) and on the stock loop: their
    datagram transports report a failed send differently."""
    caplog.set_level(logging.DEBUG, logger="rustbalance")
    monkeypatch.setenv(ENV_VAR, loop)
    adopted, dropped = run(_send_gossip(f"[fe80::1%{VALID_ZONE}]:9", forge=True), mode="http")
    forged = [r.getMessage() for r in caplog.records if {"\n", "\r"} & set(r.getMessage())]
    assert forged == [], f"log records spanning two lines: {forged!r}"
    assert adopted is None, f"the node adopted the gossiped address {adopted!r}"
    assert dropped == 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_ipv6_peer_gossiped_to_an_ipv4_node_does_not_stop_its_coordination(
    loop: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid address of the other family cannot be reached from an IPv4 socket. uvloop
    raises ValueError (not OSError) for it from sendto, which ended the coordinator's task:
    one authentic heartbeat stopped a node's coordination. The send must fail like any other
    (logged once, on one line) and the node keep running."""
    caplog.set_level(logging.DEBUG, logger="rustbalance")
    monkeypatch.setenv(ENV_VAR, loop)
    adopted, dropped = run(_send_gossip("[fd00::1]:9", forge=False), mode="http")
    assert adopted == "[fd00::1]:9"  # valid, authentic gossip: adopted, though unreachable
    assert dropped == 0


async def _send_gossip(address: str, *, forge: bool) -> tuple[str | None, int]:
    """Send ``gossip(...)`` to a running coordinator; the address it then holds for ``evil``
    and how many malformed datagrams it dropped. Fails if the coordinator's task ends."""
    (port,) = free_udp_ports(1)
    async with cluster() as c:
        node = make_node("target", 5, port, [], None)
        await c.start(node)
        await wait_until(lambda: node.is_publisher, TIMEOUT + GRACE + 2, "target to publish")
        malformed_before = node.rejected[RejectReason.MALFORMED]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # A plain sendto: uvloop has no sock_sendto, and a datagram to 127.0.0.1 never blocks.
            datagram = gossip(ClusterKey(TOKEN), time.time(), address, forge)
            sock.sendto(datagram, (LOCALHOST, port))
            # Either outcome ends the wait: dropped (fixed) or the address adopted (the bug).
            await wait_until(
                lambda: (
                    node.rejected[RejectReason.MALFORMED] > malformed_before
                    or node.peers.address_of("evil") is not None
                ),
                3.0,
                "the forged heartbeat to be handled",
            )
            # Long enough for heartbeats to an adopted address (and their failures) to be logged.
            await asyncio.sleep(3 * INTERVAL)
        finally:
            sock.close()
        assert not c.tasks["target"].done(), "the coordinator's task ended"
        return node.peers.address_of("evil"), node.rejected[
            RejectReason.MALFORMED
        ] - malformed_before
