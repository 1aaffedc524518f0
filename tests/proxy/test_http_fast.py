"""http mode's fast path: the same bytes as the h11 path, and a clean hand-over to h11."""

from __future__ import annotations

import asyncio
import time

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy import InterceptedRequest, InterceptedResponse, ProxySettings
from rustbalance.proxy.http import _parse_request, _parse_response
from tests.budget import budget

from .helpers import MASTER, direct_target, read_all, running_proxy, tcp_server

# (client bytes, one canned raw response per request the target sees)
EXCHANGES: dict[str, tuple[bytes, list[bytes]]] = {
    "simple-get": (
        b"GET /a?b=1 HTTP/1.1\r\nHost: " + MASTER.encode() + b"\r\nAccept: */*\r\n"
        b"Origin: http://" + MASTER.encode() + b"\r\nX-Pad:   spaced value  \r\n\r\n",
        [
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/next\r\n"
            b"Content-Length: 3\r\nSet-Cookie: a=b; Domain=127.0.0.1\r\n\r\nabc"
        ],
    ),
    "pipelined-then-body": (
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
        b"DELETE /3 HTTP/1.1\r\nhost: x\r\nConnection: keep-alive\r\n\r\n",
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3",
        ],
    ),
    "chunked-response-then-fast": (
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
        ],
    ),
    "204-and-304": (
        b"GET /e HTTP/1.1\r\nHost: x\r\n\r\nGET /f HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
        ],
    ),
    "target-closes-the-connection": (
        b"GET /g HTTP/1.1\r\nHost: x\r\n\r\nGET /h HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\ng",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nh",
        ],
    ),
    "missing-host-is-a-400": (b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n", []),
    "bare-lf-request": (
        b"GET /lf HTTP/1.1\nHost: x\n\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ),
    "short-body-from-target": (
        b"GET /i HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
    ),
    "bad-response": (b"GET /j HTTP/1.1\r\nHost: x\r\n\r\n", [b"HTTP/9 nonsense\r\n\r\n"]),
}


async def _exchange(fast: bool, client_bytes: bytes, replies: list[bytes]) -> tuple[bytes, bytes]:
    """(what the target received, what the client received) for one connection."""
    received: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One canned reply per request head (bodies are short and arrive with their head).
        buffer = b""
        for reply in replies:
            while b"\r\n\r\n" not in buffer:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            received.append(buffer)
            buffer = b""
            writer.write(reply.replace(b"{port}", str(port).encode()))
            await writer.drain()
            if b"Connection: close" in reply or b"short" in reply:
                writer.write_eof()
                return
        received.append(await read_all(reader))

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), master_onion=MASTER, mode="http")
        async with running_proxy(settings, http_fast_path=fast) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(client_bytes)
                await writer.drain()
                await asyncio.sleep(0.2)  # everything answered before the client's FIN
                writer.write_eof()
                answer = await read_all(reader, 5)
            finally:
                writer.transport.abort()
    # The target's port differs between runs (Host, rewritten Location): take it out.
    port_bytes = str(port).encode()
    return b"".join(received).replace(port_bytes, b"PORT"), answer.replace(port_bytes, b"PORT")


@pytest.mark.parametrize("name", list(EXCHANGES))
async def test_fast_path_sends_the_same_bytes_as_h11(name: str) -> None:
    client_bytes, replies = EXCHANGES[name]
    fast = await _exchange(True, client_bytes, replies)
    slow = await _exchange(False, client_bytes, replies)
    assert fast == slow
    assert fast[1]  # the client always got an answer


async def test_interceptor_sees_and_answers_fast_path_requests() -> None:
    seen: list[tuple[str, str, bytes]] = []

    async def join(request: InterceptedRequest) -> InterceptedResponse | None:
        seen.append((request.method, request.path, await request.read_body(100)))
        if request.path == "/.rb/x":
            return InterceptedResponse(200, (("Content-Type", "text/plain"),), b"mine")
        return None

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while b"\r\n\r\n" not in await reader.read(65536):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ntarget")
        await writer.drain()
        await read_all(reader)

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings, interceptor=join) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(
                    b"GET /.rb/x HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
                )
                await asyncio.sleep(0.2)
                writer.write_eof()
                answer = await read_all(reader, 5)
            finally:
                writer.transport.abort()
    assert seen == [("GET", "/.rb/x", b""), ("GET", "/", b"")]
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"\r\n\r\nmine")
    assert second.endswith(b"\r\n\r\ntarget")
    assert proxy.stats.requests == 2


