"""Phase 1 survival behaviours of the node daemon, end to end on the private Tor network.

- 1.2 watchdog: SIGKILL the node's managed tor; with the default 15 s interval the watchdog
  notices, restarts tor, the node republishes new intro points and a fresh Tor client reaches
  the master address again; the daemon itself never stops.
- 1.3 timeouts: an onion target whose tor hangs (SIGSTOPped after publishing, so tor's SOCKS
  CONNECT never completes) closes proxy connections at the connect timeout with the Phase 1.3
  log line; a plain target that accepts and never answers closes them at the idle timeout, also
  through Tor; after 500 such connections the daemon's open fds are back to baseline.
- 1.4 publish retries: uploads fail while the node's tor has ``DisableNetwork 1`` (set on its
  control port: a real tor fault); the log shows retries after about 5/10/20 s, each after a
  fresh control session, then a success once the network is back. A failure of only the
  next-period upload (a controlled fault, see FaultInjectedNodeProcess) keeps the current one.

Figures are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from python_socks.async_.asyncio import Proxy

from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.process import pid_is_alive
from tests.node_e2e import RunningNode, running_node
from tests.torhelpers import get_with_retries

# Phase 1.2: default watchdog interval and settle time.
WATCHDOG_INTERVAL = 15.0
# Scheduling slack on a loaded 2-core machine (the check itself runs systemctl-free /proc).
SLACK = 5.0


def _fetch_socks(client: TorInstance) -> tuple[str, int]:
    assert client.socks_address is not None
    return client.socks_address


# ----------------------------------------------------------------------------- 1.2 watchdog


@pytest.mark.tor
async def test_watchdog_restarts_killed_tor_and_service_recovers(
    tor_network: PrivateTorNetwork,
    tor_client_factory: Callable[[], TorInstance],
    tmp_path: Path,
) -> None:
    with running_node(tor_network, tmp_path / "node") as node:
        await asyncio.to_thread(node.wait_published)
        old_tor = node.tor_pid()
        assert old_tor is not None and pid_is_alive(old_tor)
        # Start a fresh client meanwhile (it bootstraps while tor is down and restarting).
        client_task = asyncio.create_task(asyncio.to_thread(tor_client_factory))
        killed_at = time.time()
        os.kill(old_tor, signal.SIGKILL)

        down = await asyncio.to_thread(
            node.wait_line,
            r"^Tor process is not running, attempting restart$",
            WATCHDOG_INTERVAL + 30,
            after=killed_at,
        )
        assert down.level == "WARNING"
        restarted = await asyncio.to_thread(
            node.wait_line, r"^Tor restarted via managed process$", 150, after=killed_at
        )
        assert restarted.level == "INFO"
        detect = down.at - killed_at
        restart_took = restarted.at - down.at
        # Default interval: noticed within one check interval (+ scheduling slack).
        assert detect <= WATCHDOG_INTERVAL + SLACK, detect
        new_tor = node.tor_pid()
        assert new_tor is not None and new_tor != old_tor and pid_is_alive(new_tor)
        assert not pid_is_alive(old_tor)

        # The new tor has new intro points (keys are per circuit): read, then published.
        changed = await asyncio.to_thread(
            node.wait_line, r"^Own intro points changed: \d+ now", 150, after=restarted.at
        )
        published = await asyncio.to_thread(
            node.wait_line, r"^Published descriptor for", 150, after=changed.at
        )
        client = await client_task
        body = await get_with_retries(
            _fetch_socks(client), node.address, isolation="after-restart", deadline_s=180
        )
        answered = time.time()
        assert body.strip() == "hello from node-a-target"

        doc = await asyncio.to_thread(node.process.status)
        assert doc["tor"]["restarts"] == 1
        assert doc["tor"]["running"] is True
        assert doc["intro_points"]["own"] > 0
        assert node.process.poll() is None  # the daemon kept running throughout
        assert "Tor cannot be restarted" not in node.process.log_text()
        print(
            f"\nwatchdog: noticed {detect:.1f} s after SIGKILL, restart took {restart_took:.1f} s,"
            f" new intro points published {published.at - killed_at:.1f} s after the kill,"
            f" master answered a fresh client {answered - killed_at:.1f} s after the kill"
        )


# ----------------------------------------------------------------------------- 1.3 timeouts


@contextlib.asynccontextmanager
async def _silent_target() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP server on 127.0.0.1 that accepts, reads and never answers. Yields (port, a list
    holding the number of open connections)."""
    open_now = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now[0] += 1
        try:
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
        finally:
            open_now[0] -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    try:
        yield int(server.sockets[0].getsockname()[1]), open_now
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await server.wait_closed()


