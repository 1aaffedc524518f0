"""Fault matrix: one node's clock off by more than ``coordination.clock_skew_tolerance_secs``.

Real clock skew, not a mock: the skewed node runs under libfaketime (Debian package
``faketime``; ``FAKETIME=+30s`` or ``-30s`` moves its wall clock, the monotonic clock stays
real, as with a wrong NTP setting). The nodes are real coordinator processes
(tests/cluster_net/node_runner.py: the daemon's own Coordinator, sealed UDP on 127.0.0.1)
without tor: skew only touches coordination, and leaving tor out keeps the test to seconds.

Expected behaviour, and why:

- the healthy nodes drop every datagram of the skewed node as ``future`` (its clock is ahead)
  or ``stale`` (behind), count it per reason (``rustbalance status``: ``cluster.rejected``;
  ``/metrics``: rejected messages) and log it, rate-limited, with a hint to check the clock;
- nothing the skewed node sends changes their state: it never becomes a live peer, their
  publisher and election term stay as they were, even though the skewed node has the best
  priority and would otherwise take the lease;
- the skewed node cannot authenticate anyone either (the check is symmetric), so it is
  isolated exactly like a partitioned node: it sees no live peer and, alone, publishes for
  itself (its own intro points, a valid descriptor, so clients it gets are still served). It
  cannot be kept from that without trusting messages that failed the timestamp check, which
  would reopen the replay window the check closes (a replayed heartbeat of a dead publisher
  would then block the takeover);
- once the clock is right (the node restarted without the offset) it joins, and the cluster
  agrees on exactly one publisher again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_e2e.cluster_helpers import free_udp_ports, wait_for
from tests.reliability.helpers import LIBFAKETIME, Runner, write_master_key

INTERVAL, TIMEOUT, GRACE = 0.5, 1.5, 1.5
TOLERANCE = 5.0
SKEW_SECS = 30.0  # six times the tolerance
# Long enough for several heartbeat timeouts and takeover graces to pass.
OBSERVE_SECS = 8.0
MAX_LIFETIME = 120.0


@contextlib.contextmanager
def _cluster(work: Path) -> Iterator[dict[str, Runner]]:
    master = write_master_key(work / "master.key")
    names = ("node-a", "node-b", "node-s")  # node-s: the skewed one, best priority
    priorities = {"node-a": 20, "node-b": 30, "node-s": 10}
    ports = dict(zip(names, free_udp_ports(len(names)), strict=True))
    runners: dict[str, Runner] = {}
    for name in names:
        runners[name] = Runner(
            work,
            name,
            {
                "node_id": name,
                "priority": priorities[name],
                "listen": f"127.0.0.1:{ports[name]}",
                "peers": [f"127.0.0.1:{ports[n]}" for n in names if n != name],
                "master_key_path": str(master),
                "node_key_path": str(work / f"{name}.node.key"),
                "interval": INTERVAL,
                "timeout": TIMEOUT,
                "grace": GRACE,
                "skew_tolerance": TOLERANCE,
                "max_lifetime": MAX_LIFETIME,
            },
        )
    try:
        yield runners
    finally:
        for runner in runners.values():
            runner.stop()


@pytest.mark.parametrize(
    ("offset", "seen_as", "sees_others_as"),
    [("+30s", "future", "stale"), ("-30s", "stale", "future")],
)
def test_skewed_node_is_rejected_and_changes_nothing(
    tmp_path: Path, offset: str, seen_as: str, sees_others_as: str
) -> None:
    assert LIBFAKETIME.is_file(), "libfaketime missing: make deps installs the faketime package"
    with _cluster(tmp_path) as nodes:
        a, b, s = nodes["node-a"], nodes["node-b"], nodes["node-s"]
        a.start()
        b.start()

        def formed() -> bool:
            da, db = a.last(), b.last()
            return bool(
                da
                and db
                and da["live"] == ["node-b"]
                and db["live"] == ["node-a"]
                and da["publisher"] == db["publisher"] == "node-a"
            )

        wait_for(formed, 30, "node-a and node-b to agree on node-a as publisher", 0.2)
        before = {n.name: n.last() for n in (a, b)}
        marks = {n.name: n.lines_seen() for n in (a, b)}
        s.start(faketime=offset)
        # The offset really is in effect for node-s (its wall clock as it reports it).
        wait_for(lambda: s.last() is not None, 20, "node-s to report", 0.2)
        time.sleep(OBSERVE_SECS)
        skew = s.statuses()[-1]["wall"] - time.time()
        assert abs(skew - float(offset[:-1])) < 3.0, skew

        for node in (a, b):
            seen = node.statuses(marks[node.name])
            assert seen, node.name
            start_doc = before[node.name]
            assert start_doc is not None
            for doc in seen:
                assert "node-s" not in doc["live"], doc
                assert doc["publisher"] == "node-a", doc
                assert doc["term"] == start_doc["term"], doc
            end = seen[-1]
            # Every heartbeat of node-s (2 per second) was dropped and counted for its reason.
            assert end["rejected"].get(seen_as, 0) >= OBSERVE_SECS, end
            assert set(end["rejected"]) <= {seen_as}, end  # not forged: the key is right
            log = node.err.read_text()
            assert f": {seen_as}" in log and "clock" in log, log
        assert a.last() is not None and a.last()["role"] == "publisher"  # type: ignore[index]

        # node-s hears nobody: isolated like a partitioned node, it serves alone.
        s_docs = s.statuses()
        assert all(doc["live"] == [] for doc in s_docs), s_docs[-1]
        assert s_docs[-1]["rejected"].get(sees_others_as, 0) >= OBSERVE_SECS, s_docs[-1]
        assert s_docs[-1]["publisher"] == "node-s"

        # The clock fixed (node-s restarted without the offset): one cluster, one publisher.
        s.stop()
        mark_s = s.lines_seen()
        s.start()

        def healed() -> bool:
            docs = [a.last(), b.last(), s.statuses(mark_s)[-1] if s.statuses(mark_s) else None]
            if any(d is None for d in docs):
                return False
            pubs = {d["publisher"] for d in docs if d}
            return len(pubs) == 1 and all(len(d["live"]) == 2 for d in docs if d)

        took = wait_for(healed, 30, "the cluster to re-form with one publisher", 0.2)
        print(f"\nclock skew {offset}: rejected as {seen_as}; re-formed {took:.1f} s after the fix")
