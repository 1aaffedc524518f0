"""tcp mode: bytes relayed untouched, timeouts, caps, SOCKS path, no descriptor leaks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os

import pytest

from rustbalance.proxy import ProxySettings, Target

from .helpers import (
    TARGET_ONION,
    closed_port,
    direct_target,
    fd_count,
    hung_listener,
    read_all,
    running_proxy,
    socks5_server,
    tcp_server,
)

LOGGER = "rustbalance.proxy"


def _onion_target(port: int = 80) -> Target:
    return Target(host=TARGET_ONION, port=port, is_onion=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_large_payloads_both_ways_arrive_byte_exact_with_half_close() -> None:
    upload = os.urandom(6 * 1024 * 1024 + 17)
    download = os.urandom(5 * 1024 * 1024 + 3)
    received: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for i in range(0, len(download), 100_000):
                writer.write(download[i : i + 100_000])
                await writer.drain()

        sending = asyncio.create_task(send())
        received.append(await read_all(reader))  # ends at the client's half-close
        await sending
        writer.write_eof()  # the download ends only after the upload did

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp")
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:

                async def upload_all() -> None:
                    writer.write(upload)
                    await writer.drain()
                    writer.write_eof()

                got, _ = await asyncio.gather(read_all(reader, 20), upload_all())
            finally:
                writer.transport.abort()
            for _ in range(200):
                if proxy.stats.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
            assert hashlib.sha256(received[0]).digest() == hashlib.sha256(upload).digest()
            assert proxy.stats.bytes_up == len(upload)
            assert proxy.stats.bytes_down == len(download)
            assert proxy.stats.total == 1 and proxy.stats.active == 0


async def test_session_log_line_counts_bytes_and_outcome(caplog: pytest.LogCaptureFixture) -> None:
    """One DEBUG line per connection (issue 17: the periodic summary is the INFO line)."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with tcp_server(_echo) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp")
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            writer.write_eof()
            assert await read_all(reader) == b"hello"
            writer.close()
            for _ in range(200):
                if proxy.stats.active == 0:
                    break
                await asyncio.sleep(0.01)
    records = [r for r in caplog.records if r.getMessage().startswith("Session #")]
    assert [r.levelno for r in records] == [logging.DEBUG]
    lines = [r.getMessage() for r in records]
    assert f"-> 127.0.0.1:{port}" in lines[0]
    assert "up=5B down=5B" in lines[0] and "outcome=ok" in lines[0]


async def test_onion_target_goes_through_socks_with_remote_dns() -> None:
    async with tcp_server(_echo) as echo_port, socks5_server(echo_port) as (socks_port, log):
        settings = ProxySettings(target=_onion_target(8080), mode="tcp", socks_port=socks_port)
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"ping through tor")
            writer.write_eof()
            assert await read_all(reader) == b"ping through tor"
            writer.close()
    # ATYP 3 = domain name: tor resolves the onion, never us (RFC 1928 §5).
    assert log.requests == [(3, TARGET_ONION.encode(), 8080)]


async def test_socks_error_reply_closes_the_client_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with socks5_server(None, reply_code=4) as (socks_port, _log):
        settings = ProxySettings(target=_onion_target(), mode="tcp", socks_port=socks_port)
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await read_all(reader) == b""
            writer.close()
            assert proxy.stats.upstream_errors == 1
    assert any("outcome=upstream_error" in r.getMessage() for r in caplog.records)


async def test_hung_socks_port_times_out_with_tor_style_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with hung_listener() as socks_port:
        settings = ProxySettings(
            target=_onion_target(), mode="tcp", socks_port=socks_port, connect_timeout=0.5
        )
        async with running_proxy(settings) as proxy:
            loop = asyncio.get_running_loop()
            start = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await read_all(reader) == b""
            elapsed = loop.time() - start
            writer.close()
            assert 0.45 <= elapsed < 2.0
            assert proxy.stats.connect_timeouts == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "SOCKS5 connect timed out after 0.5 seconds" in messages


