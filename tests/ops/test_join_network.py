"""The join interceptor in a real ReverseProxy on 127.0.0.1, and join_via_onion through a
local fake SOCKS5 server (which stands in for tor: it checks the CONNECT names the onion by
name, records the credentials, and connects to the proxy). No tor, no upstream target: the
interceptor answers before the proxy ever connects to one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from rustbalance.crypto.keys import IdentityKey
from rustbalance.node.join import (
    JoinError,
    JoinRequest,
    JoinResponder,
    PeerInfo,
    join_via_onion,
    make_join_interceptor,
    parse_join_answer,
)
from rustbalance.proxy import ProxySettings, ReverseProxy, Target

SECRET = "j" * 43
TOKEN = "c" * 43
MASTER = IdentityKey.from_seed(bytes(range(32))).onion_address
SELF = PeerInfo(
    "node-a",
    "10.99.0.1:51821",
    base64.b64encode(b"\x01" * 32).decode(),
    "203.0.113.5:51820",
    "10.99.0.1",
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(node: str = "node-b", key: int = 2) -> JoinRequest:
    return JoinRequest(
        node, TOKEN, base64.b64encode(bytes([key]) * 32).decode(), "198.51.100.7:51820", 51821, 0
    )


@contextlib.asynccontextmanager
async def _proxy(responder: JoinResponder, added: list[PeerInfo]) -> AsyncIterator[ReverseProxy]:
    async def add_peer(peer: PeerInfo) -> None:
        if peer.node_id == "explodes":
            raise RuntimeError("wg set failed")
        added.append(peer)

    settings = ProxySettings(
        target=Target("127.0.0.1", _closed_port(), is_onion=False),
        listen_port=0,
        connect_timeout=2,
        idle_timeout=5,
        drain_timeout=1,
    )
    proxy = ReverseProxy(settings, interceptor=make_join_interceptor(responder, add_peer=add_peer))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close(1)


async def _http(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _post(path: str, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        f"POST {path} HTTP/1.1\r\nHost: {MASTER}\r\nContent-Length: {n}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _fresh(request: JoinRequest) -> bytes:
    import dataclasses
    import time

    return dataclasses.replace(request, request_time=int(time.time())).to_json()


async def test_interceptor_answers_inside_a_real_proxy() -> None:
    added: list[PeerInfo] = []
    responder = JoinResponder(join_secret=SECRET, cluster_token=TOKEN, self_info=SELF)
    async with _proxy(responder, added) as proxy:
        status, body = await _http(proxy.port, _post("/.rb/" + SECRET, _fresh(_request())))
        assert status == 200
        answer = parse_join_answer(body)
        assert [p.node_id for p in added] == ["node-b"]
        assert added[0].tunnel_address == answer.tunnel_address
        assert (await _http(proxy.port, _post("/.rb/wrong", _fresh(_request()))))[0] == 404
        assert (await _http(proxy.port, _post("/.rb/" + SECRET, b"{bad json")))[0] == 400
        assert (await _http(proxy.port, _post("/.rb/" + SECRET, b"x" * 9000)))[0] == 400
        # The daemon's callback failing: 500, and the admission is undone.
        status, _ = await _http(
            proxy.port, _post("/.rb/" + SECRET, _fresh(_request("explodes", 7)))
        )
        assert status == 500
        assert [p.node_id for p in responder.admitted] == ["node-b"]
        # Any other path goes to the target (closed here: the proxy's own 502).
        get = f"GET / HTTP/1.1\r\nHost: {MASTER}\r\nConnection: close\r\n\r\n".encode()
        assert (await _http(proxy.port, get))[0] == 502
        assert proxy.stats.upstream_errors == 1


class FakeSocks:
    """A SOCKS5 server (RFC 1928 + RFC 1929 user/password) that relays to one local port."""

    def __init__(self, forward_port: int) -> None:
        self.forward_port = forward_port
        self.requests: list[tuple[str, int, bytes, bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ver, n = await reader.readexactly(2)
            methods = await reader.readexactly(n)
            assert ver == 5 and 2 in methods
            writer.write(b"\x05\x02")
            _, ulen = await reader.readexactly(2)
            user = await reader.readexactly(ulen)
            (plen,) = await reader.readexactly(1)
            password = await reader.readexactly(plen)
            writer.write(b"\x01\x00")
            ver, cmd, _, atyp = await reader.readexactly(4)
            assert (ver, cmd, atyp) == (5, 1, 3)  # CONNECT by name: tor resolves the onion
            (hlen,) = await reader.readexactly(1)
            host = (await reader.readexactly(hlen)).decode()
            (port,) = struct.unpack(">H", await reader.readexactly(2))
            self.requests.append((host, port, user, password))
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.forward_port)
            writer.write(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(OSError):
                    dst.write_eof()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            up_writer.close()
        finally:
            writer.close()


async def test_join_via_onion_through_fake_socks_and_real_proxy() -> None:
    added: list[PeerInfo] = []
    responder = JoinResponder(join_secret=SECRET, cluster_token=TOKEN, self_info=SELF)
    async with _proxy(responder, added) as proxy:
        socks = FakeSocks(proxy.port)
        socks_port = await socks.start()
        try:
            answer = await join_via_onion(
                ("127.0.0.1", socks_port), MASTER, SECRET, _request(), attempt_timeout=10
            )
            assert answer.responder_node_id == "node-a"
            assert answer.tunnel_address == added[0].tunnel_address
            assert [p.node_id for p in answer.peers] == ["node-a"]
            assert socks.requests[0][:2] == (MASTER, 80)

            # Wrong secret: every attempt is a 404, retried `interval` apart on fresh
            # credentials (a new tor circuit each), then a clear error without the secret.
            slept: list[float] = []

            async def fake_sleep(seconds: float) -> None:
                slept.append(seconds)

            with pytest.raises(JoinError, match="404") as info:
                await join_via_onion(
                    ("127.0.0.1", socks_port),
                    MASTER,
                    "w" * 43,
                    _request("node-c", 3),
                    attempts=3,
                    interval=15,
                    sleep=fake_sleep,
                    attempt_timeout=10,
                )
            assert slept == [15, 15]
            assert "w" * 43 not in str(info.value) and TOKEN not in str(info.value)
            creds = {(u, p) for _, _, u, p in socks.requests}
            assert len(creds) == len(socks.requests) == 4
        finally:
            await socks.close()


async def test_join_via_onion_gives_up_on_a_dead_socks_port() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    with pytest.raises(JoinError, match="after 2 attempts"):
        await join_via_onion(
            ("127.0.0.1", _closed_port()), MASTER, SECRET, _request(), attempts=2, sleep=fake_sleep
        )
    assert slept == [15.0]
    with pytest.raises(JoinError, match="master address"):
        await join_via_onion(("127.0.0.1", 1), "not-an-onion", SECRET, _request())


def test_wants_lets_only_join_paths_leave_the_fast_path() -> None:
    wants = make_join_interceptor(
        JoinResponder(join_secret=SECRET, cluster_token=TOKEN, self_info=SELF)
    ).wants
    assert wants(b"/.rb/" + SECRET.encode())
    assert wants(b"/.rb")
    assert wants(b"http://" + MASTER.encode() + b"/.rb/x")  # absolute form
    assert not wants(b"/")
    assert not wants(b"/static/app.js?x=.r")


async def test_join_path_after_a_fast_path_request_on_one_connection() -> None:
    """A keep-alive client first gets a page from the target (callback fast path), then POSTs
    to /.rb on the same connection: the interceptor answers, the target never sees the path."""
    seen: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            seen.append(head.split(b" ")[1])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    responder = JoinResponder(join_secret=SECRET, cluster_token=TOKEN, self_info=SELF)
    settings = ProxySettings(
        target=Target("127.0.0.1", port, is_onion=False),
        listen_port=0,
        connect_timeout=2,
        idle_timeout=5,
        drain_timeout=1,
    )
    proxy = ReverseProxy(settings, interceptor=make_join_interceptor(responder))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"GET /page HTTP/1.1\r\nHost: {MASTER}\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        writer.write(_post("/.rb/wrong-secret", b"{}"))
        await writer.drain()
        second = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert second.startswith(b"HTTP/1.1 404")
        assert seen == [b"/page"]
    finally:
        await proxy.close(1)
        server.close()
