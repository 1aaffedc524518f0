"""An attacker as a process, for tests/ops/test_trust_e2e.py (issue 16).

It holds what a leak could give: the cluster token and join secret of the protocol v2 cluster
this one was upgraded from, an *expired* join token (with its passphrase), the public admission
record of a real node (records travel in hellos), and keys of its own. It never holds a node key
of the cluster or the master key. With those it tries everything the review of issue 16 did:

- over UDP to every node's coordination port: v2 datagrams sealed with the old token (heartbeats
  as ``-`` with priority 0, a huge term, another node's intro points, a lease claim); v3
  datagrams sealed with its own key but naming real nodes and invented ones; hellos with its own
  record signed by a master key of its own, and with a real node's genuine record (which it
  cannot sign for);
- through tor to the master onion: the v2 join (``POST /.rb/<old secret>`` with the old token),
  and the v3 join with the expired grant (its clock set back, so the client-side check passes).

Usage: ``python -m tests.ops.trust_attacker <settings.json> <result.json>``; the settings name
``ports`` (the nodes' coordination ports on 127.0.0.1), ``node_ids``, ``socks`` ([host, port]),
``master_onion``, ``old_token``, ``old_join_secret``, ``expired_token``, ``passphrase``,
``real_record`` (base64), ``rounds`` and ``join_rounds`` (tries with the expired grant: each
reaches a random node, and only the ones holding the master key admit). The result lists
every HTTP status and body it got and how many datagrams it sent. Bounded: every network wait
has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from python_socks.async_.asyncio import Proxy

from rustbalance.cluster.authority import NO_GRANT, AdmissionRecord, Statement, decode_statement
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.messages import Heartbeat, IntroPoints, LeaseRelease, Role, Sender
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.deploy.join_token import JoinPayload, decode
from rustbalance.node.join import JoinError, JoinRequest, join_via_onion
from rustbalance.testnet.apps import http_get_via_tor
from tests.cluster.legacy_v2 import V2, v2_key

HEARTBEAT_V2 = 1
INTRO_POINTS_V2 = 2
LEASE_CLAIM_V2 = 3


def _v2(token: bytes, sender: str, kind: int, payload: bytes, seq: int) -> bytes:
    """A v2 datagram (see tests/cluster/legacy_v2.py) with any payload, sealed with the token."""
    now_ms = int(time.time() * 1000)
    raw = sender.encode()
    header = bytes([V2, len(raw)]) + raw
    body = struct.pack(">QQB", seq, now_ms, kind) + payload
    nonce = os.urandom(12)
    return header + nonce + v2_key(token).encrypt(nonce, body, header)


def _v2_payloads() -> list[tuple[str, int, bytes]]:
    digest = bytes(32)
    heartbeat = (  # role publisher, priority 0, term 2^64-2, no peers, no report
        bytes([1]) + struct.pack(">IQ", 0, 2**64 - 2) + digest + b"\x00\x01" + b"\x00\x00" + b"\x00"
    )
    points = struct.pack(">H", 1) + struct.pack(">H", 5) + b"evil!"
    claim = struct.pack(">QI", 2**64 - 2, 0)
    return [
        ("-", HEARTBEAT_V2, heartbeat),
        ("node-b", INTRO_POINTS_V2, points),
        ("node-a", LEASE_CLAIM_V2, claim),
        ("ghost-1", HEARTBEAT_V2, heartbeat),
    ]


def _udp(settings: dict[str, Any], master_public: bytes) -> int:
    """Every datagram, to every node; returns how many were sent."""
    token = settings["old_token"].encode()
    own_key = NodeKey.generate()
    fake_master = IdentityKey.generate(os.urandom)
    real_record = decode_statement(base64.b64decode(settings["real_record"]), master_public)
    real_id = real_record.content.node_id  # type: ignore[union-attr]
    own_record = Statement.sign(
        AdmissionRecord("mallory", own_key.public, int(time.time() * 1000), 0, True, True,
                        "127.0.0.1:9", None, NO_GRANT, 0, "mallory"),
        fake_master.sign,
    )  # fmt: skip
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(settings["rounds"]):
            for port in settings["ports"]:
                seq = int(time.time() * 1000)
                for i, (claimed, kind, payload) in enumerate(_v2_payloads()):
                    sock.sendto(_v2(token, claimed, kind, payload, seq + i), ("127.0.0.1", port))
                    sent += 1
                for name in [*settings["node_ids"], "-", "0-ghost"]:
                    # Sealed with our own key, naming a real member (or an invented id): the
                    # box cannot open under the member's key; an invented id is unknown.
                    forger = Sender(name, own_key, boot_time=time.time(), randbytes=os.urandom)
                    for target_id in settings["node_ids"]:
                        stamp = forger.reserve(time.time())
                        heartbeat = Heartbeat(Role.PUBLISHER, 2**64 - 2, bytes(32), None, True,
                                              bytes(32))  # fmt: skip
                        for payload_v3 in (heartbeat, IntroPoints((b"evil!",)), LeaseRelease(1)):
                            datagram = forger.seal(payload_v3, stamp, target_id, own_key.public)
                            sock.sendto(datagram, ("127.0.0.1", port))
                            sent += 1
                hello = Sender("mallory", own_key, boot_time=time.time(), randbytes=os.urandom)
                sock.sendto(hello.hello(own_record, time.time()), ("127.0.0.1", port))
                impostor = Sender(real_id, own_key, boot_time=time.time(), randbytes=os.urandom)
                sock.sendto(impostor.hello(real_record, time.time()), ("127.0.0.1", port))
                sent += 2
            time.sleep(0.2)
    return sent


async def _http_post(socks: tuple[str, int], host: str, path: str, body: bytes) -> tuple[int, str]:
    """One POST through tor on a fresh circuit: (status, body); (0, error) when it failed."""
    proxy = Proxy.from_url(f"socks5://{os.urandom(8).hex()}:x@{socks[0]}:{socks[1]}", rdns=True)
    try:
        async with asyncio.timeout(60):
            sock = await proxy.connect(host, 80)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            data = await reader.read()
            writer.close()
    except Exception as exc:  # python-socks raises its own types
        return 0, type(exc).__name__
    head, _, answer = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), answer.decode("utf-8", "replace")


async def _joins(settings: dict[str, Any]) -> list[dict[str, Any]]:
    socks = (settings["socks"][0], int(settings["socks"][1]))
    host = settings["master_onion"]
    results: list[dict[str, Any]] = []
    old = json.dumps({"v": 1, "node_id": "mallory", "cluster_token": settings["old_token"],
                      "wg_public_key": base64.b64encode(bytes(range(32))).decode(),
                      "wg_endpoint": "198.51.100.66:51820", "coordination_port": 51821,
                      "request_time": int(time.time())}).encode()  # fmt: skip
    # The expired token: decoded with the clock set back to when it was valid.
    payload: JoinPayload = decode(
        settings["expired_token"],
        settings["passphrase"],
        now=int(settings["expired_token_issued_at"]) + 10,  # its clock set back
    )
    key = NodeKey.generate()
    request = JoinRequest("mallory", key.public, os.urandom(32), "198.51.100.66:51820", 51821, 20,
                          int(time.time()), payload.grant, payload.grant_secret)  # fmt: skip
    for attempt in range(settings["join_rounds"]):
        if attempt < settings["rounds"]:
            path = "/.rb/" + settings["old_join_secret"]
            status, body = await _http_post(socks, host, path, old)
            results.append({"what": "v2 join with the old token", "status": status, "body": body})
        try:
            answer = await join_via_onion(socks, host, request, key, attempts=1,
                                          attempt_timeout=60)  # fmt: skip
            results.append({"what": "expired grant", "status": 200, "body": repr(answer)})
        except JoinError as exc:
            status = 404 if "(404)" in str(exc) else 0
            results.append({"what": "expired grant", "status": status, "body": str(exc)})
    return results


async def _main(settings: dict[str, Any]) -> dict[str, Any]:
    master_public = decode_onion_address(settings["master_onion"])
    sent = await asyncio.to_thread(_udp, settings, master_public)
    joins = await _joins(settings)
    # And the master address still answers (the test checks from outside, too).
    socks = (settings["socks"][0], int(settings["socks"][1]))
    try:
        status, _ = await http_get_via_tor(
            socks, settings["master_onion"], isolation="attacker-get", timeout=60
        )
    except Exception:  # python-socks raises its own types
        status = 0
    return {"datagrams_sent": sent, "joins": joins, "master_get": status}


if __name__ == "__main__":
    doc = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    result = asyncio.run(_main(doc))
    Path(sys.argv[2]).write_text(json.dumps(result), encoding="utf-8")