# -- the fast path's parser: h11 is the oracle ----------------------------------------------

_TCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~"
_token = st.text(alphabet=_TCHARS, min_size=1, max_size=8)
_vchars = st.binary(min_size=1, max_size=6).map(
    lambda b: bytes(c if 0x21 <= c <= 0x7E or c >= 0x80 else 0x61 for c in b)
)
_value = st.lists(_vchars, max_size=3).map(b" \t".join)
_ows = st.sampled_from([b"", b" ", b"\t", b"  \t "])
_field = st.tuples(_token.map(str.encode), _ows, _value, _ows).filter(
    lambda f: (
        f[0].lower()
        not in (
            b"host",
            b"connection",
            b"content-length",
            b"transfer-encoding",
            b"te",
            b"upgrade",
            b"expect",
        )
    )
)


def _fields_bytes(fields: list[tuple[bytes, bytes, bytes, bytes]]) -> bytes:
    return b"".join(b"\r\n%s:%s%s%s" % f for f in fields)


@settings(max_examples=budget(300))
@given(
    method=st.sampled_from([b"GET", b"DELETE", b"OPTIONS"]),
    path=st.binary(max_size=12).map(lambda b: b"/" + bytes(c for c in b if 0x21 <= c <= 0x7E)),
    before=st.lists(_field, max_size=3),
    after=st.lists(_field, max_size=3),
    host=_value.filter(bool),
)
def test_fast_parser_reads_valid_requests_exactly_as_h11(
    method: bytes,
    path: bytes,
    before: list[tuple[bytes, bytes, bytes, bytes]],
    after: list[tuple[bytes, bytes, bytes, bytes]],
    host: bytes,
) -> None:
    head = b"%s %s HTTP/1.1%s\r\nHost: %s%s" % (
        method,
        path,
        _fields_bytes(before),
        host,
        _fields_bytes(after),
    )
    parsed = _parse_request(head)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert parsed == (bytes(event.method), bytes(event.target), list(event.headers))


@settings(max_examples=budget(500))
@given(
    fields=st.lists(_field, max_size=3),
    position=st.integers(0, 200),
    byte=st.integers(0, 255),
)
def test_fast_parser_accepts_only_what_h11_reads_the_same(
    fields: list[tuple[bytes, bytes, bytes, bytes]], position: int, byte: int
) -> None:
    """A valid head with one byte changed: whatever the fast parser still accepts, h11 must
    read identically (else the fast path would forward what h11 would refuse or read
    differently)."""
    head = bytearray(b"GET /p HTTP/1.1\r\nHost: x%s" % _fields_bytes(fields))
    head[position % len(head)] = byte
    parsed = _parse_request(bytes(head))
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(bytes(head) + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        event = None
    if parsed is not None:
        assert isinstance(event, h11.Request)
        assert parsed == (bytes(event.method), bytes(event.target), list(event.headers))


@settings(max_examples=budget(300))
@given(
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    reason=st.sampled_from([b"OK", b"", b"Not Found", b"x \t y"]),
    fields=st.lists(_field, max_size=4),
    length=st.integers(0, 10**6),
)
def test_fast_parser_reads_valid_responses_exactly_as_h11(
    status: int, reason: bytes, fields: list[tuple[bytes, bytes, bytes, bytes]], length: int
) -> None:
    head = b"HTTP/1.1 %d %s%s\r\nContent-Length: %d" % (
        status,
        reason,
        _fields_bytes(fields),
        length,
    )
    parsed = _parse_response(head)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    assert parsed == (status, bytes(event.reason), list(event.headers), length, True)


async def test_a_long_blank_run_in_a_header_does_not_stall_the_proxy() -> None:
    """The fast path's header regex once took quadratic time on blanks followed by a bad byte
    (~10 s of a blocked event loop for 60 000 blanks); now the answer comes at once."""

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await reader.read(1 << 16)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_all(reader)

    async with tcp_server(target) as port:
        settings_ = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX:" + b" " * 60_000 + b"\x01\r\n\r\n")
                started = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert time.monotonic() - started < 1.5
                assert head.startswith(b"HTTP/1.1 ")
            finally:
                writer.transport.abort()
