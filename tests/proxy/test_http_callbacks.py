"""http mode's callback session: answered as h11 reads the bytes, flow control, reconnects.

The differential fuzz sends random pipelined request sequences (well-formed requests, odd
ones, malformed bytes), cut at random points, through a proxy on the event loop
``rustbalance run`` uses for http mode; h11, the independent oracle, reads the same client
bytes and the proxy's answer: every request h11 reads is answered in order (by the target,
whose body echoes the request), unless the proxy refused it as stricter than h11, and then
that refusal is the last thing on the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import h11
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy import (
    InterceptedRequest,
    InterceptedResponse,
    ProxySettings,
    ReverseProxy,
    relay,
)
from rustbalance.proxy.eventloop import ENV_VAR, new_event_loop, run
from rustbalance.proxy.wire import MessageError, origin_form
from tests.budget import budget

from .helpers import (
    MASTER,
    counting_splice,
    direct_target,
    fd_count,
    read_all,
    running_proxy,
    tcp_server,
)

_BIG = 300_000  # more than one read and more than the transports' write-buffer limit


def _answer(method: bytes, path: bytes, head: bytes) -> bytes:
    """The target's raw response to one request (chosen by the path)."""
    echo = b"%s %s host=%s" % (method, path, _host(head))
    if path.startswith(b"/chunked"):
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(echo),
            echo,
        )
    if path.startswith(b"/close"):
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
            len(echo),
            echo,
        )
    if path.startswith(b"/204"):
        return b"HTTP/1.1 204 No Content\r\n\r\n"
    if path.startswith(b"/big"):
        body = bytes(range(256)) * (_BIG // 256)
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    if path.startswith(b"/redirect"):
        return (
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/x\r\n"
            b"Set-Cookie: a=b; Domain=127.0.0.1\r\nConnection: X-Drop\r\nX-Drop: 1\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
    body = b"" if method == b"HEAD" else echo
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(echo), body)


def _host(head: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            return value.strip()
    return b"-"


async def _scripted_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A simple HTTP/1.1 server: request bodies by Content-Length, one answer per request."""
    port = writer.get_extra_info("sockname")[1]
    buffer = b""
    for _ in range(100):  # requests per connection
        while b"\r\n\r\n" not in buffer:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        method, path = [*head.split(b" "), b"", b""][:2]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buffer) < length:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
        buffer = buffer[length:]
        writer.write(_answer(method, path, head).replace(b"{port}", str(port).encode()))
        await writer.drain()
        if path.startswith(b"/close"):
            writer.write_eof()
            return


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[tuple[int, int, _Errors]]:
    """(proxy port, target port, error log) on a thread running the event loop
    ``rustbalance run`` picks for http mode."""
    loop = new_event_loop("http")
    ports: list[int] = []
    started = threading.Event()
    stop = asyncio.Event()
    errors = _Errors()
    logging.getLogger("rustbalance.proxy").addHandler(errors)

    async def main() -> None:
        async with tcp_server(_scripted_target) as port:
            settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
            proxy = ReverseProxy(settings_)
            await proxy.start()
            ports.extend([proxy.port, port])
            started.set()
            await stop.wait()
            await proxy.close(drain_timeout=1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield ports[0], ports[1], errors
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        logging.getLogger("rustbalance.proxy").removeHandler(errors)


def _exchange(port: int, chunks: list[bytes]) -> bytes:
    """Send the chunks (apart, so that the proxy reads them separately), half-close, read
    everything until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            with contextlib.suppress(OSError):
                sock.sendall(chunk)
            time.sleep(0.002)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        received = []
        for _ in range(10_000):  # bounded: the proxy closes, or the timeout ends it
            try:
                data = sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            received.append(data)
        return b"".join(received)


_M = MASTER.encode()
_PIECES = [
    b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    b"GET /b?q=1 HTTP/1.1\r\nHost: " + _M + b"\r\nOrigin: http://" + _M + b"\r\n\r\n",
    b"DELETE /c HTTP/1.1\r\nhost: x\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /redirect HTTP/1.1\r\nHost: x\r\nReferer: http://" + _M + b"/from\r\n\r\n",
    b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody",
    b"GET /abs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET http://" + _M + b"/absolute HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /lf HTTP/1.1\nHost: x\n\n",
    b"GET /nohost HTTP/1.1\r\n\r\n",
    b"GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /fold HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
    b"GET /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    b"GET /bad\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /sp HTTP/1.1\r\nHost : x\r\n\r\n",
]

_streams = st.lists(
    st.one_of(st.sampled_from(_PIECES), st.binary(min_size=1, max_size=24)),
    min_size=1,
    max_size=5,
).map(b"".join)


@st.composite
def _cut(draw: st.DrawFn) -> list[bytes]:
    data = draw(_streams)
    points = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4))))
    chunks, last = [], 0
    for point in [*points, len(data)]:
        if point > last:
            chunks.append(data[last:point])
            last = point
    return chunks


