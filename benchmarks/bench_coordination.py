"""What per-node identities cost (issue 16): coordination v3 against the v2 shared-token seal.

Protocol v2 sealed one heartbeat once with ChaCha20-Poly1305 under the shared cluster key and
sent the same bytes to every peer. Protocol v3 seals it once per recipient with ``crypto_box``
between the two nodes' keys, and the publisher signs its statement (Ed25519); a receiver opens
the box and checks the relayed publisher statement (one Ed25519 verification). Both sides are
measured in the same run, the v2 side re-created here from its format (tests/cluster/legacy_v2.py).

Reported per node and heartbeat, for N = 2, 9, 49 peers: the sender's work, one receiver's
work, and the ratios v3 / v2; plus applying a full membership message (64 statements, every
signature checked) once, and again when it is already held.
"""

from __future__ import annotations

import os
import statistics
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from benchmarks.results import record
from rustbalance.cluster.authority import NO_GRANT, AdmissionRecord, Statement
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.messages import (
    Heartbeat,
    PublisherReport,
    PublisherStatement,
    Receiver,
    Role,
    Sender,
)
from rustbalance.crypto.keys import IdentityKey

PEERS = (2, 9, 49)
RUNS = 30


def _median_ms(fn: Callable[[], object], runs: int = RUNS) -> float:
    fn()
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1000


def _v2(n: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the sender's work for one heartbeat to n peers, one receiver's work for it)."""
    key = HKDF(hashes.SHA256(), 32, None, b"rustbalance cluster coordination v2").derive(b"t" * 43)
    aead = ChaCha20Poly1305(key)
    body = struct.pack(">QQB", 1, 1, 1) + os.urandom(120)
    header = b"\x02\x06node-a"
    nonce = os.urandom(12)
    datagram = header + nonce + aead.encrypt(nonce, body, header)

    def send() -> None:  # one seal, the same bytes to every peer
        fresh = os.urandom(12)
        aead.encrypt(fresh, body, header)

    def receive() -> None:
        aead.decrypt(datagram[len(header) : len(header) + 12], datagram[len(header) + 12 :],
                     header)  # fmt: skip

    del n
    return send, receive


def _v3(n: int) -> tuple[Callable[[], object], Callable[[], object]]:
    names = [f"node-{i}" for i in range(n + 1)]
    keys = {name: NodeKey.generate() for name in names}
    public = {name: key.public for name, key in keys.items()}
    sender = Sender("node-0", keys["node-0"], boot_time=time.time(), randbytes=os.urandom)
    receiver = Receiver("node-1", keys["node-1"], public.get, b"\x00" * 32)

    def heartbeat(stamp: tuple[int, int]) -> Heartbeat:
        statement = PublisherStatement.sign(keys["node-0"], "node-0", 7, *stamp)
        return Heartbeat(Role.PUBLISHER, 7, b"\x01" * 32, None, True, b"\x02" * 32,
                         PublisherReport(statement, 0, 0))  # fmt: skip

    def send() -> None:  # the statement signed once, the heartbeat sealed per recipient
        stamp = sender.reserve(time.time())
        beat = heartbeat(stamp)
        for name in names[1:]:
            sender.seal(beat, stamp, name, public[name])

    def receive() -> None:  # a fresh datagram each time (a replay would be refused)
        now = time.time()
        stamp = sender.reserve(now)
        beat = heartbeat(stamp)
        datagram = sender.seal(beat, stamp, "node-1", public["node-1"])
        began = time.perf_counter()
        envelope = receiver.receive(datagram, now)
        assert not isinstance(envelope, str)
        assert beat.believed_publisher is not None
        beat.believed_publisher.statement.verify(public["node-0"])  # the coordinator's check
        receive.elapsed += time.perf_counter() - began  # type: ignore[attr-defined]

    receive.elapsed = 0.0  # type: ignore[attr-defined]
    return send, receive


def _membership_apply() -> tuple[float, float]:
    master = IdentityKey.generate(os.urandom)
    now = int(time.time() * 1000)
    statements = [
        Statement.sign(
            AdmissionRecord(f"node-{i}", NodeKey.generate().public, now, i, False, False,
                            f"10.0.0.{i + 1}:51821", None, NO_GRANT, 0, "node-0"),
            master.sign,
        )
        for i in range(64)
    ]  # fmt: skip

    def fresh() -> None:
        m = Membership(master.public_key)
        for s in statements:
            m.apply_bytes(s.data, now)

    held = Membership(master.public_key)
    for s in statements:
        held.apply_bytes(s.data, now)

    def again() -> None:
        for s in statements:
            held.apply_bytes(s.data, now)

    return _median_ms(fresh, 10), _median_ms(again, 10)


def _receive_ms(receive: Callable[[], object]) -> float:
    """Median of the receiving part only (the v3 closure times itself: it builds each datagram
    first, which is the sender's work)."""
    samples = []
    for _ in range(RUNS):
        before = getattr(receive, "elapsed", None)
        began = time.perf_counter()
        receive()
        if before is None:
            samples.append(time.perf_counter() - began)
        else:
            samples.append(receive.elapsed - before)  # type: ignore[attr-defined]
    return statistics.median(samples) * 1000


def run() -> list[str]:
    lines = [
        "## Coordination: per-node identities (v3) against the shared token (v2)",
        "",
        "The work of one node per heartbeat, median of 30 runs, milliseconds. Sending to N peers:",
        "v2 seals once with ChaCha20-Poly1305 under the shared key; v3 signs the publisher",
        "statement once and seals the heartbeat with `crypto_box` for each recipient. Receiving",
        "one heartbeat: v2 opens it; v3 opens the box and checks the relayed statement's",
        "signature.",
        "",
        "| peers | send v2 | send v3 | v3 / v2 | receive v2 | receive v3 | v3 / v2 |",
        "|---|---|---|---|---|---|---|",
    ]
    per_interval = 0.0
    rows = []
    for n in PEERS:
        send2, receive2 = _v2(n)
        send3, receive3 = _v3(n)
        s2, s3 = _median_ms(send2), _median_ms(send3)
        r2, r3 = _receive_ms(receive2), _receive_ms(receive3)
        lines.append(
            f"| {n} | {s2:.3f} | {s3:.3f} | {s3 / s2:.0f} | {r2:.3f} | {r3:.3f} | {r3 / r2:.0f} |"
        )
        rows.append({"peers": n, "send_v2_ms": s2, "send_v3_ms": s3, "receive_v2_ms": r2,
                     "receive_v3_ms": r3})  # fmt: skip
        per_interval = s3 + n * r3  # one heartbeat sent, one received from every peer
    fresh, again = _membership_apply()
    record("coordination", "per_heartbeat", rows)
    record("coordination", "membership_64_records_ms", {"first": fresh, "held": again})
    record("coordination", "cpu_share_49_peers_percent", per_interval / 50)
    lines += [
        "",
        f"Applying a full membership message (64 master-signed records): {fresh:.1f} ms the",
        f"first time (every signature checked), {again:.2f} ms when already held.",
        f"With {PEERS[-1]} peers a node spends about {per_interval:.1f} ms per heartbeat interval",
        f"(5 s by default) on this: {per_interval / 50:.2f} % of one core.",
    ]
    return lines
