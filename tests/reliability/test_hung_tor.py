"""Fault matrix: tor's control port hangs (the process lives, nothing answers).

End to end (real tor, real signal): the node's managed tor is SIGSTOPped and left stopped. The
kernel still accepts connections on its control port, but no reply ever comes, so the daemon
sees its commands time out (10 s) and its reconnects fail at PROTOCOLINFO. The watchdog's
process check alone would call that tor healthy; the daemon treats a control port that has
given no working session for two watchdog intervals as hung: WARNING "... treating it as hung",
then the Phase 1.2 restart ("Tor process is not running, attempting restart", "Tor restarted via
managed process"), new intro points, a new descriptor, and the master address answers a fresh
client again. ``rustbalance status`` answers throughout (the daemon itself never hangs).

The unit test drives the hung-detection state with a stand-in for the tor process and a manual
clock: which states count as hung is pure logic, no Tor needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rustbalance.node.watchdog import TOR_HUNG_INTERVALS, GuardedTor
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.tor.process import pid_is_alive
from tests.node_e2e import running_node
from tests.torhelpers import get_with_retries

WATCHDOG_INTERVAL = 15.0  # the default
COMMAND_TIMEOUT = 10.0  # the controller's default command timeout
# A command is issued at least every 10 s (consensus watch) and times out after 10 s; then the
# session must stay down for TOR_HUNG_INTERVALS intervals, seen by a check every interval.
HUNG_NOTICED_WITHIN = 2 * COMMAND_TIMEOUT + (TOR_HUNG_INTERVALS + 1) * WATCHDOG_INTERVAL + 10.0


class _ProcessAlive:
    """Stand-in for a tor process that is alive (the hung case: the process check passes)."""

    def __init__(self) -> None:
        self.restarts = 0

    async def is_running(self) -> bool:
        return True

    async def restart(self) -> None:
        self.restarts += 1


async def test_guarded_tor_counts_a_lasting_lost_control_session_as_down() -> None:
    now = [0.0]
    connected = [True]
    tor = _ProcessAlive()
    guarded = GuardedTor(
        tor,  # type: ignore[arg-type]
        connected=lambda: connected[0],
        hung_after=30.0,
        clock=lambda: now[0],
    )
    assert await guarded.is_running()
    connected[0] = False
    assert await guarded.is_running()  # first sight of a lost session: not yet
    now[0] = 29.0
    assert await guarded.is_running()
    connected[0] = True  # a reconnect in between resets the clock
    now[0] = 31.0
    assert await guarded.is_running()
    connected[0] = False
    now[0] = 40.0
    assert await guarded.is_running()
    now[0] = 70.0
    assert not await guarded.is_running()
    assert guarded.running is False
    await guarded.restart()
    now[0] = 71.0
    assert await guarded.is_running()  # the restart starts a fresh count
    # Without a controller to ask (None), only the process check counts.
    plain = GuardedTor(tor)  # type: ignore[arg-type]
    assert await plain.is_running()


@pytest.mark.tor
async def test_hung_tor_is_detected_and_restarted(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    with running_node(tor_network, tmp_path / "node") as node:
        await asyncio.to_thread(node.wait_published)
        client = await asyncio.to_thread(tor_client_factory)
        socks = client.socks_address
        assert socks is not None
        body = await get_with_retries(socks, node.address, isolation="hung-before")
        assert body.strip() == "hello from node-a-target"
        old_tor = node.tor_pid()
        assert old_tor is not None
        stopped_at = time.time()
        os.kill(old_tor, signal.SIGSTOP)
        try:
            timed_out = await asyncio.to_thread(
                node.wait_line, r"no reply from tor within", 3 * COMMAND_TIMEOUT, after=stopped_at
            )
            # The daemon is not stuck behind tor: status answers while tor hangs.
            doc = await asyncio.to_thread(node.process.status)
            assert doc["node_id"] == "node-a"
            hung = await asyncio.to_thread(
                node.wait_line,
                r"control port has not answered for \d+ s: treating it as hung$",
                HUNG_NOTICED_WITHIN,
                after=stopped_at,
            )
            assert hung.level == "WARNING"
            down = await asyncio.to_thread(
                node.wait_line,
                r"^Tor process is not running, attempting restart$",
                10,
                after=hung.at - 1,
            )
            restarted = await asyncio.to_thread(
                node.wait_line, r"^Tor restarted via managed process$", 150, after=down.at
            )
        finally:
            # Never leave a stopped tor behind, whatever happened above.
            if pid_is_alive(old_tor):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old_tor, signal.SIGCONT)
        assert not pid_is_alive(old_tor)  # the hung tor was killed, not left running
        new_tor = node.tor_pid()
        assert new_tor is not None and new_tor != old_tor and pid_is_alive(new_tor)
        published = await asyncio.to_thread(
            node.wait_line, r"^Published descriptor for", 180, after=restarted.at
        )
        # A fresh client, as the docstring says: this one has no cached descriptor and no
        # recent-HSDir-request memory (tor's 15-minute REND_HID_SERV_DIR_REQUERY_PERIOD), so what
        # it measures is the restarted node, not the old client's refetch budget. A client holding
        # the old descriptor across a node's loss is the availability tests' subject.
        fresh = await asyncio.to_thread(tor_client_factory)
        assert fresh.socks_address is not None
        body = await get_with_retries(
            fresh.socks_address, node.address, isolation="hung-after", deadline_s=180
        )
        answered = time.time()
        assert body.strip() == "hello from node-a-target"
        doc = await asyncio.to_thread(node.process.status)
        assert doc["tor"]["restarts"] == 1
        assert doc["tor"]["running"] is True
        assert node.process.poll() is None
        print(
            f"\nhung tor: first command timeout {timed_out.at - stopped_at:.1f} s after SIGSTOP, "
            f"hung {hung.at - stopped_at:.1f} s, restarted {restarted.at - stopped_at:.1f} s, "
            f"republished {published.at - stopped_at:.1f} s, "
            f"master answered {answered - stopped_at:.1f} s after SIGSTOP"
        )