def _h11_requests(stream: bytes) -> tuple[list[h11.Request], bool]:
    """The requests h11 reads from the client's bytes (then EOF), in order, up to the last
    one the connection carries (``Connection: close``, HTTP/1.0), and whether h11 refused
    what came next."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    conn.receive_data(b"")
    requests: list[h11.Request] = []
    for _ in range(1000):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return requests, True
        if isinstance(event, h11.Request):
            requests.append(event)
        elif isinstance(event, h11.EndOfMessage):
            if conn.their_state is not h11.DONE:
                return requests, False
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is not h11.DONE:
                return requests, False  # the connection ends after this one
            conn.start_next_cycle()
        elif not isinstance(event, h11.Data):
            return requests, False  # the client closed between requests
    raise AssertionError("too many events")


def _h11_responses(answer: bytes, requests: list[h11.Request]) -> list[tuple[h11.Response, bytes]]:
    """The responses in the proxy's answer, read by h11 as the answers to ``requests`` (and
    one more, to a GET, for a refusal); it fails on any byte that is not a valid response."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(answer)
    conn.receive_data(b"")
    responses: list[tuple[h11.Response, bytes]] = []
    methods = [r.method for r in requests] + [b"GET"]
    for method in methods:
        if conn.our_state is h11.DONE:
            conn.start_next_cycle()
        if conn.their_state is h11.CLOSED or conn.our_state is not h11.IDLE:
            break
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = b""
        for _ in range(10_000):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                # The proxy closed: fine between responses, never inside one.
                assert response is None and not conn.trailing_data[0], "a broken response"
                return responses
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                responses.append((response, body))
                break
            elif isinstance(event, h11.ConnectionClosed):
                assert response is None, "a response cut short"
                return responses
            elif event is h11.NEED_DATA:
                raise AssertionError("a response cut short")
    assert conn.trailing_data[0] == b"", "bytes after the responses"
    return responses


_REFUSALS = frozenset({400, 408, 413, 414, 431, 501, 502, 505})


def _stricter_than_h11(request: h11.Request) -> bool:
    """Whether the wire layer refuses a request h11 reads (its grammar is stricter)."""
    try:
        origin_form(request.method, request.target)
    except MessageError:
        return True
    return request.method == b"CONNECT" or request.http_version not in (b"1.0", b"1.1")


def _check_answer(chunks: list[bytes], answer: bytes, target_port: int) -> None:
    requests, _refused = _h11_requests(b"".join(chunks))
    responses = _h11_responses(answer, requests)
    refusals = [i for i, (r, body) in enumerate(responses) if r.status_code in _REFUSALS]
    assert all(b"<!DOCTYPE html>" in responses[i][1] for i in refusals)  # the proxy's own
    assert refusals in ([], [len(responses) - 1]), "nothing follows a refusal"
    answered = len(responses) - len(refusals)
    assert answered <= len(requests)
    if refusals and answered < len(requests):
        # Refused although h11 reads it: the wire layer is stricter there, or the head
        # broke a limit or a rule h11 does not check (a bad length, control characters).
        pass
    elif not refusals:
        assert answered == len(requests), "every request h11 reads is answered"
    for request, (response, body) in zip(requests, responses[:answered], strict=False):
        target = origin_form(request.method, request.target)
        if request.method != b"HEAD" and body.startswith(request.method + b" "):
            assert body == b"%s %s host=127.0.0.1:%d" % (request.method, target, target_port)
        assert response.status_code not in _REFUSALS
    assert b"127.0.0.1:%d/x" % target_port not in answer  # the Location was rewritten


