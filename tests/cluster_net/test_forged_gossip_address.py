"""Issue 16, finding 7 end to end: an IPv6 zone id in a peer's address must not forge a log line.

In protocol v2 any token holder gossiped peer addresses. In v3 a node learns another node's
address only from its master-signed admission record (a hello carries the sender's own), so a
hostile address needs the master key, or a bug in whoever signed it. Either way the record's
parser applies the shared endpoint rule: a real coordinator on 127.0.0.1 receives a correctly
signed hello whose record names ``[fe80::1%<zone>]:9`` with a newline in the zone. Before the
rule refused such zone ids the node would have adopted the address, sent to it, and logged the
failed send with the newline, the second half reading as a log line of its own. Now the
datagram is dropped as malformed, the node learns nothing and every record it logs stays on
one line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from rustbalance.cluster.authority import DOMAIN, Statement
from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import RejectReason, Sender
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.proxy.eventloop import ENV_VAR, run
from tests.cluster_net.support import (
    GRACE,
    INTERVAL,
    LOCALHOST,
    TIMEOUT,
    cluster,
    free_udp_ports,
    make_node,
    wait_until,
)
from tests.trust import MASTER, node_key, record

# Same length as the forged zone: the record is built with this valid zone, then the bytes are
# swapped before signing (the record class would refuse to build the forged one).
VALID_ZONE = "aaaaaaaaaaa"
FORGED_ZONE = "a\nWARNING x"


def hello(sender: str, address: str, *, forge: bool) -> bytes:
    """A hello from ``sender`` carrying its own master-signed record naming ``address``; with
    ``forge``, ``VALID_ZONE`` in the record becomes ``FORGED_ZONE`` before it is signed."""
    content = record(sender, coordination=address)
    body = content.body()
    if forge:
        assert body.count(VALID_ZONE.encode()) == 1
        body = body.replace(VALID_ZONE.encode(), FORGED_ZONE.encode())
    signature = MASTER.sign(DOMAIN + bytes([content.kind]) + body)
    statement = Statement(content, bytes([content.kind]) + body + signature)
    key = node_key(sender)
    now = time.time()
    return Sender(sender, key, boot_time=now, randbytes=os.urandom).hello(statement, now)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_zone_id_with_a_newline_in_a_record_is_dropped_and_never_logged(
    loop: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On uvloop (what ``rustbalance run`` uses in http mode) and on the stock loop: their
    datagram transports report a failed send differently."""
    caplog.set_level(logging.DEBUG, logger="rustbalance")
    monkeypatch.setenv(ENV_VAR, loop)
    adopted, dropped = run(_send_hello(f"[fe80::1%{VALID_ZONE}]:9", forge=True), mode="http")
    forged = [r.getMessage() for r in caplog.records if {"\n", "\r"} & set(r.getMessage())]
    assert forged == [], f"log records spanning two lines: {forged!r}"
    assert adopted is None, f"the node adopted the address {adopted!r}"
    assert dropped == 1


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_ipv6_member_of_an_ipv4_node_does_not_stop_its_coordination(
    loop: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid address of the other family cannot be reached from an IPv4 socket. uvloop
    raises ValueError (not OSError) for it from sendto, which ended the coordinator's task:
    one authentic message stopped a node's coordination. The send must fail like any other
    (logged once, on one line) and the node keep running."""
    caplog.set_level(logging.DEBUG, logger="rustbalance")
    monkeypatch.setenv(ENV_VAR, loop)
    adopted, dropped = run(_send_hello("[fd00::1]:9", forge=False), mode="http")
    assert adopted == "[fd00::1]:9"  # a valid, master-signed record: adopted, though unreachable
    assert dropped == 0


def _address(node: Coordinator[IntroPoint], node_id: str) -> str | None:
    member = node.membership.member(node_id)
    return member.coordination if member is not None else None


async def _send_hello(address: str, *, forge: bool) -> tuple[str | None, int]:
    """Send ``hello("evil", address, ...)`` to a running coordinator; the address it then
    holds for ``evil`` and how many malformed datagrams it dropped. Fails if the coordinator's
    task ends."""
    (port,) = free_udp_ports(1)
    async with cluster() as c:
        node = make_node("target", 5, port, [], None)
        await c.start(node)
        await wait_until(lambda: node.is_publisher, TIMEOUT + GRACE + 2, "target to publish")
        malformed_before = node.rejected[RejectReason.MALFORMED]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # A plain sendto: uvloop has no sock_sendto, and a datagram to 127.0.0.1 never blocks.
            sock.sendto(hello("evil", address, forge=forge), (LOCALHOST, port))
            # Either outcome ends the wait: dropped (fixed) or the address adopted (the bug).
            await wait_until(
                lambda: (
                    node.rejected[RejectReason.MALFORMED] > malformed_before
                    or _address(node, "evil") is not None
                ),
                3.0,
                "the hello to be handled",
            )
            # Long enough for messages to an adopted address (and their failures) to be logged.
            await asyncio.sleep(3 * INTERVAL)
        finally:
            sock.close()
        assert not c.tasks["target"].done(), "the coordinator's task ended"
        return _address(node, "evil"), node.rejected[RejectReason.MALFORMED] - malformed_before