async def _request_until_closed(
    port: int, *, limit: float = 60.0, host: str = "x.onion"
) -> tuple[float, bytes]:
    """Send one GET to the proxy on 127.0.0.1:port; (seconds until it closed, bytes read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        got = b""
        async with asyncio.timeout(limit):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    got += chunk
        return time.monotonic() - started, got
    finally:
        writer.close()


@contextlib.contextmanager
def _stopped(inst: TorInstance) -> Iterator[None]:
    """SIGSTOP a tor (by PID); always SIGCONT it afterwards so it can be stopped cleanly."""
    assert inst.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        inst.signal(signal.SIGCONT)


@pytest.mark.tor
async def test_socks_connect_to_hung_onion_times_out(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    """(a) Why a hung onion service and not a missing descriptor: tor answers a CONNECT to an
    address without a descriptor at once (SOCKS "Host unreachable" after every HSDir said
    NOT_FOUND, 0.3 s on this network). A published service whose tor is stopped (SIGSTOP) keeps
    tor's SOCKS CONNECT pending (observed: over 100 s, up to SocksTimeout 120 s)."""
    connect_timeout = 5
    async with _silent_target() as (app_port, _):
        service = await asyncio.to_thread(
            tor_network.add_onion_service, f"hung{secrets.token_hex(2)}", {80: app_port}
        )
        try:
            onion = service.onion_address
            assert onion is not None
            # Wait until the service is reachable (descriptor published, intro points up).
            socks = _fetch_socks(tor_network.clients[0])
            await _wait_onion_connects(socks, onion)
            with (
                _stopped(service),
                running_node(
                    tor_network,
                    tmp_path / "node",
                    name="node-hung",
                    overrides={
                        "target": {
                            "address": f"{onion}:80",
                            "connect_timeout_secs": connect_timeout,
                        }
                    },
                ) as node,
            ):
                await asyncio.to_thread(node.wait_tor_ready)
                results = await asyncio.gather(
                    *(_request_until_closed(node.proxy_port) for _ in range(3))
                )
                for took, got in results:
                    assert connect_timeout - 0.2 <= took <= connect_timeout + SLACK, took
                    assert got.startswith(b"HTTP/1.1 502"), got[:80]
                lines = node.lines(rf"^SOCKS5 connect timed out after {connect_timeout} seconds$")
                assert len(lines) == 3
                assert all(line.level == "WARNING" for line in lines)
                doc = await asyncio.to_thread(node.process.status)
                assert doc["proxy"]["connect_timeouts"] == 3
                assert doc["proxy"]["active"] == 0
                print(
                    f"\nconnect timeout {connect_timeout} s: connections closed after "
                    + ", ".join(f"{t:.2f}" for t, _ in results)
                    + " s"
                )
        finally:
            tor_network.remove(service)