@settings(max_examples=budget(120), deadline=None)
@given(chunks=_cut())
def test_random_pipelined_streams_are_answered_as_h11_reads_them(
    proxy_port: tuple[int, int, _Errors], chunks: list[bytes]
) -> None:
    port, target_port, errors = proxy_port
    answer = _exchange(port, chunks)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    _check_answer(chunks, answer, target_port)
    assert errors.records == []


@pytest.mark.parametrize("index", range(len(_PIECES)))
def test_each_kind_of_request_alone_cut_and_pipelined(
    proxy_port: tuple[int, int, _Errors], index: int
) -> None:
    port, target_port, errors = proxy_port
    piece = _PIECES[index]
    half = len(piece) // 2
    for chunks in ([piece], [piece[:half], piece[half:]], [_PIECES[0], piece, _PIECES[1]]):
        answer = _exchange(port, chunks)
        assert answer.startswith(b"HTTP/1.1 ")
        _check_answer(chunks, answer, target_port)
    assert errors.records == []


def test_pipelined_requests_are_answered_in_order(
    proxy_port: tuple[int, int, _Errors],
) -> None:
    port, target_port, _errors = proxy_port
    requests = b"".join(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50))
    answer = _exchange(port, [requests])
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answer.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"GET /n%d host=127.0.0.1:%d" % (i, target_port) for i in range(50)]


async def _a_slow_client_stops_the_proxy_reading_the_target() -> None:
    """Flow control: while the client does not read, the proxy must not buffer the whole
    response; the target's writes block until the client reads again. Each MiB carries its
    own byte value, so bytes the splice sent ahead of what the transport still buffered
    (when the body switches to splice(2) with the client behind) would show."""
    size = 64 * 1024 * 1024
    blocks = [bytes([i]) * (1 << 20) for i in range(size >> 20)]
    finished = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # readuntil raises at EOF: a client that leaves early cannot spin this handler.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for block in blocks:
            writer.write(block)
            await writer.drain()
        finished.set()
        await read_all(reader, 30)

    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 16)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                await asyncio.sleep(1.0)  # the client reads nothing meanwhile
                assert not finished.is_set()
                got = bytearray()
                async with asyncio.timeout(60):
                    while len(got) < size:
                        data = await reader.read(1 << 20)
                        assert data
                        got += data
                assert got == b"".join(blocks)
                await asyncio.wait_for(finished.wait(), 10)
                assert proxy.stats.bytes_down == len(head) + size
            finally:
                writer.transport.abort()


async def _idle_target_connection_closed_by_the_target_is_reopened() -> None:
    connections: list[int] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        # readuntil raises at EOF: a client that leaves early cannot spin this handler.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write_eof()  # closes the keep-alive connection while it is idle

    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                for _ in range(3):
                    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.startswith(b"HTTP/1.1 200 ")
                    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
                    await asyncio.sleep(0.2)
            finally:
                writer.transport.abort()
            assert proxy.stats.requests == 3 and proxy.stats.upstream_errors == 0
    assert len(connections) == 3


async def _target_dying_mid_body(declared: int, sent: bytes) -> None:
    """The target promises ``declared`` body bytes, sends ``sent``, then resets: the client
    gets the head and exactly ``sent`` (copied, or spliced when large), then the close."""

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # readuntil raises at EOF: a client that leaves early cannot spin this handler.
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = await read_all(reader, 10)
            finally:
                writer.transport.abort()
            assert proxy.stats.upstream_errors == 1
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and body == sent  # short body, then closed


