"""http mode by example: exact bytes both ways for typical and awkward exchanges.

Each case sends raw client bytes through the proxy to a target that answers each request
head with a canned raw response; the test compares what the target received and what the
client received with the bytes expected (the target's port is written as PORT).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rustbalance.proxy import InterceptedRequest, InterceptedResponse, ProxySettings

from .helpers import MASTER, direct_target, read_all, running_proxy, tcp_server

_M = MASTER.encode()

# name: (client bytes, one canned raw response per request the target sees,
#        what the target must receive, what the client must receive)
EXCHANGES: dict[str, tuple[bytes, list[bytes], bytes, bytes]] = {
    "simple-get": (
        b"GET /a?b=1 HTTP/1.1\r\nHost: " + _M + b"\r\nAccept: */*\r\n"
        b"Origin: http://" + _M + b"\r\nX-Pad:   spaced value  \r\n\r\n",
        [
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/next\r\n"
            b"Content-Length: 3\r\nSet-Cookie: a=b; Domain=127.0.0.1\r\n\r\nabc"
        ],
        b"GET /a?b=1 HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\naccept: */*\r\n"
        b"origin: http://127.0.0.1:PORT\r\nx-pad: spaced value\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nlocation: http://" + _M + b"/next\r\n"
        b"set-cookie: a=b; Domain=" + _M + b"\r\ncontent-length: 3\r\n\r\nabc",
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
        b"GET /1 HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\ncontent-length: 4\r\n\r\nbody"
        b"DELETE /3 HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n3",
    ),
    "chunked-both-ways": (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"
        b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
        ],
        b"POST /c HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n"
        b"GET /d HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nnope",
    ),
    "204-and-304": (
        b"GET /e HTTP/1.1\r\nHost: x\r\n\r\nGET /f HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n",
        ],
        b"GET /e HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n"
        b"GET /f HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\ncontent-length: 12\r\n\r\n",
    ),
    "target-closes-the-connection": (
        b"GET /g HTTP/1.1\r\nHost: x\r\n\r\nGET /h HTTP/1.1\r\nHost: x\r\n\r\n",
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\ng",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nh",
        ],
        b"GET /g HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n"
        b"GET /h HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ng"
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nh",
    ),
    "client-asks-to-close": (
        b"GET /i HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ni"],
        b"GET /i HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\ni",
    ),
    "http-1.0-client-and-a-chunked-response": (
        b"GET /j HTTP/1.0\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"],
        b"GET /j HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nab",
    ),
    "response-until-close": (
        b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\nall of it"],
        b"GET /k HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: 1\r\nconnection: close\r\n\r\nall of it",
    ),
    "interim-responses": (
        b"POST /l HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        b"POST /l HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\nexpect: 100-continue\r\n"
        b"content-length: 2\r\n\r\nhi",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ),
    "missing-host-is-a-400": (b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n", [], b"", b"400"),
    "bare-lf-request": (
        b"GET /lf HTTP/1.1\nHost: x\n\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        b"GET /lf HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    ),
    "short-body-from-target": (
        b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
        b"GET /m HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
    ),
    "bad-response-is-a-502": (
        b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/9 nonsense\r\n\r\n"],
        b"GET /n HTTP/1.1\r\nhost: 127.0.0.1:PORT\r\n\r\n",
        b"502",
    ),
}


async def _exchange(client_bytes: bytes, replies: list[bytes]) -> tuple[bytes, bytes]:
    """(what the target received, what the client received) for one connection."""
    received: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        # One canned reply per request head (bodies are short and arrive with their head).
        buffer = b""
        while replies:
            while b"\r\n\r\n" not in buffer:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            await asyncio.sleep(0.05)  # the body, if any, is there by now
            buffer += await _available(reader)
            received.append(buffer)
            buffer = b""
            reply = replies.pop(0)
            writer.write(reply.replace(b"{port}", str(port).encode()))
            await writer.drain()
            if b"Connection: close" in reply or b"short" in reply or b"all of it" in reply:
                writer.write_eof()
                return
        received.append(await read_all(reader))

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), master_onion=MASTER, mode="http")
        async with running_proxy(settings) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(client_bytes)
                await writer.drain()
                await asyncio.sleep(0.4)  # everything answered before the client's FIN
                writer.write_eof()
                answer = await read_all(reader, 5)
            finally:
                writer.transport.abort()
    # The target's port differs between runs (Host, rewritten Location): take it out.
    port_bytes = str(port).encode()
    return b"".join(received).replace(port_bytes, b"PORT"), answer.replace(port_bytes, b"PORT")


async def _available(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.05)
    except TimeoutError:
        return b""


@pytest.mark.parametrize("name", list(EXCHANGES))
async def test_exchange(name: str) -> None:
    client_bytes, replies, to_target, to_client = EXCHANGES[name]
    seen, answer = await _exchange(client_bytes, list(replies))
    assert seen == to_target
    if len(to_client) == 3:  # a proxy-made error page: its status is what matters
        assert answer.startswith(b"HTTP/1.1 %s " % to_client)
        assert b"connection: close" in answer.lower()
    else:
        assert answer == to_client


async def test_interceptor_sees_and_answers_requests_the_rest_go_on() -> None:
    seen: list[tuple[str, str, bytes]] = []

    async def join(request: InterceptedRequest) -> InterceptedResponse | None:
        seen.append((request.method, request.path, await request.read_body(100)))
        if request.path == "/.rb/x":
            return InterceptedResponse(200, (("Content-Type", "text/plain"),), b"mine")
        return None

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while data.count(b"\r\n\r\n") < 1 or not data.endswith(b"posted"):
            chunk = await reader.read(65536)
            if not chunk:
                return
            data += chunk
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ntarget")
        await writer.drain()
        await read_all(reader)

    async with tcp_server(target) as port:
        settings = ProxySettings(target=direct_target(port), master_onion=MASTER)
        async with running_proxy(settings, interceptor=join) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(
                    b"GET /.rb/x HTTP/1.1\r\nHost: a\r\n\r\n"
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nposted"
                )
                await asyncio.sleep(0.3)
                writer.write_eof()
                answer = await read_all(reader, 5)
            finally:
                writer.transport.abort()
    # The interceptor read the second request's body; it still went on to the target.
    assert seen == [("GET", "/.rb/x", b""), ("POST", "/", b"posted")]
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and first.endswith(b"\r\n\r\nmine")
    assert second.endswith(b"\r\n\r\ntarget")
    assert proxy.stats.requests == 2


async def test_a_long_blank_run_in_a_header_does_not_stall_the_proxy() -> None:
    """The head grammar once took quadratic time on blanks followed by a bad byte (~10 s of
    a blocked event loop for 60 000 blanks); now the answer comes at once."""

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_all(reader)

    async with tcp_server(target) as port:
        settings_ = ProxySettings(
            target=direct_target(port), master_onion=MASTER, max_header_bytes=64 * 1024
        )
        async with running_proxy(settings_) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX:" + b" " * 60_000 + b"\x01\r\n\r\n")
                started = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert time.monotonic() - started < 1.5
                assert head.startswith(b"HTTP/1.1 400 ")
            finally:
                writer.transport.abort()
