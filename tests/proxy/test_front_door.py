"""The front door under attack (issue 15): each finding of the raw-byte probes, as a test.

Every test talks raw bytes to a real proxy on 127.0.0.1 in front of a scripted target that
records what it received, so what the target sees (a smuggled request, a foreign host) is
checked as well as what the client gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from rustbalance.proxy import ProxySettings

from .helpers import MASTER, direct_target, read_all, running_proxy, tcp_server

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Recorder"], Awaitable[None]]


@dataclass
class Recorder:
    """What the target received, one entry per connection (in accept order)."""

    connections: list[bytearray] = field(default_factory=list)

    def received(self) -> bytes:
        return b"".join(self.connections)


async def _read_head(reader: asyncio.StreamReader, into: bytearray) -> bytes | None:
    """One request head (None at EOF), recorded."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    into += head
    return head


@contextlib.asynccontextmanager
async def scripted_target(*scripts: Script) -> AsyncIterator[tuple[int, Recorder]]:
    """The n-th connection runs ``scripts[n]`` (the last one for any later connection)."""
    recorder = Recorder()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(recorder.connections)
        recorder.connections.append(bytearray())
        await scripts[min(index, len(scripts) - 1)](reader, writer, recorder)

    async with tcp_server(handler) as port:
        yield port, recorder


def answer(body: bytes) -> Script:
    """Answers every request on its connection with ``200 body`` (keep-alive)."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, rec: Recorder) -> None:
        mine = rec.connections[-1]
        for _ in range(100):
            head = await _read_head(r, mine)
            if head is None:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()

    return script


def _settings(port: int, **kwargs: object) -> ProxySettings:
    return ProxySettings(target=direct_target(port), master_onion=MASTER, **kwargs)  # type: ignore[arg-type]


async def _talk(port: int, data: bytes, *, wait: float = 0.3, limit: float = 5.0) -> bytes:
    """Send ``data``, wait, half-close, read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(wait)
        writer.write_eof()
        return await read_all(reader, limit)
    finally:
        writer.transport.abort()


def _statuses(answer: bytes) -> list[int]:
    return [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:] if part[:3].isdigit()]


# -- finding 1: Content-Length above 2^64-1 ---------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [
        b"18446744073709551621",  # 2^64 + 5: a parser wrapping at 2^64 reads 5
        b"99999999999999999999",
        b"18446744073709551616",  # 2^64
        b"9223372036854775808",  # 2^63: does not fit a signed 64-bit length (off_t)
        b"000000000000000000000000000000000000000000000000000000000000000000000000001",
    ],
)
@pytest.mark.parametrize("method", [b"POST", b"GET"])
async def test_content_length_that_does_not_fit_is_a_400_and_never_forwarded(
    length: bytes, method: bytes
) -> None:
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        request = b"%s / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % (method, length)
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        got = await _talk(p.port, request + smuggled)
    assert _statuses(got) == [400]
    assert seen.received() == b""


async def test_the_largest_length_that_fits_is_forwarded_as_a_number() -> None:
    """2^63 - 1 fits: the head goes on (with the length as digits, no leading zeros)."""
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 09223372036854775807\r\n\r\nab"
        await _talk(p.port, request, wait=0.3, limit=3)
    assert b"content-length: 9223372036854775807\r\n" in seen.received().lower()


# -- finding 2: response desync -----------------------------------------------------------------

_EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