async def _interceptor_wants_filter_skips_it_for_other_paths() -> None:
    seen: list[str] = []

    class JoinOnly:
        def wants(self, target: bytes) -> bool:
            return target.startswith(b"/.rb/")

        async def __call__(self, request: InterceptedRequest) -> InterceptedResponse | None:
            seen.append(request.path)
            if request.path.startswith("/.rb/"):
                return InterceptedResponse(200, (), b"mine")
            return None

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(10):
            if b"\r\n\r\n" not in await reader.read(65536):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ntarget")
            await writer.drain()

    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_, interceptor=JoinOnly()) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                for path in (b"/", b"/.rb/x", b"/a", b"/b"):
                    writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                    await asyncio.sleep(0.05)
                writer.write_eof()
                answer = await read_all(reader, 5)
            finally:
                writer.transport.abort()
            assert proxy.stats.requests == 4
    bodies = [part.rsplit(b"\r\n\r\n", 1)[1] for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert bodies == [b"target", b"mine", b"target", b"target"]
    assert seen == ["/.rb/x"]  # the other paths never reached the interceptor


async def _large_bodies_move_by_splice_byte_exact_on_keep_alive() -> None:
    """Bodies over relay.BODY_SPLICE_MIN move target -> pipe -> client with splice(2): every
    byte, in order, the connection kept alive for the next (small and large) responses."""
    bodies = [os.urandom(3 * 1024 * 1024 + 7), b"small", os.urandom(relay.BODY_SPLICE_MIN + 1)]

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for body in bodies:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 100_000):  # in pieces: readiness waits on both sides
                writer.write(body[i : i + 100_000])
                await writer.drain()
                await asyncio.sleep(0)
        await read_all(reader, 10)

    before = fd_count()
    with counting_splice() as calls:
        async with tcp_server(target) as port:
            settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
            async with running_proxy(settings_) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                try:
                    got = []
                    for body in bodies:
                        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                        assert head.startswith(b"HTTP/1.1 200 ")
                        got.append(await asyncio.wait_for(reader.readexactly(len(body)), 20))
                    assert got == bodies
                    assert proxy.stats.requests == 3 and proxy.stats.upstream_errors == 0
                    heads = proxy.stats.bytes_down - sum(map(len, bodies))
                    assert 0 < heads < 300  # counted: every body byte, the heads
                finally:
                    writer.transport.abort()
    assert sum(calls) > len(bodies[0])  # (in and out of the pipe: most of the large bodies)
    relay.release_pipes()
    await asyncio.sleep(0.1)  # (closed transports close their sockets a loop turn later)
    assert fd_count() <= before  # the dup()ed descriptors and pipes are closed


async def _client_leaving_mid_spliced_body_ends_the_session() -> None:
    target_done = asyncio.Event()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        try:
            for _ in range(1024):  # 1 GiB: far more than any buffer holds
                writer.write(b"y" * (1 << 20))
                await writer.drain()
        except (ConnectionError, OSError):
            target_done.set()  # the proxy closed its side once the client left

    before = fd_count()
    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await asyncio.wait_for(reader.readexactly(4 * 1024 * 1024), 10)
            writer.transport.abort()
            await asyncio.wait_for(target_done.wait(), 10)
            for _ in range(500):
                if proxy.stats.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert proxy.stats.active == 0
            assert proxy.stats.bytes_down < (1 << 30)
    relay.release_pipes()
    await asyncio.sleep(0.1)
    assert fd_count() <= before


_SCENARIOS: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "flow-control": _a_slow_client_stops_the_proxy_reading_the_target,
    "reconnect": _idle_target_connection_closed_by_the_target_is_reopened,
    "mid-body": functools.partial(_target_dying_mid_body, 100, b"partial"),
    "interceptor-filter": _interceptor_wants_filter_skips_it_for_other_paths,
    "splice-keep-alive": _large_bodies_move_by_splice_byte_exact_on_keep_alive,
    "splice-target-dies": functools.partial(
        _target_dying_mid_body, 4 * 1024 * 1024, os.urandom(1024 * 1024)
    ),
    "splice-client-leaves": _client_leaving_mid_spliced_body_ends_the_session,
}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("scenario", list(_SCENARIOS))
def test_callback_path_on_both_event_loops(
    scenario: str, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each scenario on uvloop (what ``rustbalance run`` uses in http mode) and on the stock
    loop (its fallback): their transports differ (uvloop's are no asyncio subclasses)."""
    monkeypatch.setenv(ENV_VAR, loop)
    assert issubclass(run(_loop_type(), mode="http"), uvloop.Loop) is (loop == "uvloop")
    run(_SCENARIOS[scenario](), mode="http")


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())
