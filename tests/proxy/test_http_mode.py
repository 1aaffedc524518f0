"""http mode: framing, keep-alive, rewriting, upgrade, error pages."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rustbalance.proxy import InterceptedRequest, InterceptedResponse, ProxySettings

from .helpers import (
    MASTER,
    HttpClient,
    Reply,
    Seen,
    closed_port,
    direct_target,
    http_target,
    hung_listener,
    raw_exchange,
    read_all,
    running_proxy,
    tcp_server,
)

LOGGER = "rustbalance.proxy"


def _settings(port: int, **kwargs: object) -> ProxySettings:
    return ProxySettings(target=direct_target(port), master_onion=MASTER, **kwargs)  # type: ignore[arg-type]


async def test_keep_alive_carries_several_requests_with_host_rewritten() -> None:
    def app(seen: Seen) -> Reply:
        return Reply(200, [(b"content-length", b"%d" % len(seen.target))], [seen.target])

    async with http_target(app) as (port, seen), running_proxy(_settings(port)) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            for i in range(5):
                response = await client.request(b"GET", b"/page/%d" % i)
                assert response.status == 200 and response.body == b"/page/%d" % i
        finally:
            await client.close()
        assert [s.header(b"host") for s in seen] == [f"127.0.0.1:{port}".encode()] * 5
        assert proxy.stats.total == 1 and proxy.stats.requests == 5


async def test_head_204_304_with_content_length_do_not_desync_the_next_response() -> None:

    def app(seen: Seen) -> Reply:
        if seen.target == b"/204":
            return Reply(204, [])
        if seen.target == b"/304":
            return Reply(304, [(b"content-length", b"1234")])
        return Reply(
            200, [(b"content-length", b"5")], [b"" if seen.method == b"HEAD" else b"hello"]
        )

    async with http_target(app) as (port, _seen), running_proxy(_settings(port)) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            head = await client.request(b"HEAD", b"/")
            assert head.status == 200 and head.header(b"content-length") == b"5"
            assert head.body == b""
            no_content = await client.request(b"GET", b"/204")
            assert no_content.status == 204 and no_content.body == b""
            not_modified = await client.request(b"GET", b"/304")
            assert not_modified.status == 304 and not_modified.body == b""
            after = await client.request(b"GET", b"/")
            assert after.status == 200 and after.body == b"hello"
        finally:
            await client.close()


async def test_chunked_request_and_response_bodies_stream_both_ways() -> None:

    def app(seen: Seen) -> Reply:
        # No Content-Length: the target answers chunked, echoing the body in 3 chunks.
        third = len(seen.body) // 3
        parts = [seen.body[:third], seen.body[third : 2 * third], seen.body[2 * third :]]
        return Reply(200, [(b"transfer-encoding", b"chunked")], parts)

    body_parts = [b"a" * 1000, b"b" * 70000, b"c" * 5]
    async with http_target(app) as (port, seen), running_proxy(_settings(port)) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            response = await client.request(
                b"POST", b"/upload", [(b"transfer-encoding", b"chunked")], body_parts
            )
            again = await client.request(b"GET", b"/next")
        finally:
            await client.close()
    assert response.status == 200 and response.chunked
    assert response.body == b"".join(body_parts)
    assert seen[0].header(b"transfer-encoding") == b"chunked"
    assert seen[0].body == b"".join(body_parts)
    assert again.status == 200 and seen[1].target == b"/next"


async def test_redirect_and_cookie_point_at_the_master() -> None:

    def app(seen: Seen) -> Reply:
        return Reply(
            302,
            [
                (b"location", b"http://127.0.0.1:%d/login?next=/a" % seen_port[0]),
                (b"set-cookie", b"sid=secret; Domain=127.0.0.1; Path=/; HttpOnly"),
                (b"content-length", b"0"),
            ],
        )

    seen_port: list[int] = []
    async with http_target(app) as (port, _seen), running_proxy(_settings(port)) as proxy:
        seen_port.append(port)
        client = await HttpClient.connect(proxy.port)
        try:
            response = await client.request(b"GET", b"/")
        finally:
            await client.close()
    assert response.status == 302
    assert response.header(b"location") == f"http://{MASTER}/login?next=/a".encode()
    assert (
        response.header(b"set-cookie") == f"sid=secret; Domain={MASTER}; Path=/; HttpOnly".encode()
    )


async def test_csp_origin_and_referer_are_rewritten() -> None:

    port_box: list[int] = []

    def app(seen: Seen) -> Reply:
        csp = b"default-src 'self' http://127.0.0.1:%d; img-src *" % port_box[0]
        return Reply(200, [(b"content-security-policy", csp), (b"content-length", b"0")])

    async with http_target(app) as (port, seen), running_proxy(_settings(port)) as proxy:
        port_box.append(port)
        client = await HttpClient.connect(proxy.port)
        try:
            response = await client.request(
                b"POST",
                b"/form",
                [
                    (b"origin", f"http://{MASTER}".encode()),
                    (b"referer", f"http://{MASTER}/page?x=1".encode()),
                    (b"content-length", b"0"),
                ],
            )
        finally:
            await client.close()
    target_origin = f"http://127.0.0.1:{port}".encode()
    assert seen[0].header(b"origin") == target_origin
    assert seen[0].header(b"referer") == target_origin + b"/page?x=1"
    assert response.header(b"content-security-policy") == (
        f"default-src 'self' http://{MASTER}; img-src *".encode()
    )


async def test_websocket_upgrade_relays_raw_bytes_both_ways() -> None:
    async def ws_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"upgrade: websocket" in head.lower()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\nhello-from-target"
        )
        while data := await reader.read(1000):  # echo upper-cased until the client ends
            writer.write(data.upper())
            await writer.drain()
        writer.write_eof()

    async with tcp_server(ws_target) as port, running_proxy(_settings(port)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(
                f"GET /ws HTTP/1.1\r\nHost: {MASTER}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"upgrade: websocket" in head.lower()
            assert await asyncio.wait_for(reader.readexactly(17), 5) == b"hello-from-target"
            payload = bytes(range(256)) * 4  # not HTTP at all: raw frames pass untouched
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload.upper()
            writer.write_eof()
            assert await read_all(reader) == b""
        finally:
            writer.transport.abort()


async def test_target_down_gives_a_502_page_without_internals() -> None:
    port = closed_port()
    async with running_proxy(_settings(port)) as proxy:
        client = await HttpClient.connect(proxy.port)
        try:
            response = await client.request(b"GET", b"/")
        finally:
            await client.close()
        assert proxy.stats.upstream_errors == 1
    assert response.status == 502
    assert response.header(b"content-type") == b"text/html; charset=utf-8"
    assert b"Bad Gateway" in response.body
    assert str(port).encode() not in response.body and b"127.0.0.1" not in response.body


async def test_connect_timeout_gives_a_502_and_the_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with hung_listener() as port:
        settings = ProxySettings(
            target=direct_target(port, use_tls=True), master_onion=MASTER, connect_timeout=0.5
        )
        async with running_proxy(settings) as proxy:
            client = await HttpClient.connect(proxy.port)
            try:
                response = await client.request(b"GET", b"/")
            finally:
                await client.close()
    assert response.status == 502
    assert "Connect to target timed out after 0.5 seconds" in [
        r.getMessage() for r in caplog.records
    ]


async def test_malformed_request_gets_400() -> None:
    async with running_proxy(_settings(closed_port())) as proxy:
        answer = await raw_exchange(proxy.port, b"THIS IS NOT HTTP\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert proxy.stats.bad_requests == 1


async def test_over_the_cap_a_client_gets_503_only_when_every_slot_is_busy() -> None:
    """At the cap, a connection that waits for its next request makes room (it is closed);
    a connection in the middle of a request never does: with every slot busy, 503."""
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/slow" in head:
                await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    request = f"GET / HTTP/1.1\r\nHost: {MASTER}\r\n\r\n".encode()
    async with tcp_server(slow) as port, running_proxy(_settings(port, max_connections=1)) as proxy:
        idle = await HttpClient.connect(proxy.port)
        try:
            assert (await idle.request(b"GET", b"/")).status == 200
            # The idle keep-alive connection is displaced: the newcomer is served.
            assert (await raw_exchange(proxy.port, request)).startswith(b"HTTP/1.1 200 ")
            assert await read_all(idle.reader, 3) == b""
            assert proxy.stats.evicted == 1
            busy = await HttpClient.connect(proxy.port)
            pending = asyncio.create_task(busy.request(b"GET", b"/slow"))
            await asyncio.sleep(0.3)
            # Every slot busy: a newcomer's request is refused once it is read.
            answer = await raw_exchange(proxy.port, request)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert proxy.stats.rejected == 1
            release.set()
            assert (await pending).status == 200
            await busy.close()
        finally:
            release.set()
            await idle.close()


async def test_interceptor_answers_join_requests_and_passes_the_rest() -> None:

    bodies: list[bytes] = []

    async def join(request: InterceptedRequest) -> InterceptedResponse | None:
        if request.method == "POST" and request.path.startswith("/.rb/"):
            bodies.append(await request.read_body(8192))
            return InterceptedResponse(200, (("Content-Type", "application/json"),), b'{"ok":1}')
        return None

    async with (
        http_target(lambda s: Reply(200, [(b"content-length", b"2")], [b"hi"])) as (
            port,
            seen,
        ),
        running_proxy(_settings(port), interceptor=join) as proxy,
    ):
        client = await HttpClient.connect(proxy.port)
        try:
            joined = await client.request(
                b"POST", b"/.rb/s3cret", [(b"content-length", b"7")], [b'{"a":1}']
            )
            passed = await client.request(b"GET", b"/")
        finally:
            await client.close()
    assert joined.status == 200 and joined.body == b'{"ok":1}'
    assert bodies == [b'{"a":1}']
    assert passed.body == b"hi" and [s.target for s in seen] == [b"/"]


async def test_idle_keep_alive_connection_is_closed_at_the_keep_alive_timeout() -> None:
    empty = Reply(200, [(b"content-length", b"0")])
    async with (
        http_target(lambda s: empty) as (port, _),
        running_proxy(_settings(port, keep_alive_timeout=0.4, idle_timeout=60)) as proxy,
    ):
        client = await HttpClient.connect(proxy.port)
        try:
            assert (await client.request(b"GET", b"/")).status == 200
            started = asyncio.get_running_loop().time()
            assert await read_all(client.reader, 3) == b""
            assert asyncio.get_running_loop().time() - started < 2
        finally:
            await client.close()
        assert proxy.stats.keepalive_timeouts == 1


async def test_a_slow_target_is_bounded_by_the_idle_timeout() -> None:
    """While the proxy waits for the target, the idle timeout (not the head or keep-alive
    one) applies; the client then gets nothing more and the connection closes."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    settings = _settings(0, idle_timeout=0.5, head_timeout=5, keep_alive_timeout=5)
    async with tcp_server(mute) as port:
        settings = _settings(port, idle_timeout=0.5, head_timeout=5, keep_alive_timeout=5)
        async with running_proxy(settings) as proxy:
            answer = await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer == b""
            assert proxy.stats.idle_timeouts == 1