def _first_then(first: bytes, *, later: bytes = b"", delay: float = 0.0) -> Script:
    """Answers the first request with ``first`` (plus ``later`` after ``delay``), then
    answers nothing more on this connection."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, rec: Recorder) -> None:
        mine = rec.connections[-1]
        if await _read_head(r, mine) is None:
            return
        w.write(first)
        await w.drain()
        if later:
            await asyncio.sleep(delay)
            w.write(later)
            await w.drain()
        mine += await read_all(r, 10)

    return script


async def _pipelined(port: int, method: bytes, second_after: float) -> bytes:
    """Two requests (``method`` then GET), the second ``second_after`` s after the first."""
    body = b"" if method in (b"GET", b"HEAD") else b"Content-Length: 2\r\n\r\nhi"
    first = b"%s /first HTTP/1.1\r\nHost: x\r\n%s" % (method, body or b"\r\n")
    second = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if second_after:
            writer.write(first)
            await asyncio.sleep(second_after)
            writer.write(second)
        else:
            writer.write(first + second)
        await asyncio.sleep(0.5)
        writer.write_eof()
        return await read_all(reader, 5)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(
    ("method", "first"),
    [
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + _EVIL),
        (b"POST", b"HTTP/1.1 204 No Content\r\n\r\n" + _EVIL),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n" + _EVIL),
        (b"POST", b"HTTP/1.1 304 Not Modified\r\n\r\n" + _EVIL),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + _EVIL),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + _EVIL),
        (b"POST", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + _EVIL),
    ],
    ids=["204-get", "204-post", "304-get", "304-post", "head", "excess-get", "excess-post"],
)
async def test_bytes_beyond_a_complete_response_never_answer_the_next_request(
    method: bytes, first: bytes
) -> None:
    """A bodiless response (204, 304, HEAD) that carries a body, or any bytes after the end
    of a response, must not become the answer to the client's next (pipelined) request: the
    proxy drops that target connection and asks a fresh one."""
    async with (
        scripted_target(_first_then(first), answer(b"genuine")) as (port, seen),
        running_proxy(_settings(port)) as proxy,
    ):
        got = await _pipelined(proxy.port, method, 0.0)
    assert b"EVIL" not in got
    assert got.endswith(b"\r\n\r\ngenuine")
    assert len(_statuses(got)) == 2
    assert len(seen.connections) == 2  # the second request went to a fresh connection


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_unsolicited_bytes_after_a_response_are_not_the_next_answer(method: bytes) -> None:
    """The target sends a complete response, then 0.3 s later bytes nobody asked for; the
    client's next request (0.6 s after the first) must get a genuine answer."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with (
        scripted_target(_first_then(first, later=_EVIL, delay=0.3), answer(b"genuine")) as (
            port,
            seen,
        ),
        running_proxy(_settings(port)) as proxy,
    ):
        got = await _pipelined(proxy.port, method, 0.6)
    assert b"EVIL" not in got
    assert got.endswith(b"\r\n\r\ngenuine")
    assert len(seen.connections) == 2


# -- finding 3: header timeout; connections that never send a request -------------------------


def test_the_default_request_head_timeout_is_at_most_10_s() -> None:
    settings = ProxySettings(target=direct_target(1))
    assert 0 < settings.head_timeout <= 10.0


