"""HTTP mode: one client connection, HTTP/1.1 framed by h11 on both sides (asyncio shell).

The client side is an h11 server, the target side an h11 client, so every body is
re-framed from the message headers (RFC 9112 §6): HEAD / 1xx / 204 / 304 responses carry
no body whatever their Content-Length says (§6.3), chunked bodies stream both ways, and
keep-alive carries several requests per connection. After a 101 the connection is a raw
byte relay both ways (RFC 9110 §7.8).

The common case -- a bodiless GET/DELETE/OPTIONS from an HTTP/1.1 client, answered with a
Content-Length body -- takes a fast path that parses and writes the bytes itself (h11 costs
most of the time per request). It runs in the protocol callbacks (:class:`_FastLoop`, on
:class:`.protocol.SinkProtocol`): keep-alive requests and their responses need no future,
task or coroutine switch each. It accepts only what it fully checks; anything else (or any
doubt) goes to h11 with the bytes read so far, before anything was sent on, or -- once the
request went to the target -- after bringing both h11 connections to the same state, so the
h11 code decides every unusual case. Both paths produce the same bytes (tests compare them).
An await the callbacks cannot do (connecting to the target, asking an interceptor) hands the
request back to the session's coroutine, which then re-enters the callbacks. A request with
``Connection: close`` is the fast path's too: it answers with h11's ``Connection: close`` and
closes. The rest of a body of ``relay.BODY_SPLICE_MIN`` bytes or more moves with splice(2)
(:class:`.relay.BodySplice`) between plain sockets; through TLS it is copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast
from urllib.parse import urlsplit

import h11

from .protocol import SinkProtocol, sink_protocol_of, take_buffered
from .relay import (
    BODY_SPLICE_MIN,
    BodyEnd,
    BodySplice,
    relay_both,
    splice_supported,
    transport_fd,
)
from .rewrite import (
    RewriteRules,
    request_fields_bytes,
    response_fields_bytes,
    rewrite_request_headers,
    rewrite_response_headers,
)
from .session import (
    Outcome,
    Phase,
    ProxyStats,
    SessionState,
    error_page,
    error_response_bytes,
    reason_phrase,
)
from .settings import ProxyError, ProxySettings
from .upstream import ConnectTimeout, Upstream, UpstreamError

log = logging.getLogger("rustbalance.proxy")


@dataclass(frozen=True)
class InterceptedRequest:
    """What an interceptor sees of a request; ``read_body`` reads the whole body once."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    read_body: Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True)
class InterceptedResponse:
    """A response the node makes itself instead of asking the target."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


Interceptor = Callable[[InterceptedRequest], Awaitable[InterceptedResponse | None]]
"""Answers a request itself (a response) or passes it on (None). It may also have a method
``wants(target: bytes) -> bool``, a cheap synchronous filter on the raw request target: a
request it does not want goes to the target without asking the interceptor (which would have
returned None), so it stays on the fast path's callbacks."""


def _asks(interceptor: Interceptor | None, target: bytes) -> bool:
    """Whether ``interceptor`` is to be asked about a request for ``target``."""
    if interceptor is None:
        return False
    wants = getattr(interceptor, "wants", None)
    return wants is None or bool(wants(target))


@dataclass
class HttpContext:
    """What an HTTP session needs from the proxy that owns it."""

    settings: ProxySettings
    rules: RewriteRules
    stats: ProxyStats
    connect: Callable[[], Awaitable[Upstream]]
    count_up: Callable[[SessionState, int], None]
    count_down: Callable[[SessionState, int], None]
    touch: Callable[[SessionState], None]
    draining: Callable[[], bool]
    interceptor: Interceptor | None = None
    fast_path: bool = True


class ClientGone(Exception):
    """The client closed or broke the connection in the middle of a message."""


class TargetGone(Exception):
    """The target closed or broke the connection in the middle of a message."""


@dataclass
class _Body:
    """The request body, read on demand: an interceptor may buffer it first."""

    session: HttpSession
    buffered: list[bytes] = field(default_factory=list)
    done: bool = False
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def _next(self) -> bytes | None:
        event = await self.session.client_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            self.trailers = list(event.headers)
            return None
        raise ClientGone("client closed during the request body")

    async def read_all(self, limit: int) -> bytes:
        total = sum(len(chunk) for chunk in self.buffered)
        while not self.done:  # bounded by the limit (and the session watchdog)
            chunk = await self._next()
            if chunk is None:
                break
            total += len(chunk)
            if total > limit:
                raise ProxyError("request body too large for the interceptor")
            self.buffered.append(chunk)
        return b"".join(self.buffered)

    async def chunks(self) -> AsyncIterator[bytes]:
        while self.buffered:
            yield self.buffered.pop(0)
        while not self.done:
            chunk = await self._next()
            if chunk is None:
                break
            yield chunk


