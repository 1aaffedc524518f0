"""The join interceptor in a real ReverseProxy on 127.0.0.1, and join_via_onion through a
local fake SOCKS5 server (which stands in for tor: it checks the CONNECT names the onion by
name, records the credentials, and connects to the proxy). No tor, no upstream target: the
interceptor answers before the proxy ever connects to one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator

import pytest

from rustbalance.cluster.authority import Statement
from rustbalance.cluster.membership import Membership
from rustbalance.node.join import (
    JOIN_PATH,
    JoinError,
    JoinInterceptor,
    JoinRequest,
    JoinResponder,
    join_via_onion,
    parse_join_answer,
)
from rustbalance.proxy import ProxySettings, ReverseProxy, Target
from tests.ops.fake_socks import FakeSocks
from tests.trust import MASTER, grant, node_key, now_ms, record, signed, wg_key

ONION = MASTER.onion_address
SECRET = b"\x05" * 32


def _membership() -> Membership:
    m = Membership(MASTER.public_key)
    m.apply(signed(record("node-a", tunnel="10.99.0.1", coordination="10.99.0.1:51821")), now_ms())
    return m


def _responder(membership: Membership) -> JoinResponder:
    return JoinResponder(
        node_id="node-a",
        master_public=MASTER.public_key,
        sign=MASTER.sign,
        membership=lambda: membership,
        tunnel_network="10.99.0.0/24",
    )


GRANT = grant(SECRET, max_uses=5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(node: str = "node-b", secret: bytes = SECRET) -> JoinRequest:
    return JoinRequest(
        node_id=node,
        node_key=node_key(node).public,
        wg_public_key=wg_key(node),
        wg_endpoint="198.51.100.7:51820",
        coordination_port=51821,
        priority=20,
        request_time=0,
        grant=GRANT.data,
        grant_secret=secret,
    )


@contextlib.asynccontextmanager
async def _proxy(
    membership: Membership, added: list[Statement], *, joins: bool = True
) -> AsyncIterator[ReverseProxy]:
    async def admit(statement: Statement) -> None:
        if statement.content.node_id == "explodes":  # type: ignore[union-attr]
            raise RuntimeError("wg set failed")
        membership.apply(statement, now_ms())
        added.append(statement)

    settings = ProxySettings(
        target=Target("127.0.0.1", _closed_port(), is_onion=False),
        listen_port=0,
        connect_timeout=2,
        idle_timeout=5,
        drain_timeout=1,
    )
    interceptor = JoinInterceptor(_responder(membership) if joins else None, admit=admit)
    proxy = ReverseProxy(settings, interceptor=interceptor)
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
        f"POST {path} HTTP/1.1\r\nHost: {ONION}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _fresh(request: JoinRequest) -> bytes:
    fresh = dataclasses.replace(request, request_time=int(time.time()))
    return fresh.to_json(node_key(request.node_id))


async def test_interceptor_answers_inside_a_real_proxy() -> None:
    added: list[Statement] = []
    membership = _membership()
    async with _proxy(membership, added) as proxy:
        status, body = await _http(proxy.port, _post(JOIN_PATH, _fresh(_request())))
        assert status == 200
        answer = parse_join_answer(body, MASTER.public_key, _request(), now_ms())
        assert [s.content.node_id for s in added] == ["node-b"]  # type: ignore[union-attr]
        assert added[0].content == answer.admission
        # The absolute form of the same path is answered by the node too (a repeat here).
        absolute = _post(f"http://{ONION}{JOIN_PATH}", _fresh(_request()))
        assert (await _http(proxy.port, absolute))[0] == 200
        assert (await _http(proxy.port, _post("/.rb/wrong", _fresh(_request()))))[0] == 404
        assert (await _http(proxy.port, _post(JOIN_PATH, b"{bad json")))[0] == 404
        assert (await _http(proxy.port, _post(JOIN_PATH, b"x" * 9000)))[0] == 404
        # The daemon's callback failing: 500, and nothing was admitted.
        status, _ = await _http(proxy.port, _post(JOIN_PATH, _fresh(_request("explodes"))))
        assert status == 500
        assert [r.node_id for r in membership.members()] == ["node-a", "node-b"]
        # Any other path goes to the target (closed here: the proxy's own 502).
        get = f"GET / HTTP/1.1\r\nHost: {ONION}\r\nConnection: close\r\n\r\n".encode()
        assert (await _http(proxy.port, get))[0] == 502
        assert proxy.stats.upstream_errors == 1


async def test_join_via_onion_through_fake_socks_and_real_proxy() -> None:
    added: list[Statement] = []
    async with _proxy(_membership(), added) as proxy:
        socks = FakeSocks(proxy.port)
        socks_port = await socks.start()
        try:
            answer = await join_via_onion(
                ("127.0.0.1", socks_port),
                ONION,
                _request(),
                node_key("node-b"),
                attempt_timeout=10,
            )
            assert answer.responder_node_id == "node-a"
            assert answer.admission == added[0].content
            assert [p.node_id for p in answer.peers()] == ["node-a"]
            assert socks.requests[0][:2] == (ONION, 80)

            # Wrong secret: every attempt is a 404, retried `interval` apart on fresh
            # credentials (a new tor circuit each: another intro point, so maybe another
            # node), then a clear error without the secret.
            slept: list[float] = []

            async def fake_sleep(seconds: float) -> None:
                slept.append(seconds)

            with pytest.raises(JoinError, match="404") as info:
                await join_via_onion(
                    ("127.0.0.1", socks_port),
                    ONION,
                    _request("node-c", secret=b"\x06" * 32),
                    node_key("node-c"),
                    attempts=3,
                    interval=15,
                    sleep=fake_sleep,
                    attempt_timeout=10,
                )
            assert slept == [15, 15]
            assert SECRET.hex() not in str(info.value)
            creds = {(u, p) for _, _, u, p in socks.requests}
            assert len(creds) == len(socks.requests) == 4
        finally:
            await socks.close()


async def test_join_via_onion_gives_up_on_a_dead_socks_port() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    key = node_key("node-b")
    with pytest.raises(JoinError, match="after 2 attempts"):
        await join_via_onion(
            ("127.0.0.1", _closed_port()), ONION, _request(), key, attempts=2, sleep=fake_sleep
        )
    assert slept == [5.0]
    with pytest.raises(JoinError, match="master address"):
        await join_via_onion(("127.0.0.1", 1), "not-an-onion", _request(), key)


def test_wants_lets_only_join_paths_leave_the_fast_path() -> None:
    wants = JoinInterceptor.wants
    assert wants(JOIN_PATH.encode())
    assert wants(b"/.rb")
    assert wants(b"http://" + ONION.encode() + b"/.rb/x")  # absolute form
    assert wants(b"/%2erb/x")
    assert not wants(b"/")
    assert not wants(b"/static/app.js?x=.r")


async def test_with_joins_off_no_spelling_of_rb_reaches_the_target() -> None:
    """Finding 6 of issue 16: with [join] disabled, the secret path and the token body went to
    the target. Every node answers /.rb itself (404), joins on or off."""
    seen: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head.split(b" ")[1])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    server = await asyncio.start_server(target, "127.0.0.1", 0)
    settings = ProxySettings(
        target=Target("127.0.0.1", int(server.sockets[0].getsockname()[1]), is_onion=False),
        listen_port=0,
        connect_timeout=2,
        idle_timeout=5,
        drain_timeout=1,
    )
    proxy = ReverseProxy(settings, interceptor=JoinInterceptor(None))
    await proxy.start()
    try:
        body = _fresh(_request())
        for path in ("/.rb/join", f"http://{ONION}/.rb/join", "//.rb/join", "/./.rb/join",
                     "/%2erb/join", "/.RB/join"):  # fmt: skip
            # A target beginning with // never reaches the interceptor: the front door refuses
            # it as a network-path reference (proxy/wire/targets.py, issue 15) with a 400.
            expected = 400 if path.startswith("//") else 404
            assert (await _http(proxy.port, _post(path, body)))[0] == expected, path
        assert (await _http(proxy.port, _post("/page", b"{}")))[0] == 200
        assert seen == [b"/page"]
    finally:
        await proxy.close(1)
        server.close()


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
    responder = _responder(_membership())
    settings = ProxySettings(
        target=Target("127.0.0.1", port, is_onion=False),
        listen_port=0,
        connect_timeout=2,
        idle_timeout=5,
        drain_timeout=1,
    )
    proxy = ReverseProxy(settings, interceptor=JoinInterceptor(responder))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"GET /page HTTP/1.1\r\nHost: {ONION}\r\n\r\n".encode())
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
