"""tcp mode's zero-copy relay (splice(2) through a pipe) and its fallback to the stream relay."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.proxy import ProxySettings, relay
from tests.proxy.helpers import (
    HttpClient,
    counting_splice,
    direct_target,
    fd_count,
    read_all,
    running_proxy,
    tcp_server,
)

pytestmark = pytest.mark.skipif(not relay.splice_supported(), reason="needs Linux splice(2)")


@pytest.fixture
def splice_calls() -> Iterator[list[int]]:
    """Counts the splice(2) calls the relay makes (and the bytes each moved)."""
    with counting_splice() as calls:
        yield calls


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "streams"])
async def test_both_ways_byte_exact_with_half_close_and_counters(
    splice: bool, splice_calls: list[int]
) -> None:
    upload = os.urandom(9 * 1024 * 1024 + 5)
    download = os.urandom(7 * 1024 * 1024 + 11)
    received: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_all(reader))  # ends at the client's half-close
        for i in range(0, len(download), 300_000):  # only then the download, then FIN
            writer.write(download[i : i + 300_000])
            await writer.drain()
        writer.write_eof()

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp")
        async with running_proxy(settings, splice=splice) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(upload)
                await writer.drain()
                writer.write_eof()
                got = await read_all(reader, 20)
            finally:
                writer.transport.abort()
            for _ in range(200):
                if proxy.stats.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
            assert hashlib.sha256(received[0]).digest() == hashlib.sha256(upload).digest()
            assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (len(upload), len(download))
            assert proxy.stats.active == 0
    if splice:
        # In and out of the pipes; what the transports read before the pause is sent as is.
        assert sum(splice_calls) > len(upload) + len(download)
    else:
        assert splice_calls == []


async def test_greeting_sent_before_the_relay_starts_arrives_with_its_eof(
    splice_calls: list[int],
) -> None:
    # A server-first protocol: the target speaks (and closes) at once, before the proxy has
    # paused its transport; the buffered bytes and the EOF must both be passed on.
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        writer.write_eof()
        assert await read_all(reader) == b"QUIT\r\n"

    async with (
        tcp_server(greeter) as port,
        running_proxy(ProxySettings(target=direct_target(port), mode="tcp")) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"QUIT\r\n")  # sent before the proxy connected upstream
        try:
            assert await read_all(reader) == b"220 hello\r\n"
            writer.write_eof()
        finally:
            await asyncio.sleep(0.05)
            writer.transport.abort()
        for _ in range(200):
            if proxy.stats.active == 0:
                break
            await asyncio.sleep(0.01)
        assert proxy.stats.bytes_down == len(b"220 hello\r\n")
        assert proxy.stats.bytes_up == len(b"QUIT\r\n")


async def test_slow_reader_gets_everything_through_backpressure(splice_calls: list[int]) -> None:
    # The client reads nothing for a while: the relay must stop reading from the target
    # (dst full -> wait for writable) and resume later without losing a byte.
    download = os.urandom(48 * 1024 * 1024)

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(download)
        await writer.drain()
        writer.write_eof()
        await read_all(reader)

    async with (
        tcp_server(target) as port,
        running_proxy(ProxySettings(target=direct_target(port), mode="tcp")) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
        try:
            await asyncio.sleep(0.5)
            # Stalled: far less than the download crossed into the client's socket.
            assert proxy.stats.bytes_down < len(download)
            got = await read_all(reader, 30)
        finally:
            writer.transport.abort()
        assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
    assert splice_calls


async def test_idle_timeout_closes_both_sides(splice_calls: list[int]) -> None:
    target_saw_eof = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        await read_all(reader)
        target_saw_eof.set()

    async with tcp_server(silent) as port:
        settings = ProxySettings(target=direct_target(port), mode="tcp", idle_timeout=0.4)
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            # Traffic through the splice path keeps the session alive past the timeout ...
            for _ in range(3):
                await asyncio.sleep(0.25)
                writer.write(b"y")
            # ... then silence ends it.
            assert await read_all(reader, 5) == b""
            async with asyncio.timeout(3):
                await target_saw_eof.wait()
            writer.close()
            assert proxy.stats.idle_timeouts == 1
    assert splice_calls


async def test_target_reset_mid_stream_ends_the_session() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"partial")
        await writer.drain()
        await reader.readexactly(4)
        writer.transport.abort()  # RST while the client is still connected

    async with (
        tcp_server(resetter) as port,
        running_proxy(ProxySettings(target=direct_target(port), mode="tcp")) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            assert await reader.readexactly(7) == b"partial"
            writer.write(b"ping")
            try:
                rest = await read_all(reader, 5)
            except ConnectionError:
                rest = b""
            assert rest == b""
        finally:
            writer.transport.abort()
        for _ in range(200):
            if proxy.stats.active == 0:
                break
            await asyncio.sleep(0.01)
        assert proxy.stats.active == 0


async def test_many_spliced_sessions_leave_no_descriptors_behind() -> None:
    async with (
        tcp_server(_echo) as port,
        running_proxy(ProxySettings(target=direct_target(port), mode="tcp")) as proxy,
    ):
        relay.release_pipes()
        baseline = fd_count()

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                payload = b"%d" % i * 1000
                writer.write(payload)
                writer.write_eof()
                assert await read_all(reader) == payload
            finally:
                writer.transport.abort()

        for batch in range(5):
            await asyncio.gather(*(one(batch * 40 + i) for i in range(40)))
        for _ in range(200):
            relay.release_pipes()  # the pool keeps empty pipes for the next bursts
            if fd_count() <= baseline and proxy.stats.active == 0:
                break
            await asyncio.sleep(0.02)
        assert fd_count() <= baseline
        assert proxy.stats.total == 200


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_target_falls_back_to_the_stream_relay(
    tls_files: tuple[Path, Path], splice_calls: list[int]
) -> None:
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=context)
    port = int(server.sockets[0].getsockname()[1])
    try:
        settings = ProxySettings(
            target=direct_target(port, use_tls=True), mode="tcp", tls_ca_file=str(cert)
        )
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"over tls")  # TLS cannot half-close: no EOF to wait for
                assert await asyncio.wait_for(reader.readexactly(8), 5) == b"over tls"
            finally:
                writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()
    assert splice_calls == []


async def test_idle_spliced_connections_hold_no_pipes() -> None:
    # After traffic, an idle connection gives its pipes back: per connection only the two
    # sockets stay open in the proxy (10 000 idle connections must fit the descriptor limit).
    async with (
        tcp_server(_echo) as port,
        running_proxy(ProxySettings(target=direct_target(port), mode="tcp")) as proxy,
    ):
        relay.release_pipes()
        baseline = fd_count()
        conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(100)]
        try:
            for reader, writer in conns:
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            await asyncio.sleep(0.1)
            # client + the proxy's two + the target's one per connection, + the pool
            assert fd_count() - baseline <= 4 * len(conns) + 2 * relay._PIPE_POOL_MAX
        finally:
            for _reader, writer in conns:
                writer.transport.abort()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _addr = listener.accept()
    for sock in (near, far):
        sock.setblocking(False)
    return near, far


async def test_body_splice_waits_for_ready_then_moves_exactly_its_length() -> None:
    # http mode starts a body splice while the client's transport may still hold body bytes
    # for writing; ``ready`` (the transport's buffer is empty) must hold the spliced bytes
    # back until then, or they would overtake the buffered ones. And it moves exactly the
    # declared length: what follows (the next response) stays in the target's socket.
    loop = asyncio.get_running_loop()
    target_far, target = _tcp_pair()
    client, client_far = _tcp_pair()
    body, after = os.urandom(1024 * 1024), b"HTTP/1.1 next"
    ready = False
    counted: list[int] = []
    ended: asyncio.Future[tuple[relay.BodyEnd, BaseException | None]] = loop.create_future()
    try:
        # (a task: more than the socket buffers may hold until the splice reads)
        sender = asyncio.create_task(loop.sock_sendall(target_far, body + after))
        splice = relay.BodySplice(
            loop,
            target.fileno(),
            client.fileno(),
            len(body),
            counted.append,
            lambda kind, error: ended.set_result((kind, error)),
            ready=lambda: ready,
        )
        splice.start()
        await asyncio.sleep(0.2)
        with pytest.raises(BlockingIOError):
            client_far.recv(1)  # nothing spliced while not ready
        assert counted == []
        ready = True
        got = bytearray()
        async with asyncio.timeout(10):
            while len(got) < len(body):
                got += await loop.sock_recv(client_far, 1 << 20)
        assert await asyncio.wait_for(ended, 5) == (relay.BodyEnd.DONE, None)
        await asyncio.wait_for(sender, 5)
        assert bytes(got) == body and sum(counted) == len(body)
        assert await loop.sock_recv(target, 100) == after  # not taken by the splice
    finally:
        for sock in (target_far, target, client, client_far):
            sock.close()
        relay.release_pipes()


async def test_out_of_descriptors_a_large_http_body_is_copied_and_nothing_leaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # EMFILE when the body splice sets up (its dup()s or its pipe): the descriptors it got
    # are given back and the body is copied instead, byte for byte.
    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(relay, "_take_pipe", no_pipe)
    body = os.urandom(2 * 1024 * 1024)

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await read_all(reader, 10)

    relay.release_pipes()
    before = fd_count()
    async with (
        tcp_server(target) as port,
        running_proxy(ProxySettings(target=direct_target(port))) as proxy,
    ):
        response = await HttpClient.get_once(proxy.port)
    await asyncio.sleep(0.1)
    assert response.status == 200 and response.body == body
    assert fd_count() <= before