class HttpSession:
    """Serves one client connection in http mode."""

    def __init__(
        self,
        ctx: HttpContext,
        state: SessionState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.reader = reader
        self.writer = writer
        limit = ctx.settings.max_header_bytes
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        self.upstream: Upstream | None = None
        self.target: h11.Connection | None = None
        self.method = b"GET"
        self._pending = bytearray()  # client bytes the fast path read but did not use yet
        self._carry: _Exit | None = None  # a request the fast path parsed for the next turn

    # -- plumbing ---------------------------------------------------------------------------

    async def client_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:  # each turn reads from the socket or returns
            event = self.client.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.reader.read(self.ctx.settings.read_size)
            except OSError as exc:
                raise ClientGone(f"client connection failed: {exc}") from exc
            if data:
                self.ctx.count_up(self.state, len(data))
                if self.state.phase is Phase.WAITING_REQUEST:
                    self.state.phase = Phase.ACTIVE
            self.client.receive_data(data)

    async def _target_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        assert self.target is not None and self.upstream is not None
        while True:  # each turn reads from the socket or returns
            event = self.target.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.upstream.reader.read(self.ctx.settings.read_size)
            except OSError as exc:
                raise TargetGone(f"target connection failed: {exc}") from exc
            if data:
                self.ctx.touch(self.state)
            self.target.receive_data(data)

    def _to_client(self, event: h11.Event) -> None:
        data = self.client.send(event)
        if data:
            self.ctx.count_down(self.state, len(data))
            self.writer.write(data)

    def _to_target(self, event: h11.Event) -> None:
        assert self.target is not None and self.upstream is not None
        data = self.target.send(event)
        if data:
            self.upstream.writer.write(data)

    async def _close_upstream(self) -> None:
        upstream, self.upstream, self.target = self.upstream, None, None
        if upstream is not None:
            upstream.writer.transport.abort()

    # -- the request loop -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:  # one turn per request; ends when either side stops keep-alive
                if self.ctx.draining():
                    return
                self.state.phase = Phase.WAITING_REQUEST
                if self._fast_possible():
                    handled = await self._fast_request()
                    if handled is False:
                        return
                    if handled is True:
                        continue
                try:
                    event = await self.client_event()
                except h11.RemoteProtocolError as exc:
                    self.state.set_outcome(Outcome.BAD_REQUEST)
                    self.ctx.stats.bad_requests += 1
                    await self._send_error(exc.error_status_hint)
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed: the client is done
                self.state.phase = Phase.ACTIVE
                self.state.requests += 1
                self.ctx.stats.requests += 1
                self.method = bytes(event.method)
                if not await self._handle(event):
                    return
                if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
                    self.client.start_next_cycle()
                else:
                    return
        finally:
            await self._close_upstream()

    async def _handle(self, request: h11.Request) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        body = _Body(self)
        if _asks(self.ctx.interceptor, bytes(request.target)):
            reply = await self._intercept(request, body)
            if reply is not None:
                return reply
        if not await self._ensure_upstream():
            return False
        assert self.target is not None and self.upstream is not None
        self._to_target(
            h11.Request(
                method=request.method,
                target=_origin_form(bytes(request.target)),
                headers=rewrite_request_headers(request.headers, self.ctx.rules),
            )
        )
        sender = asyncio.create_task(self._send_body(body))
        return await self._finish(body, sender)

    async def _finish(self, body: _Body, sender: asyncio.Task[None]) -> bool:
        """Relay the response to a request sent (``sender`` sends its body); False when the
        connection must close afterwards."""
        assert self.upstream is not None
        upstream = self.upstream

        def _on_sent(task: asyncio.Task[None]) -> None:
            # The client failed mid-body: stop waiting for a response to a broken request.
            if not task.cancelled() and task.exception() is not None:
                upstream.writer.transport.abort()

        sender.add_done_callback(_on_sent)
        try:
            keep = await self._relay_response(body, sender)
        except (h11.RemoteProtocolError, TargetGone) as exc:
            keep = False
            failed = _failure(sender)
            if isinstance(failed, h11.RemoteProtocolError):
                # The request body was malformed (e.g. a bad chunk, RFC 9112 §7.1): we cut
                # the target off, so that is not the target's fault.
                self.ctx.stats.bad_requests += 1
                self.state.set_outcome(Outcome.BAD_REQUEST)
                await self._send_error(failed.error_status_hint)
            elif failed is not None:
                raise ClientGone("client failed during the request body") from failed
            else:
                if isinstance(exc, h11.RemoteProtocolError):
                    log.warning("Session #%d: bad response from target", self.state.session_id)
                self.ctx.stats.upstream_errors += 1
                self.state.set_outcome(Outcome.UPSTREAM_ERROR)
                await self._send_error(502)
        finally:
            if not sender.done():
                sender.cancel()
                keep = False
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        if not keep:
            return False
        if self.target is not None:
            if self.target.our_state is h11.DONE and self.target.their_state is h11.DONE:
                self.target.start_next_cycle()
            else:
                await self._close_upstream()
        return True

    async def _intercept(self, request: h11.Request, body: _Body) -> bool | None:
        assert self.ctx.interceptor is not None
        seen = InterceptedRequest(
            method=bytes(request.method).decode("ascii", "replace"),
            path=bytes(request.target).decode("latin-1"),
            headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers),
            read_body=body.read_all,
        )
        try:
            reply = await self.ctx.interceptor(seen)
        except ProxyError:
            await self._send_simple(413, (), error_page(413), close=True)
            return False
        if reply is None:
            return None
        return await self._answer_intercepted(reply, body)

    async def _answer_intercepted(self, reply: InterceptedResponse, body: _Body) -> bool:
        self.state.set_outcome(Outcome.INTERCEPTED)
        # An unread body would be taken for the next request: close instead (RFC 9112 §9.6).
        close = not body.done
        await self._send_simple(reply.status, reply.headers, reply.body, close=close)
        return not close

    async def _ensure_upstream(
        self, send_error: Callable[[int], Awaitable[None]] | None = None
    ) -> bool:
        send_error = send_error or self._send_error
        if self.upstream is not None and (
            self.upstream.reader.at_eof()
            or self.upstream.writer.is_closing()
            or self.target is None
            or self.target.our_state is not h11.IDLE
        ):
            await self._close_upstream()  # the target closed its idle keep-alive connection
        if self.upstream is not None:
            return True
        self.state.phase = Phase.CONNECTING
        try:
            self.upstream = await self.ctx.connect()
        except ConnectTimeout as exc:
            log.warning("%s", exc)
            self.ctx.stats.connect_timeouts += 1
            self.state.set_outcome(Outcome.CONNECT_TIMEOUT)
            await send_error(502)
            return False
        except UpstreamError as exc:
            log.warning("Session #%d: %s", self.state.session_id, exc)
            self.ctx.stats.upstream_errors += 1
            self.state.set_outcome(Outcome.UPSTREAM_ERROR)
            await send_error(502)
            return False
        finally:
            self.state.phase = Phase.ACTIVE
            self.ctx.touch(self.state)
        self.target = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=self.ctx.settings.max_header_bytes
        )
        return True

    async def _send_body(self, body: _Body) -> None:
        assert self.upstream is not None
        writer = self.upstream.writer
        async for chunk in body.chunks():
            self._to_target(h11.Data(data=chunk))
            await writer.drain()
        # Trailers only exist in chunked framing, which the target side then uses too.
        self._to_target(h11.EndOfMessage(headers=body.trailers))
        await writer.drain()

    async def _relay_response(self, body: _Body, sender: asyncio.Task[None]) -> bool:
        rules = self.ctx.rules
        while True:  # interim 1xx responses, then the final one
            event = await self._target_event()
            if isinstance(event, h11.InformationalResponse):
                switching = event.status_code == 101
                self._to_client(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=rewrite_response_headers(event.headers, rules, switching=switching),
                        reason=event.reason,
                    )
                )
                await self.writer.drain()
                if switching:
                    await self._switch_protocols(sender)
                    return False
                continue
            if isinstance(event, h11.Response):
                self._to_client(
                    h11.Response(
                        status_code=event.status_code,
                        headers=rewrite_response_headers(event.headers, rules),
                        reason=event.reason,
                    )
                )
                break
            raise TargetGone("target closed before responding")
        while True:  # the response body, streamed
            event = await self._target_event()
            if isinstance(event, h11.Data):
                self._to_client(h11.Data(data=event.data))
                await self.writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                self._to_client(h11.EndOfMessage())
                await self.writer.drain()
                return True
            else:
                # Mid-body: the client already has the head, so all we can do is close
                # (the short body tells it something went wrong).
                self.ctx.stats.upstream_errors += 1
                self.state.set_outcome(Outcome.UPSTREAM_ERROR)
                return False

    async def _switch_protocols(self, sender: asyncio.Task[None]) -> None:
        assert self.upstream is not None and self.target is not None
        await sender  # the upgrade request has no body; its end switched h11 over
        client_extra = bytes(self.client.trailing_data[0])
        target_extra = bytes(self.target.trailing_data[0])
        state = self.state
        await relay_both(
            self.reader,
            self.writer,
            self.upstream.reader,
            self.upstream.writer,
            read_size=self.ctx.settings.read_size,
            count_up=lambda n: self.ctx.count_up(state, n),
            count_down=lambda n: self.ctx.count_down(state, n),
            initial_up=client_extra,
            initial_down=target_extra,
        )

    # -- the fast path ----------------------------------------------------------------------

    def _fast_possible(self) -> bool:
        if not self.ctx.fast_path:
            return False
        if self.client.our_state is not h11.IDLE or self.client.their_state is not h11.IDLE:
            return False
        data, closed = self.client.trailing_data
        if data or closed:
            return False  # h11 holds bytes (or the EOF) already: it goes on
        return self.target is None or self.target.our_state is h11.IDLE

    def _to_h11(self) -> None:
        """Hand what the fast path read (nothing of it used) to the h11 path."""
        if self._pending:
            self.client.receive_data(bytes(self._pending))
            self._pending.clear()

    async def _fast_request(self) -> bool | None:
        """Requests on the fast path: True (next request), False (close), or None when h11
        must handle the next request (nothing of it was sent on; its bytes are with h11)."""
        found = self._carry
        self._carry = None
        if found is None:
            found = await _FastLoop(self, None).run()
        return await self._after_fast(found)

    async def _after_fast(self, found: _Exit) -> bool | None:
        """Go on from where the callbacks stopped (see :class:`_Exit`)."""
        kind = found.kind
        if kind is _ExitKind.H11:
            self._to_h11()
            if found.eof:
                self.client.receive_data(b"")
            return None
        if kind is _ExitKind.CLOSE:
            return False
        if kind is _ExitKind.SLOW:
            assert found.sent is not None
            return await self._slow_response(found.head, found.sent, found.got, found.eof)
        # REQUEST: a fast request (counted already) that needs an await before it goes on.
        assert found.request is not None
        head = found.head
        method, target, fields = found.request
        if self.ctx.interceptor is not None and _asks(self.ctx.interceptor, target):
            seen = InterceptedRequest(
                method=method.decode("ascii"),
                path=target.decode("latin-1"),
                headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in fields),
                read_body=_no_body,
            )
            try:
                reply = await self.ctx.interceptor(seen)
            except ProxyError:
                self._sync_client(head)
                await self._send_simple(413, (), error_page(413), close=True)
                return False
            if reply is not None:
                self._sync_client(head)
                body = _Body(self, done=True)
                return await self._answer_intercepted(reply, body) and self._next_cycle()
        if not await self._ensure_upstream(self._send_raw_error):
            return False
        assert self.upstream is not None and self.target is not None
        out_target = _origin_form(target)
        out_fields = rewrite_request_headers(fields, self.ctx.rules)
        self.upstream.writer.write(
            b"%s %s HTTP/1.1\r\n%s" % (method, out_target, _serialize_fields(out_fields))
        )
        found = await _FastLoop(self, (head, found.request)).run()
        if found.kind is _ExitKind.REQUEST:
            self._carry = found  # the next turn of the request loop takes it
            return True
        return await self._after_fast(found)

    async def _slow_response(
        self, head: bytes, sent: tuple[bytes, bytes, Fields], got: bytes, eof: bool
    ) -> bool:
        """The response is not for the fast path: bring both h11 connections to where the
        bytes are (request received and sent, ``got`` received) and let h11 relay it."""
        assert self.target is not None
        self._sync_client(head)
        method, target, fields = sent
        self.target.send(h11.Request(method=method, target=target, headers=fields))
        self.target.send(h11.EndOfMessage())
        self.target.receive_data(got)
        if eof:
            self.target.receive_data(b"")
        sender = asyncio.create_task(_nothing())
        await sender  # the request had no body: its "sending" is over before the response
        return await self._finish(_Body(self, done=True), sender) and self._next_cycle()

    def _sync_client(self, head: bytes) -> None:
        """Feed the request head the fast path used (and what followed) to the h11 server."""
        self.client.receive_data(head + bytes(self._pending))
        self._pending.clear()
        request = self.client.next_event()
        end = self.client.next_event()
        assert isinstance(request, h11.Request) and isinstance(end, h11.EndOfMessage)

    def _next_cycle(self) -> bool:
        if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
            self.client.start_next_cycle()
            return True
        return False

    async def _send_raw_error(self, status: int) -> None:
        """An error page on the fast path (h11 saw no request); the connection closes."""
        data = error_response_bytes(status)
        self.ctx.count_down(self.state, len(data))
        with contextlib.suppress(ConnectionError):
            self.writer.write(data)
            await self.writer.drain()

    # -- responses the proxy makes itself ---------------------------------------------------

    async def _send_simple(
        self,
        status: int,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        *,
        close: bool,
    ) -> None:
        if self.client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # mid-response: nothing can be said any more; the connection closes
        fields = [(n, v) for n, v in headers if n.lower() not in ("content-length", "connection")]
        fields.append(("Content-Length", str(len(body))))
        if close:
            fields.append(("Connection", "close"))
        try:
            self._to_client(
                h11.Response(status_code=status, headers=fields, reason=_reason(status))
            )
            if body and self.method != b"HEAD":
                self._to_client(h11.Data(data=body))
            self._to_client(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await self.writer.drain()

    async def _send_error(self, status: int) -> None:
        page = error_page(status)
        headers = (("Content-Type", "text/html; charset=utf-8"),)
        with contextlib.suppress(ConnectionError):
            await self._send_simple(status, headers, page, close=True)


# -- the fast path in callbacks ---------------------------------------------------------------


class _ExitKind(Enum):
    H11 = "h11"  # the next request is not for the fast path: h11 takes the bytes read
    CLOSE = "close"  # the connection closes (outcome and counters set already)
    SLOW = "slow"  # the response is not for the fast path: h11 relays it
    REQUEST = "request"  # a fast request that needs an await (interceptor, connect)


@dataclass
class _Exit:
    """Where :class:`_FastLoop` stopped and what the coroutine takes over."""

    kind: _ExitKind
    eof: bool = False  # H11: the client closed; SLOW: the target closed
    head: bytes = b""  # SLOW / REQUEST: the client's request head, as received
    request: Request | None = None  # REQUEST: the parsed request
    sent: Request | None = None  # SLOW: the request as sent to the target
    got: bytes = b""  # SLOW: what the target sent so far


_HEAD, _RESPONSE, _BODY = 0, 1, 2  # what the loop waits for: a request, a response head, body


class _TargetSink:
    """Routes the target protocol's events to the loop's target handlers."""

    __slots__ = ("loop",)

    def __init__(self, loop: _FastLoop) -> None:
        self.loop = loop

    def on_data(self, data: bytes) -> None:
        try:
            self.loop.target_data(data)
        except Exception as exc:
            self.loop.fail(exc)

    def on_eof(self) -> None:
        self.loop.guard(self.loop.target_ended, None)

    def on_lost(self, error: BaseException | None) -> None:
        self.loop.guard(self.loop.target_ended, None)

    def on_write_paused(self, paused: bool) -> None:
        return None  # only request heads (bounded by max_header_bytes) are written there


class _FastLoop:
    """The fast path, run in the protocols' callbacks: no future, task or coroutine switch
    per request. Keep-alive requests and their responses go through here one after the
    other (pipelined requests wait in ``session._pending``) until something needs h11 or an
    await; then ``run()`` returns an :class:`_Exit` and the session goes on from there, in
    the exact state the await-based code would have reached.

    Flow control: the target is not read while the client's write buffer is over its limit,
    and the client is not read while more than ``pending_cap`` pipelined bytes wait.
    """

    def __init__(self, session: HttpSession, sent: tuple[bytes, Request] | None) -> None:
        # ``sent``: the request head as received and the request parsed from it (the request
        # went to the target already, its response is next).
        self.session = session
        self.ctx = session.ctx
        self.state = session.state
        self.stats = session.ctx.stats
        self.rules = session.ctx.rules
        self.interceptor = session.ctx.interceptor
        loop = asyncio.get_running_loop()
        self.clock = loop.time
        self.done: asyncio.Future[_Exit] = loop.create_future()
        client = sink_protocol_of(session.writer)
        assert client is not None  # the proxy's server builds SinkProtocols
        self.client = client
        # A read-write transport (the stream API only types it as writable).
        self.client_transport = cast(asyncio.Transport, session.writer.transport)
        self.pending = session._pending
        self.limit = self.ctx.settings.max_header_bytes
        self.pending_cap = self.limit + self.ctx.settings.read_size
        self.stage = _HEAD if sent is None else _RESPONSE
        self.sent = sent
        # The request being answered asked to close the connection after its response.
        self.close_after = sent is not None and _asks_close(sent[1][2])
        self.host_line = b"host: %s\r\n" % self.ctx.rules.target_authority.encode("latin-1")
        self.tbuf = bytearray()
        self.remaining = 0
        self.reuse = True
        self.client_eof = False
        self.client_lost = False
        self.target: SinkProtocol | None = None
        self.target_transport: asyncio.Transport | None = None
        self.target_eof = False
        self.client_paused = False  # we paused reading the client
        self.target_paused = False  # we paused reading the target
        self.splice: BodySplice | None = None  # a large body moving with splice(2)
        self.can_splice = splice_supported()

    async def run(self) -> _Exit:
        session = self.session
        early = take_buffered(session.reader)
        self.client.sink = self
        if self.client.ended:
            self.client_eof = True
            self.client_lost = self.client_transport.is_closing()
        upstream = session.upstream
        if upstream is not None:
            target = sink_protocol_of(upstream.writer)
            assert target is not None  # connect_upstream builds SinkProtocols
            self.target = target
            # Read-write (streams type it as writable; uvloop's are no ReadTransport subclass).
            self.target_transport = cast(asyncio.Transport, upstream.writer.transport)
            self.tbuf += take_buffered(upstream.reader)
            target.sink = _TargetSink(self)
            self.target_eof = target.ended
            if self.client.write_paused:
                self.on_write_paused(True)  # the client is behind already: wait for it
        try:
            waiting_response = self.stage == _RESPONSE
            if early:
                self.on_data(early)  # (waiting for a request: this parses it too)
            elif not waiting_response:
                self.guard(self.next_request, None)
            if waiting_response and not self.done.done():
                self.guard(self.try_response, None)  # what the target sent, or its EOF
            return await self.done
        finally:
            self.detach()

    def detach(self) -> None:
        """Hand both connections back to their streams (idempotent)."""
        if self.splice is not None:
            self.splice.cancel()  # (mid-body: the session closes the connection next)
            self.splice = None
        if self.client.sink is self:
            self.client.sink = None
            if self.client_paused:
                self.client_paused = False
                self.client_transport.resume_reading()
        target = self.target
        if target is not None and isinstance(target.sink, _TargetSink):
            target.sink = None
            if self.target_paused:
                self.target_paused = False
                transport = self.target_transport
                if transport is not None:
                    transport.resume_reading()

    def finish(self, found: _Exit) -> None:
        if not self.done.done():
            self.detach()
            self.done.set_result(found)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.detach()
            self.done.set_exception(exc)

    def guard(self, handler: Callable[[Any], None], arg: Any) -> None:
        """Run a handler; an error ends the loop with it (the session task reports it)
        instead of reaching the transport, which would only log it."""
        try:
            handler(arg)
        except Exception as exc:
            self.fail(exc)

    # -- client side (the loop is the client protocol's sink) ------------------------------

    def on_data(self, data: bytes) -> None:
        try:
            self.client_data(data)
        except Exception as exc:
            self.fail(exc)

    def client_data(self, data: bytes) -> None:
        state = self.state
        # What ctx.count_up (ReverseProxy._count_up) does, inlined: this runs per request.
        n = len(data)
        state.bytes_up += n
        self.stats.bytes_up += n
        state.last_activity = self.clock()
        if state.phase is Phase.WAITING_REQUEST:
            state.phase = Phase.ACTIVE
        self.pending += data
        if self.stage == _HEAD:
            self.next_request(None)
        elif len(self.pending) > self.pending_cap and not self.client_paused:
            self.client_paused = True  # pipelined requests pile up: wait for the response
            self.client_transport.pause_reading()

    def on_eof(self) -> None:
        self.client_eof = True
        if self.stage == _HEAD:
            self.guard(self.next_request, None)

    def on_lost(self, error: BaseException | None) -> None:
        self.client_eof = self.client_lost = True
        if self.stage == _HEAD:
            self.guard(self.next_request, None)
        else:
            self.fail(ClientGone(f"client connection lost: {error}"))

    def on_write_paused(self, paused: bool) -> None:
        # The client reads slower than the target sends: stop reading the target meanwhile.
        # (During a body splice the target stays paused: the splice has the bytes.)
        transport = self.target_transport
        if paused == self.target_paused or transport is None or self.splice is not None:
            return
        self.target_paused = paused
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def next_request(self, _arg: object) -> None:
        """Parse the next request head from ``pending`` and send it on, or stop."""
        pending = self.pending
        end = pending.find(b"\r\n\r\n")
        if end < 0:
            if len(pending) > self.limit or b"\n\n" in pending or b"\n\r\n" in pending:
                self.finish(_Exit(_ExitKind.H11))  # too long or bare-LF framing: h11 decides
            elif self.client_eof:
                self.finish(_Exit(_ExitKind.H11, eof=True))
            return
        if self.client_lost:
            self.finish(_Exit(_ExitKind.H11, eof=True))
            return
        head = bytes(pending[: end + 4])
        request = _parse_request(head[:end])
        if request is None:
            self.finish(_Exit(_ExitKind.H11))
            return
        del pending[: end + 4]
        session, state = self.session, self.state
        method, target, fields = request
        state.phase = Phase.ACTIVE
        state.requests += 1
        self.stats.requests += 1
        session.method = method
        if self.target is not None and self.target_eof:
            self.drop_target()  # the target closed its idle keep-alive connection
        transport = self.target_transport
        out = None
        if transport is not None and (
            self.interceptor is None or not _asks(self.interceptor, target)
        ):
            out = request_fields_bytes(fields, self.rules, self.host_line)
        if out is None or transport is None:
            self.finish(_Exit(_ExitKind.REQUEST, head=head, request=request))
            return
        transport.write(b"%s %s HTTP/1.1\r\n%s" % (method, _origin_form(target), out))
        self.sent = (head, request)
        self.close_after = _asks_close(fields)
        self.stage = _RESPONSE
        if self.tbuf:
            self.try_response(None)

    # -- target side -------------------------------------------------------------------------

    def target_data(self, data: bytes) -> None:
        if self.stage == _BODY:  # (what goes on to the client counts as activity)
            self.body(data)
            return
        self.tbuf += data
        if self.stage == _RESPONSE:
            self.try_response(None)

    def target_ended(self, _arg: object) -> None:
        self.target_eof = True
        if self.stage == _RESPONSE:
            self.try_response(None)
        elif self.stage == _BODY:
            self.mid_body_failure()
        else:
            self.drop_target()  # idle keep-alive connection closed: the next one reconnects

    def drop_target(self) -> None:
        target, transport = self.target, self.target_transport
        self.target = self.target_transport = None
        self.tbuf.clear()
        self.target_eof = False
        self.target_paused = False
        if target is not None:
            target.sink = None
        if transport is not None:
            transport.abort()
        self.session.upstream = None
        self.session.target = None

    def mid_body_failure(self) -> None:
        # Mid-body: the client already has the head, so all we can do is close (the short
        # body tells it something went wrong).
        self.ctx.stats.upstream_errors += 1
        self.state.set_outcome(Outcome.UPSTREAM_ERROR)
        self.finish(_Exit(_ExitKind.CLOSE))

    def try_response(self, _arg: object) -> None:
        """Parse the response head in ``tbuf`` and send it (and what body came) on."""
        buf = self.tbuf
        end = buf.find(b"\r\n\r\n")
        response = None
        if end >= 0:
            response = _parse_response(bytes(buf[:end]))
        elif not (self.target_eof or len(buf) > self.limit or b"\n\n" in buf or b"\n\r\n" in buf):
            self.state.last_activity = self.clock()  # (ctx.touch)
            return  # wait for the rest of the head
        fields_out = None
        if response is not None:
            fields_out = response_fields_bytes(response[2], self.rules)
        if response is None or fields_out is None:
            assert self.sent is not None
            head, (method, target, fields) = self.sent
            sent = (method, _origin_form(target), rewrite_request_headers(fields, self.ctx.rules))
            self.finish(_Exit(_ExitKind.SLOW, self.target_eof, head, None, sent, bytes(buf)))
            return
        status, reason, _fields, length, reuse = response
        if self.close_after:
            # What h11 does for a client that asked to close (the connection field is a
            # hop-by-hop one, never among fields_out): "Connection: close" last.
            fields_out = fields_out[:-2] + b"Connection: close\r\n\r\n"
        out = b"HTTP/1.1 %d %s\r\n%s" % (status, reason, fields_out)
        start = end + 4
        if len(buf) - start > length:
            reuse = False  # bytes after the response: do not trust this connection
        body = buf[start : start + length]
        buf.clear()
        self.remaining = length - len(body)
        self.reuse = reuse
        self.to_client(out + body if body else out)
        if self.remaining == 0:
            self.response_done()
        else:
            self.stage = _BODY
            if self.target_eof:
                self.mid_body_failure()
            elif self.remaining >= BODY_SPLICE_MIN:
                self.start_splice()

    def body(self, data: bytes) -> None:
        """Response body bytes: exactly Content-Length of them go on."""
        remaining = self.remaining
        if len(data) > remaining:
            self.reuse = False  # bytes after the response: do not trust this connection
            data = data[:remaining]
        self.remaining = remaining - len(data)
        self.to_client(data)
        if self.remaining == 0:
            self.response_done()
        elif self.remaining >= BODY_SPLICE_MIN:
            self.start_splice()

    def start_splice(self) -> None:
        """Move the rest of a large body with splice(2) (:class:`.relay.BodySplice`) when
        both sockets are plain; it starts once the client's write buffer is empty."""
        target = self.target_transport
        if not self.can_splice or target is None or self.splice is not None:
            return
        src, dst = transport_fd(target), transport_fd(self.client_transport)
        if src is None or dst is None:
            self.can_splice = False  # TLS or no socket: this connection copies
            return
        try:
            splice = BodySplice(
                asyncio.get_running_loop(),
                src,
                dst,
                self.remaining,
                self.count_spliced,
                self.splice_ended,
                ready=lambda: not self.client_transport.get_write_buffer_size(),
            )
        except OSError:  # out of descriptors: copying works without any
            return
        if not self.target_paused:  # (it may be already: the client is behind)
            self.target_paused = True  # (detach resumes it)
            target.pause_reading()
        self.splice = splice
        splice.start()

    def count_spliced(self, n: int) -> None:
        state = self.state
        state.bytes_down += n
        self.stats.bytes_down += n
        state.last_activity = self.clock()

    def splice_ended(self, kind: BodyEnd, error: BaseException | None) -> None:
        self.splice = None
        try:
            if kind is BodyEnd.DONE:
                self.remaining = 0
                self.target_paused = False
                if self.target_transport is not None:
                    self.target_transport.resume_reading()
                self.response_done()
            elif kind is BodyEnd.TARGET_ENDED:
                self.mid_body_failure()
            else:
                self.fail(ClientGone(f"client connection lost: {error}"))
        except Exception as exc:
            self.fail(exc)

    def to_client(self, data: bytes) -> None:
        state = self.state
        # What ctx.count_down (ReverseProxy._count_down) does, inlined: this runs per request.
        n = len(data)
        state.bytes_down += n
        self.stats.bytes_down += n
        state.last_activity = self.clock()
        self.client_transport.write(data)

    def response_done(self) -> None:
        self.stage = _HEAD
        self.sent = None
        if not self.reuse:
            self.drop_target()
        if self.close_after or self.ctx.draining():
            self.finish(_Exit(_ExitKind.CLOSE))
            return
        self.state.phase = Phase.WAITING_REQUEST
        if self.client_paused:
            self.client_paused = False
            self.client_transport.resume_reading()
        if self.pending or self.client_eof:
            self.next_request(None)


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    if not task.done() or task.cancelled():
        return None
    return task.exception()


def _reason(status: int) -> bytes:
    return reason_phrase(status).encode("ascii")


def _origin_form(target: bytes) -> bytes:
    """absolute-form (``http://host/path``) becomes origin-form: we set Host ourselves
    (RFC 9112 §3.2.2: a server must accept absolute-form, the Host field is then ignored)."""
    if target.startswith(b"/") or target == b"*":
        return target
    try:
        parts = urlsplit(target.decode("latin-1"))
    except ValueError:
        return target
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return target
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return path.encode("latin-1")


# -- fast-path parsing (RFC 9112 §3, §5; what h11 accepts, restricted to the simple case) ----

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
# A field value without the blanks around it (RFC 9110 §5.5: visible characters, inner blanks).
# The possessive quantifiers keep every match linear: with plain ones, a long run of blanks
# followed by a bad byte made the regex engine try every split of the run (quadratic: ~10 s
# of a blocked event loop for one 64 KiB header line).
_VALUE = rb"(?:" + _VCHAR + rb"++(?:[ \t]++" + _VCHAR + rb"++)*+)?"
_FIELD_LINE = rb"\r\n" + _TOKEN + rb":[ \t]*+" + _VALUE + rb"[ \t]*+"
# Whole heads (without the final CRLF CRLF) in one match; the fields are then read out of the
# validated block with one findall.
_REQUEST_HEAD = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1((?:" + _FIELD_LINE + rb")*+)"
)
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.1 ([0-9]{3}) ([\t\x20-\x7e\x80-\xff]*)((?:" + _FIELD_LINE + rb")*+)"
)
_FIELD_ITEM = re.compile(rb"\r\n(" + _TOKEN + rb"):[ \t]*+(" + _VALUE + rb")[ \t]*+")
_FAST_METHODS = frozenset({b"GET", b"DELETE", b"OPTIONS"})
_NOT_FAST_REQUEST_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te"})