async def test_a_client_trickling_its_head_gets_408_at_the_head_timeout() -> None:
    """One header byte every 0.1 s keeps the connection busy (the idle timer never fires);
    the head timeout counts from the start of the request and answers 408."""
    async with (
        scripted_target(answer(b"x")) as (port, seen),
        running_proxy(_settings(port, head_timeout=1.0)) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        reply = asyncio.create_task(read_all(reader, 6))
        try:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                # Until the proxy answers (as a client that reads while it sends would).
                if reply.done() or _has_bytes(reader) or time.monotonic() - started > 4:
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            got = await reply
        finally:
            writer.transport.abort()
    assert got.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in got.lower()
    assert elapsed < 4
    assert seen.received() == b""
    assert proxy.stats.head_timeouts == 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_head_timeout() -> None:
    async with (
        scripted_target(answer(b"x")) as (port, _seen),
        running_proxy(_settings(port, head_timeout=0.5, idle_timeout=60)) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            got = await read_all(reader, 3)
        finally:
            writer.transport.abort()
    assert got.startswith(b"HTTP/1.1 408 ")


async def test_connections_that_never_send_a_request_never_lock_out_a_real_client() -> None:
    """The cap is full of connections that sent nothing (or a few bytes); a real client
    still gets its answer at once (one of them makes room), not a 503."""
    cap = 40
    async with (
        scripted_target(answer(b"real")) as (port, _seen),
        running_proxy(_settings(port, max_connections=cap)) as proxy,
    ):
        idle = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(cap + 10)]
        try:
            for i, (_r, w) in enumerate(idle):
                if i % 2:
                    w.write(b"GET / HT")  # a head begun, never finished
            await asyncio.sleep(0.3)
            for _ in range(5):
                got = await _talk(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait=0.2)
                assert _statuses(got) == [200], got[:100]
                assert got.endswith(b"real")
        finally:
            for _r, w in idle:
                w.transport.abort()
        assert proxy.stats.active <= cap


def _has_bytes(reader: asyncio.StreamReader) -> bool:
    """Whether the proxy's answer has begun to arrive (the reader's buffer is not empty)."""
    return bool(getattr(reader, "_buffer", b""))


# -- finding 4: Content-Length and Transfer-Encoding together ----------------------------------


async def test_a_request_with_both_lengths_is_answered_then_the_connection_closes() -> None:
    """RFC 9112 §6.1: the server MUST close the connection after responding to such a
    request; a request pipelined behind it is not answered, and the target never sees it."""
    request = (
        b"POST /both HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    pipelined = b"GET /behind HTTP/1.1\r\nHost: x\r\n\r\n"

    async def chunked_reader(r: asyncio.StreamReader, w: asyncio.StreamWriter, rec: Recorder):  # type: ignore[no-untyped-def]
        mine = rec.connections[-1]
        for _ in range(10):
            head = await _read_head(r, mine)
            if head is None:
                return
            if b"chunked" in head.lower():
                body = await r.readuntil(b"0\r\n\r\n")
                mine += body
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    async with scripted_target(chunked_reader) as (port, seen), running_proxy(_settings(port)) as p:
        got = await _talk(p.port, request + pipelined)
    assert _statuses(got) == [200]
    assert b"connection: close" in got.lower()
    assert b"/behind" not in seen.received()
    assert b"content-length" not in seen.received().lower()  # the body went chunked only


# -- finding 5: absolute-form with other schemes, authority-form ------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"ws://evil.example/ws",
        b"ftp://evil.example/file",
        b"evil.example:80",
        b"//evil.example/x",
        b"http:/relative",
        b"HTTP://",
    ],
)
async def test_only_origin_form_reaches_the_target(target: bytes) -> None:
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        got = await _talk(p.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    assert _statuses(got) == [400]
    assert seen.received() == b""


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"http://evil.example/a?b=1", b"/a?b=1"),
        (b"HTTPS://evil.example:8443", b"/"),
        (b"http://user@evil.example/p#frag", None),
    ],
)
async def test_http_absolute_form_becomes_origin_form(target: bytes, forwarded: bytes) -> None:
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        got = await _talk(p.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    if forwarded is None:  # userinfo or a fragment: not a valid absolute-form target
        assert _statuses(got) == [400]
        assert seen.received() == b""
    else:
        assert _statuses(got) == [200]
        assert seen.received().startswith(b"GET %s HTTP/1.1\r\n" % forwarded)
        assert b"evil.example" not in seen.received()


async def test_connect_and_asterisk_form_outside_options_are_refused() -> None:
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        connect = await _talk(p.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        star = await _talk(p.port, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
        options = await _talk(p.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _statuses(connect)[0] in (400, 405, 501)
    assert _statuses(star) == [400]
    assert _statuses(options) == [200]
    assert seen.received().startswith(b"OPTIONS * HTTP/1.1\r\n")


# -- finding 6: oversized heads and too many fields -------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Big: " + b"a" * (17 * 1024) + b"\r\n",  # one 17 KiB field: the head is over 16 KiB
        b"".join(b"X-%d: v\r\n" % i for i in range(10_000)),  # 10,000 fields (~90 KiB)
        b"".join(b"X-%d: v\r\n" % i for i in range(150)),  # 150 small fields (1.3 KiB)
    ],
    ids=["17KiB-field", "10000-fields", "150-fields"],
)
async def test_oversized_heads_and_too_many_fields_get_431(extra: bytes) -> None:
    async with scripted_target(answer(b"x")) as (port, seen), running_proxy(_settings(port)) as p:
        got = await _talk(p.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    assert _statuses(got) == [431]
    assert seen.received() == b""