async def test_hung_direct_target_times_out_during_tls_handshake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with hung_listener() as port:
        settings = ProxySettings(
            target=direct_target(port, use_tls=True), mode="tcp", connect_timeout=0.5
        )
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await read_all(reader) == b""
            writer.close()
    messages = [r.getMessage() for r in caplog.records]
    assert "Connect to target timed out after 0.5 seconds" in messages


async def test_idle_connection_is_closed_both_sides() -> None:
    target_saw_eof = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        await reader.read(100)  # returns b"" once the proxy closes its side
        target_saw_eof.set()

    async with tcp_server(silent) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp", idle_timeout=0.5)
        async with running_proxy(settings) as proxy:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            start = loop.time()
            assert await read_all(reader) == b""
            assert 0.4 <= loop.time() - start < 2.0
            async with asyncio.timeout(2):
                await target_saw_eof.wait()
            writer.close()
            assert proxy.stats.idle_timeouts == 1


async def test_activity_keeps_a_connection_past_the_idle_timeout() -> None:
    async with tcp_server(_echo) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp", idle_timeout=0.4)
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            for i in range(8):  # 8 x 0.15 s = 1.2 s of steady traffic, 3x the idle timeout
                writer.write(b"%d" % i)
                assert await asyncio.wait_for(reader.read(10), 2) == b"%d" % i
                await asyncio.sleep(0.15)
            writer.close()
            assert proxy.stats.idle_timeouts == 0


async def test_max_session_length_cuts_a_busy_connection() -> None:
    async with tcp_server(_echo) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp", max_session_seconds=0.5)
        async with running_proxy(settings) as proxy:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            start = loop.time()
            closed = False
            for _ in range(100):  # busy: never idle, yet cut at 0.5 s
                try:
                    writer.write(b"busy")
                    data = await asyncio.wait_for(reader.read(100), 2)
                except ConnectionError:
                    data = b""
                if not data:
                    closed = True
                    break
                await asyncio.sleep(0.05)
            assert closed
            assert 0.45 <= loop.time() - start < 2.0
            writer.transport.abort()
            assert proxy.stats.session_timeouts == 1


async def test_connections_over_the_cap_are_closed_at_once() -> None:
    async with tcp_server(_echo) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp", max_connections=2)
        async with running_proxy(settings) as proxy:
            held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
            for reader, writer in held:  # both relayed, so both are counted
                writer.write(b"ok")
                assert await asyncio.wait_for(reader.read(10), 2) == b"ok"
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(10), 2) == b""
            writer.transport.abort()
            assert proxy.stats.rejected == 1
            for _, held_writer in held:
                held_writer.close()


async def test_close_drains_in_flight_then_cuts_the_rest() -> None:
    async with tcp_server(_echo) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp")
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"a")
            assert await asyncio.wait_for(reader.read(1), 2) == b"a"
            loop = asyncio.get_running_loop()
            start = loop.time()
            await proxy.close(drain_timeout=0.3)
            assert 0.25 <= loop.time() - start < 2.0
            assert proxy.stats.active == 0
            assert await read_all(reader) == b""
            writer.transport.abort()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_500_failed_connections_leave_no_descriptors_behind() -> None:
    with hung_listener() as hung:
        refused = closed_port()
        timing_out = ProxySettings(
            target=_onion_target(), mode="tcp", socks_port=hung, connect_timeout=0.05
        )
        failing = ProxySettings(target=direct_target(refused), mode="http")
        async with running_proxy(timing_out) as p1, running_proxy(failing) as p2:
            baseline = fd_count()

            async def one(port: int) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    await read_all(reader)
                except ConnectionError:
                    pass
                finally:
                    writer.transport.abort()

            for _ in range(10):  # 10 x 50 = 500 failures, 25 of each kind per batch
                await asyncio.gather(
                    *(one(p1.port) for _ in range(25)), *(one(p2.port) for _ in range(25))
                )
            for _ in range(100):
                if fd_count() <= baseline and p1.stats.active == 0 and p2.stats.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert fd_count() <= baseline
            assert p1.stats.connect_timeouts == 250
            assert p2.stats.upstream_errors == 250