Fields = list[tuple[bytes, bytes]]
Request = tuple[bytes, bytes, Fields]  # method, target, fields


def _parse_fields(block: bytes) -> Fields:
    """The fields of a block the head regex validated (each line ``CRLF name: value``)."""
    return [(name.lower(), value) for name, value in _FIELD_ITEM.findall(block)]


def _parse_request(head: bytes) -> tuple[bytes, bytes, Fields] | None:
    """A bodiless GET/DELETE/OPTIONS from an HTTP/1.1 client, with exactly one Host and at
    most a plain ``Connection: keep-alive`` or ``close``; None for anything else."""
    match = _REQUEST_HEAD.fullmatch(head)
    if match is None or match[1] not in _FAST_METHODS:
        return None  # obs-fold, bad characters, another method...: h11 decides
    fields = _parse_fields(match[3])
    hosts = lengths = 0
    for name, value in fields:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths += 1
            if value != b"0":
                return None
        elif name == b"connection":
            if value.lower() not in (b"keep-alive", b"close"):
                return None
        elif name in _NOT_FAST_REQUEST_FIELDS:
            return None
    if hosts != 1 or lengths > 1:
        return None
    return match[1], match[2], fields


def _asks_close(fields: Fields) -> bool:
    """The client's ``Connection: close`` (RFC 9112 §9.6): the last response, then close."""
    return any(name == b"connection" and value.lower() == b"close" for name, value in fields)


def _parse_response(head: bytes) -> tuple[int, bytes, Fields, int, bool] | None:
    """An HTTP/1.1 final response framed by one Content-Length: (status, reason, fields,
    length, keep the target connection); None for anything else."""
    match = _RESPONSE_HEAD.fullmatch(head)
    if match is None:
        return None
    status = int(match[1])
    if status < 200 or status in (204, 304):
        return None
    fields = _parse_fields(match[3])
    length: int | None = None
    reuse = True
    for name, value in fields:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                reuse = False
    if length is None:
        return None
    return status, match[2], fields, length, reuse


def _serialize_fields(fields: Fields) -> bytes:
    """Field lines as h11 writes them: Host first, then the rest in order; the blank line."""
    out = [b"%s: %s\r\n" % (n, v) for n, v in fields if n == b"host"]
    out += [b"%s: %s\r\n" % (n, v) for n, v in fields if n != b"host"]
    out.append(b"\r\n")
    return b"".join(out)


async def _no_body(_limit: int) -> bytes:
    return b""


async def _nothing() -> None:
    return None
