"""Per-circuit limits through a real proxy, fed the PROXY lines tor writes
(``HiddenServiceExportCircuitID haproxy``); the unix socket listener; the summary line.

The PROXY line here is the exact line tor writes (tor's own test vector is checked in
test_wire.py); the end-to-end test through a real tor is in tests/proxy/test_front_door_tor.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest

from rustbalance.proxy import CircuitLimits, ProxyError, ProxySettings
from rustbalance.proxy.wire import tor_proxy_line

from .helpers import MASTER, direct_target, read_all, running_proxy, tcp_server
from .test_front_door import answer, scripted_target

LOGGER = "rustbalance.proxy"
_GET = b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n"


def _settings(port: int, **kwargs: object) -> ProxySettings:
    return ProxySettings(
        target=direct_target(port),
        master_onion=MASTER,
        circuit_ids=True,
        **kwargs,  # type: ignore[arg-type]
    )


async def _talk(port: int, data: bytes, *, wait: float = 0.2) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await asyncio.sleep(wait)
        writer.write_eof()
        return await read_all(reader, 5)
    finally:
        writer.transport.abort()


async def test_the_circuit_id_reaches_the_target_as_a_header_and_cannot_be_forged() -> None:
    async with (
        scripted_target(answer(b"ok")) as (port, seen),
        running_proxy(_settings(port, circuit_header="X-Tor-Circuit-Id")) as proxy,
    ):
        forged = b"GET / HTTP/1.1\r\nHost: x\r\nX-Tor-Circuit-Id: 1\r\n\r\n"
        got = await _talk(proxy.port, tor_proxy_line(666) + forged)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"ok")
    received = seen.received()
    assert received.count(b"x-tor-circuit-id") == 1
    assert b"x-tor-circuit-id: 666\r\n" in received
    assert b"PROXY" not in received  # the line is tor's, not the target's


async def test_without_the_header_setting_the_target_sees_no_circuit() -> None:
    async with scripted_target(answer(b"ok")) as (port, seen), running_proxy(_settings(port)) as p:
        await _talk(p.port, tor_proxy_line(666) + _GET)
    assert b"circuit" not in seen.received().lower()


async def test_a_stream_without_tors_proxy_line_is_a_local_client_without_limits() -> None:
    """tor writes its line before any byte of the client's, so a stream that does not start
    with ``PROXY `` did not come through tor (curl on the node, a monitor): it is served,
    counted against no circuit."""
    limits = CircuitLimits(max_connections=1, rate=0.001, burst=1)
    async with (
        scripted_target(answer(b"ok")) as (port, seen),
        running_proxy(_settings(port, circuit_limits=limits)) as proxy,
    ):
        for _ in range(3):
            assert (await _talk(proxy.port, _GET)).endswith(b"ok")
        assert proxy.stats.circuits_cut == proxy.stats.throttled == 0
    assert seen.received().count(b"GET /page HTTP/1.1") == 3


async def test_a_broken_proxy_line_is_closed_unanswered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with scripted_target(answer(b"ok")) as (port, seen), running_proxy(_settings(port)) as p:
        broken = b"PROXY TCP6 fc00:dead:beef:4dad::1 ::1 1\r\n"
        assert await _talk(p.port, broken + _GET) == b""
        assert p.stats.bad_requests == 1
    assert seen.received() == b""
    assert "HiddenServiceExportCircuitID" in caplog.text


async def test_a_circuit_opening_too_many_streams_is_cut_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Circuit 7 holds its streams open and opens one more than allowed: all of its
    connections are closed, a WARNING names it, the metric counts it, its next stream is
    refused at once, and circuit 8 is served all along."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    limits = CircuitLimits(max_connections=4, rate=1000, burst=1000, cut_seconds=30)
    async with (
        scripted_target(answer(b"ok")) as (port, _seen),
        running_proxy(_settings(port, circuit_limits=limits)) as proxy,
    ):
        held = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(tor_proxy_line(7))
            held.append((reader, writer))
        other = await asyncio.open_connection("127.0.0.1", proxy.port)
        other[1].write(tor_proxy_line(8))
        await asyncio.sleep(0.3)
        assert proxy.stats.circuits_cut == 0
        fifth = await _talk(proxy.port, tor_proxy_line(7) + _GET)
        assert fifth == b""
        for reader, writer in held:
            assert await read_all(reader, 3) == b""  # closed by the proxy
            writer.transport.abort()
        assert proxy.stats.circuits_cut == 1
        assert await _talk(proxy.port, tor_proxy_line(7) + _GET) == b""  # refused while cut
        assert proxy.stats.circuit_refused == 1
        other[1].write(_GET)
        head = await asyncio.wait_for(other[0].readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")  # the other circuit never noticed
        other[1].transport.abort()
    cuts = [r for r in caplog.records if r.getMessage().startswith("Cut circuit 7:")]
    assert len(cuts) == 1 and cuts[0].levelno == logging.WARNING
    assert "5 streams at once" in cuts[0].getMessage()


async def test_a_circuit_over_its_request_rate_gets_429_then_is_cut() -> None:
    limits = CircuitLimits(max_connections=0, rate=1, burst=4, cut_seconds=30)
    async with (
        scripted_target(answer(b"ok")) as (port, _seen),
        running_proxy(_settings(port, circuit_limits=limits)) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(tor_proxy_line(9))
        statuses = []
        try:
            for _ in range(4):  # the stream took one token: 3 requests pass, the 4th is 429
                writer.write(_GET)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                statuses.append(int(head[9:12]))
                if statuses[-1] == 200:
                    await reader.readexactly(2)
        finally:
            writer.transport.abort()
        assert statuses == [200, 200, 200, 429]
        assert proxy.stats.throttled == 1
        # It goes on: each new stream costs a token too, and the debt reaches a burst.
        answers = [await _talk(proxy.port, tor_proxy_line(9) + _GET, wait=0.05) for _ in range(4)]
        assert proxy.stats.circuits_cut == 1
        assert answers[-1] == b""
        assert all(a == b"" or a.startswith(b"HTTP/1.1 429 ") for a in answers)
        # Another circuit is served at once.
        ok = await _talk(proxy.port, tor_proxy_line(10) + _GET)
        assert ok.startswith(b"HTTP/1.1 200 ")


async def test_cut_circuits_are_closed_in_tor_when_the_proxy_can_ask_it() -> None:
    asked: list[int] = []

    async def close_circuit(circuit: int) -> None:
        asked.append(circuit)

    limits = CircuitLimits(max_connections=1, rate=0, cut_seconds=30)
    async with (
        scripted_target(answer(b"ok")) as (port, _seen),
        running_proxy(_settings(port, circuit_limits=limits), close_circuit=close_circuit) as p,
    ):
        first = await asyncio.open_connection("127.0.0.1", p.port)
        first[1].write(tor_proxy_line(2**32 - 1))
        await asyncio.sleep(0.2)
        await _talk(p.port, tor_proxy_line(2**32 - 1))
        await asyncio.sleep(0.2)
        first[1].transport.abort()
    assert asked == [2**32 - 1]


# -- tcp mode gets the same limits where they apply -----------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_tcp_mode_reads_the_proxy_line_and_relays_only_the_rest() -> None:
    async with tcp_server(_echo) as port:
        settings = _settings(port, mode="tcp")
        async with running_proxy(settings) as proxy:
            got = await _talk(proxy.port, tor_proxy_line(5) + b"hello through tor")
    assert got == b"hello through tor"


async def test_tcp_mode_cuts_a_circuit_holding_too_many_streams() -> None:
    limits = CircuitLimits(max_connections=2, rate=0, cut_seconds=30)
    async with (
        tcp_server(_echo) as port,
        running_proxy(_settings(port, mode="tcp", circuit_limits=limits)) as proxy,
    ):
        held = []
        for _ in range(2):
            pair = await asyncio.open_connection("127.0.0.1", proxy.port)
            pair[1].write(tor_proxy_line(11) + b"x")
            held.append(pair)
        await asyncio.sleep(0.3)
        assert await _talk(proxy.port, tor_proxy_line(11) + b"third") == b""
        for reader, writer in held:
            assert await read_all(reader, 3) == b"x"  # echoed, then cut
            writer.transport.abort()
        assert proxy.stats.circuits_cut == 1
        assert await _talk(proxy.port, tor_proxy_line(12) + b"other") == b"other"


async def test_tcp_mode_a_stream_over_the_rate_is_closed() -> None:
    limits = CircuitLimits(max_connections=0, rate=0.001, burst=2, cut_seconds=30)
    async with (
        tcp_server(_echo) as port,
        running_proxy(_settings(port, mode="tcp", circuit_limits=limits)) as proxy,
    ):
        answers = [await _talk(proxy.port, tor_proxy_line(13) + b"x") for _ in range(3)]
        assert answers == [b"x", b"x", b""]
        assert proxy.stats.throttled == 1


async def test_tcp_mode_the_proxy_line_must_arrive_within_the_head_timeout() -> None:
    async with (
        tcp_server(_echo) as port,
        running_proxy(_settings(port, mode="tcp", head_timeout=0.3)) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"PROXY TCP6 ")  # and nothing more
        try:
            assert await read_all(reader, 3) == b""
        finally:
            writer.transport.abort()
        assert proxy.stats.head_timeouts == 1


# -- the unix socket (tor's HiddenServicePort 80 unix:PATH) ----------------------------------


async def _unix_get(path: Path) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(_GET)
        await asyncio.sleep(0.2)
        writer.write_eof()
        return await read_all(reader, 5)
    finally:
        writer.transport.abort()


async def test_the_proxy_listens_on_a_unix_socket_0660(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o750)
    path = folder / "proxy.sock"
    async with scripted_target(answer(b"via unix")) as (port, _seen):
        settings = ProxySettings(target=direct_target(port), listen_unix=str(path))
        async with running_proxy(settings) as proxy:
            mode = os.lstat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
            got = await _unix_get(path)
            assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"via unix")
            assert proxy.port == 0
        assert not path.exists()  # removed when the proxy closes
        # A stale socket left by a crash is replaced.
        stale = ProxySettings(target=direct_target(port), listen_unix=str(path), unix_mode=0o600)
        async with running_proxy(stale):
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            async with running_proxy(stale):
                assert (await _unix_get(path)).endswith(b"via unix")


async def test_a_unix_socket_path_that_is_not_safe_is_refused(tmp_path: Path) -> None:
    target = direct_target(1)
    taken = tmp_path / "file"
    taken.write_text("not a socket")
    with pytest.raises(ProxyError, match="exists and is not a socket"):
        async with running_proxy(ProxySettings(target=target, listen_unix=str(taken))):
            pass
    assert taken.read_text() == "not a socket"
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(ProxyError, match="writable by others"):
        async with running_proxy(
            ProxySettings(target=target, listen_unix=str(open_folder / "p.sock"))
        ):
            pass
    with pytest.raises(ProxyError, match="0660 or tighter"):
        ProxySettings(target=target, listen_unix="/run/x.sock", unix_mode=0o666)


# -- logging: per-connection lines are DEBUG, one INFO summary per period --------------------


async def test_connections_log_at_debug_and_a_summary_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with scripted_target(answer(b"ok")) as (port, _seen):
        settings = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings, summary_seconds=0.5) as proxy:
            for _ in range(3):
                await _talk(proxy.port, _GET, wait=0.05)
            await _talk(proxy.port, b"NOT HTTP\r\n\r\n", wait=0.05)
            await asyncio.sleep(0.8)
            quiet = len([r for r in caplog.records if r.getMessage().startswith("Proxy, last")])
            await asyncio.sleep(1.1)  # nothing happened meanwhile: no more summary lines
            again = len([r for r in caplog.records if r.getMessage().startswith("Proxy, last")])
    sessions = [r for r in caplog.records if r.getMessage().startswith("Session #")]
    assert len(sessions) == 4 and {r.levelno for r in sessions} == {logging.DEBUG}
    summaries = [r for r in caplog.records if r.getMessage().startswith("Proxy, last")]
    assert quiet == again == 1 and summaries[0].levelno == logging.INFO
    text = summaries[0].getMessage()
    assert "4 connections (0 open), 3 requests" in text and "1 errors" in text
    assert "0 circuits cut" in text
