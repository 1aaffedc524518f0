"""Local servers and clients for the proxy tests (all on 127.0.0.1, all closed by the tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import h11

from rustbalance.proxy import ProxySettings, ReverseProxy, Target

MASTER = "m" * 56 + ".onion"
TARGET_ONION = "t" * 56 + ".onion"

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tcp_server(handler: StreamHandler) -> AsyncIterator[int]:
    """A local asyncio server; its open connections are cut when the block ends."""
    writers: set[asyncio.StreamWriter] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writers.discard(writer)
            writer.transport.abort()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, limit=1 << 20)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        await server.wait_closed()


@contextlib.contextmanager
def hung_listener() -> Iterator[int]:
    """A TCP port that completes the handshake (kernel backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def closed_port() -> int:
    """A port nobody listens on (connect is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def direct_target(port: int, *, use_tls: bool = False) -> Target:
    return Target(host="127.0.0.1", port=port, is_onion=False, use_tls=use_tls)


@contextlib.asynccontextmanager
async def running_proxy(settings: ProxySettings, **kwargs: object) -> AsyncIterator[ReverseProxy]:
    proxy = ReverseProxy(settings, **kwargs)  # type: ignore[arg-type]
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close(drain_timeout=1.0)


async def read_all(reader: asyncio.StreamReader, limit: float = 10.0) -> bytes:
    async with asyncio.timeout(limit):
        chunks: list[bytes] = []
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


# -- HTTP ---------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the target received it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)


HttpApp = Callable[[Seen], Reply]


@contextlib.asynccontextmanager
async def http_target(app: HttpApp) -> AsyncIterator[tuple[int, list[Seen]]]:
    """An h11 HTTP/1.1 server calling ``app`` per request (keep-alive supported)."""
    seen: list[Seen] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        for _ in range(1000):
            request: h11.Request | None = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            got = Seen(request.method, request.target, list(request.headers), body)
            seen.append(got)
            reply = app(got)
            writer.write(conn.send(h11.Response(status_code=reply.status, headers=reply.headers)))
            for chunk in reply.chunks:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async with tcp_server(handler) as port:
        yield port, seen


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class HttpClient:
    """A keep-alive HTTP/1.1 client parsing with h11 (the reference framing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> HttpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.transport.abort()

    @classmethod
    async def get_once(cls, port: int, target: bytes = b"/") -> Response:
        """One GET on a fresh connection, closed afterwards."""
        client = await cls.connect(port)
        try:
            return await client.request(b"GET", target)
        finally:
            await client.close()

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        chunks: list[bytes] | None = None,
    ) -> Response:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [(b"host", MASTER.encode()), *(headers or [])]
        self.writer.write(
            self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        )
        for chunk in chunks or []:
            self.writer.write(self.conn.send(h11.Data(data=chunk)))
            await self.writer.drain()
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        return await self.response()

    async def response(self) -> Response:
        async with asyncio.timeout(10):
            response: h11.Response | None = None
            body = b""
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(1 << 20))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    chunked = any(
                        n == b"transfer-encoding" and v.lower() == b"chunked"
                        for n, v in response.headers
                    )
                    return Response(response.status_code, list(response.headers), body, chunked)
                elif isinstance(event, h11.InformationalResponse):
                    continue
                else:
                    raise AssertionError(f"unexpected {event!r}")


async def raw_exchange(port: int, data: bytes, limit: float = 5.0) -> bytes:
    """Send bytes, half-close, read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        return await read_all(reader, limit)
    finally:
        writer.transport.abort()


@contextlib.contextmanager
def counting_splice() -> Iterator[list[int]]:
    """Replace os.splice with a wrapper recording the bytes each call moved (restored after)."""
    calls: list[int] = []
    real = os.splice

    def counting(src: int, dst: int, count: int, *args: object, **kwargs: int) -> int:
        n = real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(n)
        return n

    os.splice = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        os.splice = real


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class SocksLog:
    """What the fake tor SOCKS port was asked."""

    requests: list[tuple[int, bytes, int]] = field(default_factory=list)  # (atyp, host, port)


@contextlib.asynccontextmanager
async def socks5_server(
    forward_port: int | None, *, reply_code: int = 0
) -> AsyncIterator[tuple[int, SocksLog]]:
    """A minimal SOCKS5 server (RFC 1928, no auth) that connects every CONNECT to
    127.0.0.1:forward_port, or answers ``reply_code`` when that is non-zero."""
    log = SocksLog()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, n_methods = await reader.readexactly(2)
        assert version == 5
        methods = await reader.readexactly(n_methods)
        assert 0 in methods
        writer.write(b"\x05\x00")
        ver, cmd, _rsv, atyp = await reader.readexactly(4)
        assert (ver, cmd) == (5, 1)
        if atyp == 3:
            host = await reader.readexactly((await reader.readexactly(1))[0])
        elif atyp == 1:
            host = socket.inet_ntoa(await reader.readexactly(4)).encode()
        else:
            host = await reader.readexactly(16)
        port = int.from_bytes(await reader.readexactly(2), "big")
        log.requests.append((atyp, host, port))
        if reply_code or forward_port is None:
            writer.write(bytes([5, reply_code or 1, 0, 1, 0, 0, 0, 0, 0, 0]))
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", forward_port)
        writer.write(bytes([5, 0, 0, 1, 127, 0, 0, 1, 0, 0]))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.transport.abort()

    async with tcp_server(handler) as port:
        yield port, log
