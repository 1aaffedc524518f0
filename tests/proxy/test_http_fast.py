"""http mode's fast path: the same bytes as the h11 path, and a clean hand-over to h11."""

from __future__ import annotations

import asyncio

import pytest

from rustbalance.proxy import InterceptedRequest, InterceptedResponse, ProxySettings

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