async def _wait_onion_connects(socks: tuple[str, int], onion: str, limit: float = 150) -> None:
    deadline = time.monotonic() + limit
    attempt = 0
    last: BaseException | None = None
    while time.monotonic() < deadline:
        attempt += 1
        proxy = Proxy.from_url(f"socks5://svc{attempt}:x@{socks[0]}:{socks[1]}", rdns=True)
        try:
            sock = await proxy.connect(onion, 80, timeout=30)
        except Exception as exc:  # python-socks raises its own types
            last = exc
            await asyncio.sleep(2)
            continue
        sock.close()
        return
    raise AssertionError(f"{onion} not reachable within {limit} s: {last!r}")


@pytest.mark.tor
async def test_idle_timeout_and_no_fd_leak_after_500_connections(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    idle = 3
    async with _silent_target() as (app_port, open_at_target):
        with running_node(
            tor_network,
            tmp_path / "node",
            name="node-idle",
            overrides={
                "target": {
                    "address": f"127.0.0.1:{app_port}",
                    "connect_timeout_secs": 2,
                    "idle_timeout_secs": idle,
                }
            },
        ) as node:
            await asyncio.to_thread(node.wait_published)
            # (b) through Tor: a client's request to the master address idles out.
            socks = _fetch_socks(tor_network.clients[0])
            through_tor = await _idle_via_tor(socks, node.address)
            assert idle - 0.2 <= through_tor <= idle + 2 * SLACK, through_tor
            # Directly at the proxy: the idle timeout to the tenth of a second.
            direct = await asyncio.gather(
                *(_request_until_closed(node.proxy_port) for _ in range(5))
            )
            for took, got in direct:
                assert idle - 0.1 <= took <= idle + SLACK, took
                assert got == b""  # cut, no response invented

            # (c) 500 connections, then the fds are back to the baseline.
            await _wait_quiet(node, open_at_target)
            baseline = node.open_fds()
            before = (await asyncio.to_thread(node.process.status))["proxy"]
            started = time.monotonic()
            for _batch in range(2):  # 2 x 250 at once (the test process has fds too)
                closed = await asyncio.gather(
                    *(_request_until_closed(node.proxy_port, limit=90) for _ in range(250))
                )
                assert all(idle - 0.1 <= t <= 60 for t, _ in closed)
            burst = time.monotonic() - started
            after_fds = await _wait_quiet(node, open_at_target)
            doc = await asyncio.to_thread(node.process.status)
            assert doc["proxy"]["active"] == 0
            assert doc["proxy"]["total"] - before["total"] == 500
            assert doc["proxy"]["idle_timeouts"] - before["idle_timeouts"] == 500
            assert after_fds <= baseline + 5, (baseline, after_fds)
            assert node.process.poll() is None
            print(
                f"\nidle timeout {idle} s: via Tor closed after {through_tor:.2f} s, directly "
                + ", ".join(f"{t:.2f}" for t, _ in direct)
                + f" s; 500 connections in {burst:.1f} s; fds {baseline} before, {after_fds} after"
            )


async def _idle_via_tor(socks: tuple[str, int], onion: str, limit: float = 150) -> float:
    """Seconds from sending a request through Tor until the node's proxy cut it (retrying the
    connection itself until the onion service is reachable)."""
    deadline = time.monotonic() + limit
    attempt = 0
    while True:
        attempt += 1
        proxy = Proxy.from_url(f"socks5://idle{attempt}:x@{socks[0]}:{socks[1]}", rdns=True)
        try:
            sock = await proxy.connect(onion, 80, timeout=30)
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(2)
            continue
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {onion}\r\n\r\n".encode())
            await writer.drain()
            started = time.monotonic()
            async with asyncio.timeout(60):
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
            return time.monotonic() - started
        finally:
            writer.close()


async def _wait_quiet(node: RunningNode, open_at_target: list[int], limit: float = 30) -> int:
    """Wait until no proxied connection is open at the target and the daemon's fd count is
    stable for 2 s; return it."""
    deadline = time.monotonic() + limit
    last = -1
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = node.open_fds()
        if now != last:
            last, stable_since = now, time.monotonic()
        elif open_at_target[0] == 0 and time.monotonic() - stable_since >= 2:
            return now
        await asyncio.sleep(0.25)
    return last


# ----------------------------------------------------------------------------- 1.4 retries


@pytest.mark.tor
async def test_failed_uploads_are_retried_with_backoff_and_partial_publish_is_kept(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    fault_file = tmp_path / "fault"
    with running_node(
        tor_network,
        tmp_path / "node",
        name="node-retry",
        fault_file=fault_file,
        overrides={"publish": {"refresh_interval_secs": 30, "upload_timeout_secs": 6}},
    ) as node:
        await asyncio.to_thread(node.wait_published)
        ctrl = await ControlConnection.connect(node.control_address, timeout=10)
        try:
            # -- every upload fails while the node's tor has no network (real tor) --------
            cut_at = time.time()
            await ctrl.set_conf({"DisableNetwork": "1"})
            first = await asyncio.to_thread(
                node.wait_line, r"^Failed to publish descriptor: ", 30 + 60, after=cut_at
            )
            await asyncio.to_thread(
                node.wait_line, r"^Publish retry 2/3 failed: ", 120, after=first.at
            )
            await ctrl.set_conf({"DisableNetwork": "0"})
            restored_at = time.time()
            success = await asyncio.to_thread(
                node.wait_line,
                r"^Published descriptor for .* period \(retry 3/3\)$",
                60,
                after=first.at,
            )
        finally:
            await ctrl.close()
        retry_lines = node.lines(r"^Retrying publish in [\d.]+s \(retry \d/3\)$", after=first.at)
        assert len(retry_lines) == 3
        ups = node.lines(r"^control session to .* up$", after=first.at)
        gaps: list[tuple[float, float]] = []
        for k, line in enumerate(retry_lines, start=1):
            delay = float(line.message.split()[3].removesuffix("s"))
            base = 5.0 * 2 ** (k - 1)
            assert base <= delay <= base * 1.25, (k, delay)  # backoff(attempt, 5, 30)
            # Each retry starts with a fresh control session, after the backoff delay.
            up = next(u for u in ups if u.at > line.at)
            gaps.append((delay, up.at - line.at))
            assert delay - 0.1 <= up.at - line.at <= delay + SLACK
        assert len(ups) >= 3
        assert not node.lines(r"^Failed to publish after 3 retries$", after=first.at)

        # -- only the next-period upload fails (controlled fault): current is kept --------
        before = (await asyncio.to_thread(node.process.status))["last_publish"]
        fault_file.write_text("next")
        fault_at = time.time()
        try:
            failed_next = await asyncio.to_thread(
                node.wait_line,
                r"^Failed to publish next period descriptor: .*injected test fault",
                90,
                after=fault_at,
            )
        finally:
            fault_file.unlink()
        partial = node.lines(r"^Published descriptor for current period$", after=fault_at)
        assert partial and partial[0].at <= failed_next.at
        doc = await asyncio.to_thread(node.process.status)
        pub = doc["last_publish"]
        if pub["results"]["next"]["ok"] is False:  # no later round has run yet
            assert pub["results"]["current"]["ok"] is True
            assert pub["current"] > before["current"]
            assert pub["next"] == before["next"]  # the older success is kept, not erased
        assert pub["consecutive_failures"] == 0  # a partial publish is a success
        # No retry round for a partial publish.
        assert not node.lines(r"^Retrying publish", after=fault_at)
        # The current descriptor serves clients.
        socks = _fetch_socks(tor_network.clients[0])
        body = await get_with_retries(socks, node.address, isolation="partial")
        assert body.strip() == "hello from node-retry-target"
        assert node.process.poll() is None
        print(
            "\npublish retries (announced delay, seconds until the next control session): "
            + ", ".join(f"{d:.1f}/{g:.1f}" for d, g in gaps)
            + f"; success {success.at - restored_at:.1f} s after the network came back"
        )
