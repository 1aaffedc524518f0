"""HTTP mode: one client connection, relayed message by message through the wire layer
(asyncio shell around :mod:`.wire`).

Every message goes through :mod:`.wire`: heads are parsed strictly and written canonically,
bodies are delimited by the parsed framing (Content-Length passed through or spliced,
chunked decoded and re-encoded), so a byte is never taken for a message it does not belong
to. The rules that keep the two connections in step (RFC 9112):

- a response ends where its framing says; anything the target sends beyond it, or while no
  request is outstanding, ends that target connection (it is never read as the answer to
  the next request); a response to HEAD, a 204 or a 304 has no body whatever it claims;
- a request with both length fields, an HTTP/1.0 client, ``Connection: close`` either way,
  or a response read until close end the client connection after the response;
- a response that ends before its request's body was sent ends both connections (the rest
  of the body could otherwise be read as a request).

The session runs in the protocols' callbacks (:class:`.protocol.SinkProtocol`): requests
and responses need no future, task or coroutine switch each. Only what needs an await
parks the callbacks and wakes the session's coroutine (:meth:`HttpSession.run`): connecting
to the target, asking an interceptor, a protocol switch (101: a raw relay both ways, RFC
9110 §7.8). The rest of a response body of ``relay.BODY_SPLICE_MIN`` bytes or more framed by
Content-Length moves with splice(2) (:class:`.relay.BodySplice`) between plain sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import cast

from . import wire
from .admission import Admission
from .protocol import SinkProtocol, sink_protocol_of, take_buffered
from .relay import BODY_SPLICE_MIN, BodyEnd, BodySplice, relay_both, splice_supported, transport_fd
from .rewrite import RewriteRules, request_field_lines, response_field_lines
from .session import (
    Outcome,
    Phase,
    ProxyStats,
    SessionState,
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
``wants(target: bytes) -> bool``, a cheap synchronous filter on the request target: a
request it does not want goes to the target without asking the interceptor (which would have
returned None), so it stays in the callbacks."""


def _asks(interceptor: Interceptor | None, target: bytes) -> bool:
    """Whether ``interceptor`` is to be asked about a request for ``target``."""
    if interceptor is None:
        return False
    wants = getattr(interceptor, "wants", None)
    return wants is None or bool(wants(target))


RequestVerdict = Callable[[SessionState], "int | None"]


@dataclass
class HttpContext:
    """What an HTTP session needs from the proxy that owns it."""

    settings: ProxySettings
    rules: RewriteRules
    stats: ProxyStats
    connect: Callable[[], Awaitable[Upstream]]
    # A request head arrived: None to go on, or a status to answer instead (503, 429), or 0
    # to close at once (the circuit is cut). The cap and per-circuit limits live in the server.
    on_request: RequestVerdict
    # Session id, and True: it waits for a request again (a waiting connection may be
    # displaced at the cap; that it works on one the cap's bookkeeping reads from its phase).
    waiting: Callable[[int, bool], None]
    # The proxy's connection slots (read here only to skip on_request when it cannot matter).
    admission: Admission
    interceptor: Interceptor | None = None
    draining: bool = False  # the proxy is shutting down: no connection is kept alive


class ClientGone(Exception):
    """The client closed or broke the connection in the middle of a message."""


class TargetGone(Exception):
    """The target closed or broke the connection in the middle of a message."""


class _Need(Enum):
    """Why the callbacks parked: what the coroutine does next."""

    CONNECT = "connect"
    INTERCEPT = "intercept"
    SWITCH = "switch"  # a 101: relay raw bytes both ways
    END = "end"  # the session is over (its outcome says how the server closes it)


# Enum members as module constants: attribute access on an Enum class costs a lookup per
# use on Python 3.11, and these run per message.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = (
    wire.Framing.NONE,
    wire.Framing.LENGTH,
    wire.Framing.CHUNKED,
    wire.Framing.UNTIL_CLOSE,
)
_WAITING, _P_BODY, _ACTIVE = Phase.WAITING, Phase.BODY, Phase.ACTIVE

_CONNECT, _INTERCEPT, _SWITCH, _END = _Need.CONNECT, _Need.INTERCEPT, _Need.SWITCH, _Need.END

# Response stages of the exchange in progress.
_IDLE, _HEAD, _BODY = 0, 1, 2
# Why the client (or the target) is not read: bits of ``_client_hold`` / ``_target_hold``.
_PIPELINE, _PEER_FULL, _PARKED, _SPLICING = 1, 2, 4, 8
# Methods a reused connection may send again when it closed before any answer (RFC 9110
# §9.2.2: idempotent), and only without a body.
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT", b"TRACE"})


class HttpSession:
    """Serves one client connection in http mode."""

    def __init__(
        self,
        ctx: HttpContext,
        state: SessionState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        circuit_field: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.stats = ctx.stats
        self.rules = ctx.rules
        self.reader = reader
        self.writer = writer
        settings = ctx.settings
        self.limits = settings.limits
        # Responses may carry larger heads than requests (Set-Cookie, CSP): 4x the limit.
        self.response_limits = wire.Limits(
            settings.limits.max_head_bytes * 4, settings.limits.max_fields * 4
        )
        self.pipeline_cap = settings.limits.max_head_bytes + settings.read_size
        self.circuit_field = circuit_field
        self.admission = ctx.admission
        self.host_line = b"host: %s\r\n" % ctx.rules.target_authority.encode("latin-1")
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.clock = loop.time
        client = sink_protocol_of(writer)
        assert client is not None  # the proxy's server builds SinkProtocols
        self.client = client
        # A read-write transport (the stream API only types it as writable).
        self.client_transport = cast(asyncio.Transport, writer.transport)
        self.cbuf = bytearray()  # client bytes not used yet (a head, body, pipelined requests)
        self.tbuf = bytearray()  # target bytes not used yet
        self.client_eof = False
        self.client_lost = False
        self._client_hold = 0
        self._target_hold = 0
        # The target connection.
        self.upstream: Upstream | None = None
        self.target: SinkProtocol | None = None
        self.target_transport: asyncio.Transport | None = None
        self.target_eof = False
        self.target_used = False  # it carried an earlier exchange (a retry is possible)
        self.can_splice = splice_supported()
        self.splice: BodySplice | None = None
        # The exchange in progress.
        self.request: wire.Request | None = None
        self.retried: wire.Request | None = None  # the request sent again once already
        self.up_remaining = 0  # request body bytes still to send (Framing.LENGTH)
        self.up_chunks: wire.ChunkedReader | None = None
        self.up_done = True
        self.stage = _IDLE
        self.response: wire.Response | None = None
        self.down_remaining = 0
        self.down_chunks: wire.ChunkedReader | None = None
        self.down_chunked = False  # re-encode the body chunked to the client (else raw)
        self.close_after = False  # the client connection ends after this exchange
        self.reuse = True  # the target connection may carry the next exchange
        # An interceptor reading the request body.
        self.collect: bytearray | None = None
        self.collect_limit = 0
        self.collected: asyncio.Future[bytes] | None = None
        # The coroutine's side.
        self.parked: _Need | None = None
        self.wake: asyncio.Future[_Need] = loop.create_future()

    # -- the coroutine: awaits only what the callbacks cannot do --------------------------------

    async def run(self) -> None:
        early = take_buffered(self.reader)
        self.client.sink = self
        if self.client.ended:
            self.client_eof = True
            self.client_lost = self.client_transport.is_closing()
        try:
            if early:
                self.on_data(early)
            else:
                self._guard(self._next_request)
            if self.request is None and self.parked is None:
                # Found waiting for its request (what arrived is read: a request that was
                # there already made it busy): it may be displaced at the cap meanwhile.
                self.ctx.waiting(self.state.session_id, True)
            while True:  # one turn per park; ends with _END or a protocol switch
                need = await self.wake
                self.wake = self.loop.create_future()
                if need is _END or self.parked is _END:
                    return
                if need is _SWITCH:
                    await self._switch_protocols()
                    return
                if need is _CONNECT:
                    await self._connect()
                elif need is _INTERCEPT:
                    await self._intercept()
        finally:
            self._detach()
            upstream, self.upstream = self.upstream, None
            if upstream is not None:
                upstream.writer.transport.abort()

    def _park(self, need: _Need) -> None:
        if self.parked is _END:
            return
        self.parked = need
        self._hold_client(_PARKED, True)
        if not self.wake.done():
            self.wake.set_result(need)

    def _unpark(self) -> None:
        self.parked = None
        self._hold_client(_PARKED, False)

    def _end(self, outcome: Outcome | None = None) -> None:
        """The session is over: the coroutine returns, the server closes the connection
        (flushing what is written, unless the outcome is one that aborts: server.py)."""
        if outcome is not None:
            self.state.set_outcome(outcome)
        self._park(_END)

    def expire(self, outcome: Outcome) -> bool:
        """The watchdog's verdict (a timeout) or the server's (displaced, circuit cut,
        shutdown): a request that took too long gets its 408 when nothing of an answer went
        out yet, the rest ends at once. False when the coroutine is busy in an await
        (connecting, an interceptor, a tunnel): then the caller cancels it."""
        busy = self.parked is not None and self.parked is not _END
        if self.parked is not _END:
            self._expire(outcome)
        return not busy

    def _expire(self, outcome: Outcome) -> None:
        self.state.set_outcome(outcome)
        if outcome in (Outcome.HEAD_TIMEOUT, Outcome.BODY_TIMEOUT) and self.response is None:
            self._send_error(408)
        elif outcome is Outcome.KEEPALIVE_TIMEOUT:
            self._end()
        else:
            self._end()

    def _guard(self, handler: Callable[[], None]) -> None:
        """Run a handler from a callback; an error ends the session with it logged instead of
        reaching the transport, which would only log it."""
        try:
            handler()
        except Exception:
            log.exception("Session #%d: internal error", self.state.session_id)
            self._end(Outcome.CLIENT_ERROR)

    # -- client side (the session is the client protocol's sink) -----------------------------

    def on_data(self, data: bytes) -> None:
        try:
            self._client_data(data)
        except Exception:
            log.exception("Session #%d: internal error", self.state.session_id)
            self._end(Outcome.CLIENT_ERROR)

    def _client_data(self, data: bytes) -> None:
        state = self.state
        # What the server's byte counting does, inlined: this runs per read.
        n = len(data)
        state.bytes_up += n
        self.stats.bytes_up += n
        now = self.clock()
        state.last_activity = now
        if self.parked is None and not self.cbuf:
            if self.request is None:
                # The common case: the read is exactly one request head (no copy into cbuf).
                end = wire.find_head_end(data)
                if end == n and end <= self.limits.max_head_bytes:
                    self._start_request(data)
                    return
            elif not self.up_done:
                self.cbuf += data
                self._send_body()
                return
        if state.phase is _WAITING:
            state.head_begins(now)
        self.cbuf += data
        if self.parked is _INTERCEPT and self.collect is not None:
            self._send_body()
        elif self.parked is None and self.request is None:
            self._next_request()
        elif len(self.cbuf) > self.pipeline_cap:
            self._hold_client(_PIPELINE, True)  # pipelined requests pile up: wait

    def on_eof(self) -> None:
        self.client_eof = True
        self._guard(self._client_ended)

    def on_lost(self, error: BaseException | None) -> None:
        self.client_eof = self.client_lost = True
        self._guard(self._client_ended)

    def _client_ended(self) -> None:
        if self.parked is _END:
            return
        if self.client_lost and (self.request is not None or self.cbuf):
            self._end(Outcome.CLIENT_ERROR)  # gone mid-request
        elif self.request is None and self.parked is None:
            self._next_request()
        elif not self.up_done and self.parked is None:
            self._end(Outcome.CLIENT_ERROR)  # the body cannot be complete now
        elif self.collected is not None and not self.collected.done():
            self.collected.set_exception(ClientGone("client closed during the request body"))

    def on_write_paused(self, paused: bool) -> None:
        # The client reads slower than the target sends: stop reading the target meanwhile.
        self._hold_target(_PEER_FULL, paused)

    def _hold_client(self, why: int, on: bool) -> None:
        before = self._client_hold
        self._client_hold = before | why if on else before & ~why
        if bool(before) != bool(self._client_hold) and not self.client_transport.is_closing():
            if self._client_hold:
                self.client_transport.pause_reading()
            else:
                self.client_transport.resume_reading()

    def _hold_target(self, why: int, on: bool) -> None:
        before = self._target_hold
        self._target_hold = before | why if on else before & ~why
        transport = self.target_transport
        if transport is None or bool(before) == bool(self._target_hold):
            return
        if transport.is_closing():
            return
        if self._target_hold:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------

    def _next_request(self) -> None:
        """Parse the next request head in ``cbuf`` and send it on, or wait, or stop."""
        buf = self.cbuf
        end = wire.find_head_end(buf)
        if end < 0:
            problem = wire.request_head_problem(buf, self.limits)
            if problem is not None:
                self._bad_request(problem.status)
            elif self.client_eof:
                if buf:
                    self._bad_request(400)  # the client closed mid-head
                else:
                    self._end()
            return
        if end > self.limits.max_head_bytes:
            self._bad_request(431)
            return
        head = bytes(buf[:end])
        del buf[:end]
        self._start_request(head)

    def _start_request(self, head: bytes) -> None:
        """A complete request head: parse it, count it, send it on (or answer it)."""
        try:
            request = wire.parse_request(head, self.limits)
        except wire.MessageError as exc:
            self._bad_request(exc.status)
            return
        state, stats = self.state, self.stats
        state.requests += 1
        stats.requests += 1
        state.phase = _ACTIVE
        # The cap (over it only while newcomers are read) and the circuit's limits.
        verdict = (
            self.ctx.on_request(state)
            if state.circuit is not None or self.admission.over_cap
            else None
        )
        self.request = request
        self.close_after = not request.keep_alive
        if verdict is not None:
            if verdict:
                self._send_error(verdict)  # 503: every slot busy; 429: over the circuit's rate
            else:
                self._end(Outcome.CIRCUIT_CUT)
            return
        framing = request.framing
        if framing is not _NONE and (framing is not _LENGTH or request.length):
            self.up_done = False
            state.phase = _P_BODY
            if framing is _LENGTH:
                self.up_remaining = request.length
                self.up_chunks = None
            else:
                self.up_chunks = wire.ChunkedReader(self.limits)
        if self.ctx.interceptor is not None and _asks(self.ctx.interceptor, request.target):
            self._park(_INTERCEPT)
            return
        self._forward(request)

    def _bad_request(self, status: int) -> None:
        self.state.set_outcome(Outcome.BAD_REQUEST)
        self.stats.bad_requests += 1
        self._send_error(status)

    def _forward(self, request: wire.Request) -> None:
        """Send the current request's head to the target (connecting first if needed)."""
        if self.target is not None and self.target_eof:
            self._drop_target()  # the target closed its idle keep-alive connection
        transport = self.target_transport
        if transport is None:
            self._park(_CONNECT)
            return
        lines = request_field_lines(
            request.fields,
            request.connection,
            self.rules,
            self.host_line,
            upgrade=request.upgrade,
            extra=self.circuit_field,
        )
        transport.write(wire.request_bytes(request, lines))
        self.stage = _HEAD
        if self.collect is not None:  # an interceptor read the body and passed it on
            self._send_collected()
        elif not self.up_done and self.cbuf:
            self._send_body()

    def _send_body(self) -> None:
        """Move request body bytes from ``cbuf`` on (to the target, or to an interceptor)."""
        buf = self.cbuf
        if self.up_chunks is None:
            n = min(len(buf), self.up_remaining)
            if n:
                piece = bytes(buf[:n]) if n < len(buf) else bytes(buf)
                del buf[:n]
                self.up_remaining -= n
                self._body_out(piece, False)
            done = not self.up_remaining
        else:
            reader = self.up_chunks
            try:
                pieces, used = reader.feed(bytes(buf))
            except wire.MessageError as exc:
                self._body_failed(exc.status)
                return
            del buf[:used]
            for piece in pieces:
                self._body_out(piece, True)
            done = reader.done
        if done:
            self.up_done = True
            transport = self.target_transport
            if self.collect is None and transport is not None and self.up_chunks is not None:
                transport.write(wire.last_chunk(wire.trailer_lines(self.up_chunks.trailers)))
            if self.state.phase is _P_BODY:
                self.state.phase = _ACTIVE
            if self.collected is not None and not self.collected.done():
                assert self.collect is not None
                self.collected.set_result(bytes(self.collect))
        elif self.client_eof and self.parked is None:
            self._end(Outcome.CLIENT_ERROR)  # the body cannot be complete now

    def _body_out(self, piece: bytes, chunked: bool) -> None:
        collect = self.collect
        if collect is not None:
            collect += piece
            collected = self.collected
            if len(collect) > self.collect_limit and collected and not collected.done():
                collected.set_exception(ProxyError("request body too large for the interceptor"))
            return
        transport = self.target_transport
        assert transport is not None
        transport.write(wire.chunk(piece) if chunked else piece)

    def _send_collected(self) -> None:
        """The body an interceptor read (then passed the request on) goes to the target."""
        assert self.collect is not None and self.target_transport is not None
        body, self.collect = bytes(self.collect), None
        if self.up_chunks is not None:
            trailers = wire.trailer_lines(self.up_chunks.trailers)
            first = wire.chunk(body) if body else b""
            self.target_transport.write(first + wire.last_chunk(trailers))
        elif body:
            self.target_transport.write(body)

    def _body_failed(self, status: int) -> None:
        """The request body broke its framing (a bad chunk)."""
        self.state.set_outcome(Outcome.BAD_REQUEST)
        self.stats.bad_requests += 1
        self._drop_target()
        if self.response is not None:
            self._end()
        else:
            self._send_error(status)

    # -- target side ------------------------------------------------------------------------

    def on_target_data(self, data: bytes) -> None:
        try:
            self._target_data(data)
        except Exception:
            log.exception("Session #%d: internal error", self.state.session_id)
            self._end(Outcome.CLIENT_ERROR)

    def on_target_eof(self) -> None:
        self._guard(self.target_ended)

    def on_target_lost(self, error: BaseException | None) -> None:
        self._guard(self.target_ended)

    def on_target_write_paused(self, paused: bool) -> None:
        # The target reads slower than the client sends a body: stop reading the client.
        self._hold_client(_PEER_FULL, paused)

    def _target_data(self, data: bytes) -> None:
        stage = self.stage
        if stage == _IDLE:
            # Bytes nobody asked for (RFC 9112 §9.6 gives a server no way to send them):
            # never the answer to the next request. That connection is done.
            self._drop_target()
            return
        if self.tbuf:
            self.tbuf += data
            if stage == _HEAD:
                self._response_head(self._take_tbuf())
            else:
                self._response_body()
        elif stage == _HEAD:
            self._response_head(data)
        elif self.down_chunks is None:
            self._body_down(data)
        else:
            self.tbuf += data
            self._response_body()

    def _take_tbuf(self) -> bytes:
        data = bytes(self.tbuf)
        self.tbuf.clear()
        return data

    def target_ended(self) -> None:
        self.target_eof = True
        stage = self.stage
        if stage == _IDLE:
            self._drop_target()  # idle keep-alive connection closed: reconnect next time
        elif stage == _HEAD:
            self._response_head(self._take_tbuf())
        elif self.response is not None and self.response.framing is _UNTIL_CLOSE:
            self._response_body()
            self._response_done()
        else:
            self._mid_body_failure()

    def _drop_target(self) -> None:
        target, transport = self.target, self.target_transport
        self.target = self.target_transport = None
        self.tbuf.clear()
        self.target_eof = False
        self.target_used = False
        self._target_hold = 0
        if self.splice is not None:
            self.splice.cancel()
            self.splice = None
        if target is not None:
            target.sink = None
        if transport is not None:
            transport.abort()
        self.upstream = None

    def _response_head(self, data: bytes) -> None:
        """Parse response heads from ``data`` (what the target sent, nothing buffered before
        it): interim ones go on (or switch protocols), the final one starts the body; an
        incomplete head waits in ``tbuf``."""
        request = self.request
        assert request is not None
        limit = self.response_limits.max_head_bytes
        while True:  # each turn handles one head (1xx ones, then the final one)
            end = wire.find_head_end(data)
            if end < 0 or end > limit:
                if len(data) > limit:
                    self._upstream_failed("response head too large")
                elif self.target_eof:
                    self.tbuf += data
                    self._target_closed_early()
                else:
                    self.tbuf += data
                    self.state.last_activity = self.clock()
                return
            try:
                response = wire.parse_response(data[:end], request.method, self.response_limits)
            except wire.MessageError as exc:
                self._upstream_failed(exc.reason)
                return
            data = data[end:]
            if response.status >= 200:
                self._final_response(response, data)
                return
            if response.status == 101:
                if not request.upgrade:
                    self._upstream_failed("101 to a request that asked for no upgrade")
                    return
                self._interim(response, switching=True)
                self.tbuf += data
                self._park(_SWITCH)
                return
            if request.minor == 1:  # HTTP/1.0 clients get no interim responses
                self._interim(response, switching=False)

    def _interim(self, response: wire.Response, *, switching: bool) -> None:
        lines = response_field_lines(
            response.fields, response.connection, self.rules, switching=switching
        )
        self._to_client(wire.response_bytes(response.status, response.reason, lines, close=False))

    def _final_response(self, response: wire.Response, rest: bytes) -> None:
        """The final response head; ``rest``: what the target sent after it."""
        self.response = response
        framing = response.framing
        if not response.keep_alive or response.both_lengths or not self.up_done:
            self.reuse = False
        lines = response_field_lines(response.fields, response.connection, self.rules)
        if framing is _LENGTH:
            lines += b"content-length: %d\r\n" % response.length
        elif framing is _CHUNKED:
            self.down_chunks = wire.ChunkedReader(self.response_limits)
            request = self.request
            assert request is not None
            self.down_chunked = request.minor == 1
            if self.down_chunked:
                lines += b"transfer-encoding: chunked\r\n"
            else:
                self.close_after = True  # an HTTP/1.0 client reads it until the close
        elif framing is _UNTIL_CLOSE:
            self.close_after = True
        elif response.length >= 0 and response.status != 204:
            # HEAD and 304: the length the body would have (RFC 9110 §8.6).
            lines += b"content-length: %d\r\n" % response.length
        if not self.up_done or self.ctx.draining:
            self.close_after = True
        head = wire.response_bytes(response.status, response.reason, lines, close=self.close_after)
        if framing is _LENGTH:
            length = response.length
            if len(rest) >= length:
                # The whole body came with the head (the common case): one write (what
                # _to_client and _response_done do, inlined: this runs per response).
                if len(rest) > length:
                    self.reuse = False  # bytes after the response: that connection is done
                    rest = rest[:length]
                data = head + rest
                n = len(data)
                state = self.state
                state.bytes_down += n
                self.stats.bytes_down += n
                state.last_activity = self.clock()
                self.client_transport.write(data)
                self.stage = _IDLE
                if self.up_done:
                    self._exchange_done()
                else:
                    self._response_done()
                return
            self.stage = _BODY
            self.down_remaining = length - len(rest)
            self._to_client(head + rest)
            if self.target_eof:
                self._mid_body_failure()
            elif self.down_remaining >= BODY_SPLICE_MIN:
                self._start_splice()
            return
        if framing is _NONE:
            if rest:
                self.reuse = False  # a bodiless response with bytes behind it
            self._to_client(head)
            self._response_done()
            return
        self.stage = _BODY
        self._to_client(head)
        if rest:
            self.tbuf += rest
        if rest or self.target_eof:
            self._response_body()
            if framing is _UNTIL_CLOSE and self.target_eof and self.stage == _BODY:
                self._response_done()

    def _body_down(self, data: bytes) -> None:
        """Body bytes of a Content-Length or read-until-close response, straight from the
        target's read."""
        response = self.response
        assert response is not None
        if response.framing is _UNTIL_CLOSE:
            self._to_client(data)
            return
        remaining = self.down_remaining
        if len(data) > remaining:
            self.reuse = False  # bytes after the response: that connection is done
            data = data[:remaining]
        self.down_remaining = remaining - len(data)
        self._to_client(data)
        if not self.down_remaining:
            self._response_done()
        elif self.down_remaining >= BODY_SPLICE_MIN:
            self._start_splice()

    def _response_body(self) -> None:
        """Body bytes waiting in ``tbuf``."""
        response = self.response
        assert response is not None
        buf = self.tbuf
        if self.down_chunks is None:
            data = bytes(buf)
            buf.clear()
            if data:
                self._body_down(data)
            return
        try:
            pieces, used = self.down_chunks.feed(bytes(buf))
        except wire.MessageError as exc:
            self._upstream_failed(exc.reason)
            return
        del buf[:used]
        out = [wire.chunk(p) if self.down_chunked else p for p in pieces]
        reader = self.down_chunks
        if reader.done:
            self.down_chunks = None  # (the next response may have another framing)
            if self.down_chunked:
                out.append(wire.last_chunk(wire.trailer_lines(reader.trailers)))
            if buf:
                self.reuse = False  # bytes after the last chunk
            if out:
                self._to_client(b"".join(out))
            self._response_done()
            return
        if out:
            self._to_client(b"".join(out))
        if self.target_eof:
            self._mid_body_failure()

    def _response_done(self) -> None:
        self.stage = _IDLE
        if self.tbuf:
            self.reuse = False  # excess bytes behind the response
        if self.up_done:
            self._exchange_done()
        else:
            # The target answered before the request body was sent (an early 413): the rest
            # of the body could only be skipped by trusting its framing; close instead.
            self._drop_target()
            self._end()

    def _exchange_done(self) -> None:
        """Request sent and response relayed: keep both connections for the next one, or
        end."""
        self.request = self.response = None
        if not self.reuse or self.target_eof:
            self._drop_target()
        else:
            self.target_used = True
        self.reuse = True
        if self.close_after or self.ctx.draining:
            self._end()
            return
        state = self.state
        now = self.clock()
        state.wait_for_request(now)
        self.ctx.waiting(state.session_id, True)
        if self._client_hold & _PIPELINE:
            self._hold_client(_PIPELINE, False)
        if self.cbuf:
            state.head_begins(now)
            self._next_request()
        elif self.client_eof:
            self._next_request()

    def _target_closed_early(self) -> None:
        """The target closed before a complete response head."""
        request = self.request
        assert request is not None
        if (
            self.target_used
            and not self.tbuf
            and self.retried is not request
            and request.framing is _NONE
            and request.method in _RETRYABLE
        ):
            # A reused keep-alive connection the target closed just as we sent: ask again
            # on a fresh one (RFC 9112 §9.3.1 allows retrying idempotent requests).
            self.retried = request
            self._drop_target()
            self._park(_CONNECT)
            return
        self._upstream_failed("target closed before responding")

    def _upstream_failed(self, why: str) -> None:
        """The target broke the exchange before the client got a response head: 502."""
        log.warning("Session #%d: bad response from target: %s", self.state.session_id, why)
        self.stats.upstream_errors += 1
        self.state.set_outcome(Outcome.UPSTREAM_ERROR)
        self._drop_target()
        if self.response is not None:
            self._end()
        else:
            self._send_error(502)

    def _mid_body_failure(self) -> None:
        # Mid-body: the client already has the head, so all we can do is close (the short
        # body tells it something went wrong).
        self.stats.upstream_errors += 1
        self.state.set_outcome(Outcome.UPSTREAM_ERROR)
        self._drop_target()
        self._end()

    def _to_client(self, data: bytes) -> None:
        state = self.state
        # What the server's byte counting does, inlined: this runs per response.
        n = len(data)
        state.bytes_down += n
        self.stats.bytes_down += n
        state.last_activity = self.clock()
        self.client_transport.write(data)

    def _send_error(self, status: int) -> None:
        """A proxy-made error page; the connection closes after it."""
        request = self.request
        head_only = request is not None and request.method == b"HEAD"
        self._drop_target()
        self._to_client(error_response_bytes(status, head_only=head_only))
        self._end()

    # -- splice ------------------------------------------------------------------------------

    def _start_splice(self) -> None:
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
                self.loop,
                src,
                dst,
                self.down_remaining,
                self._count_spliced,
                self._splice_ended,
                ready=lambda: not self.client_transport.get_write_buffer_size(),
            )
        except OSError:  # out of descriptors: copying works without any
            return
        self._hold_target(_SPLICING, True)
        self.splice = splice
        splice.start()

    def _count_spliced(self, n: int) -> None:
        state = self.state
        state.bytes_down += n
        self.stats.bytes_down += n
        state.last_activity = self.clock()

    def _splice_ended(self, kind: BodyEnd, error: BaseException | None) -> None:
        self.splice = None
        if kind is BodyEnd.DONE:
            self.down_remaining = 0
            self._hold_target(_SPLICING, False)
            self._guard(self._response_done)
        elif kind is BodyEnd.TARGET_ENDED:
            self._guard(self._mid_body_failure)
        else:
            self._end(Outcome.CLIENT_ERROR)

    # -- what the coroutine does ---------------------------------------------------------------

    async def _connect(self) -> None:
        state = self.state
        phase = state.phase
        state.phase = Phase.CONNECTING
        try:
            upstream = await self.ctx.connect()
        except ConnectTimeout as exc:
            log.warning("%s", exc)
            self.stats.connect_timeouts += 1
            state.set_outcome(Outcome.CONNECT_TIMEOUT)
            self._send_error(502)
            return
        except UpstreamError as exc:
            log.warning("Session #%d: %s", state.session_id, exc)
            self.stats.upstream_errors += 1
            state.set_outcome(Outcome.UPSTREAM_ERROR)
            self._send_error(502)
            return
        finally:
            state.phase = phase
            state.last_activity = self.clock()
        if self.parked is _END:  # ended meanwhile (the watchdog, a cut)
            upstream.writer.transport.abort()
            return
        target = sink_protocol_of(upstream.writer)
        assert target is not None  # connect_upstream builds SinkProtocols
        self.upstream = upstream
        self.target = target
        # Read-write (streams type it as writable; uvloop's are no ReadTransport subclass).
        self.target_transport = cast(asyncio.Transport, upstream.writer.transport)
        self.target_eof = target.ended
        self.target_used = False
        target.sink = _TargetSink(self)
        early = take_buffered(upstream.reader)
        self._unpark()
        request = self.request
        assert request is not None
        self._guard(lambda: self._forward(request))
        if early and self.parked is None:
            self._target_data(early)

    async def _intercept(self) -> None:
        request = self.request
        interceptor = self.ctx.interceptor
        assert request is not None and interceptor is not None
        seen = InterceptedRequest(
            method=request.method.decode("ascii", "replace"),
            path=request.target.decode("latin-1"),
            headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in request.fields),
            read_body=self._read_body,
        )
        try:
            reply = await interceptor(seen)
        except (ProxyError, ClientGone):
            self.collect = None
            self._send_error(413)
            return
        if self.parked is _END:
            return
        if reply is None:
            self._unpark()
            self._guard(lambda: self._forward(request))
            return
        self.collect = None
        self.state.set_outcome(Outcome.INTERCEPTED)
        # An unread body would be taken for the next request: close instead (RFC 9112 §9.6).
        if not self.up_done:
            self.close_after = True
        self._to_client(self._intercepted_bytes(reply, request))
        self._unpark()
        self.stage = _IDLE
        self.response = None
        self._guard(self._exchange_done)

    async def _read_body(self, limit: int) -> bytes:
        """The request body, whole (an interceptor's ``read_body``); at most ``limit`` bytes."""
        if self.up_done:
            return bytes(self.collect or b"")
        if self.collected is None:
            self.collect = bytearray()
            self.collect_limit = limit
            self.collected = self.loop.create_future()
            self._hold_client(_PARKED, False)  # read on, into ``collect``
            self._send_body()
        try:
            return await self.collected
        finally:
            self._hold_client(_PARKED, True)

    def _intercepted_bytes(self, reply: InterceptedResponse, request: wire.Request) -> bytes:
        fields = [
            (n, v)
            for n, v in reply.headers
            if n.lower() not in ("content-length", "connection", "transfer-encoding")
        ]
        fields.append(("Content-Length", str(len(reply.body))))
        lines = "".join(f"{n}: {v}\r\n" for n, v in fields).encode("latin-1")
        reason = reason_phrase(reply.status).encode("ascii")
        head = wire.response_bytes(reply.status, reason, lines, close=self.close_after)
        return head if request.method == b"HEAD" else head + reply.body

    async def _switch_protocols(self) -> None:
        """After a 101 the connection is a raw byte relay both ways (RFC 9110 §7.8)."""
        upstream = self.upstream
        assert upstream is not None
        client_extra, target_extra = bytes(self.cbuf), bytes(self.tbuf)
        self.cbuf.clear()
        self.tbuf.clear()
        self._detach()
        state, stats = self.state, self.stats

        def count_up(n: int) -> None:
            state.bytes_up += n
            stats.bytes_up += n
            state.last_activity = self.clock()

        def count_down(n: int) -> None:
            state.bytes_down += n
            stats.bytes_down += n
            state.last_activity = self.clock()

        state.phase = _ACTIVE
        await relay_both(
            self.reader,
            self.writer,
            upstream.reader,
            upstream.writer,
            read_size=self.ctx.settings.read_size,
            count_up=count_up,
            count_down=count_down,
            initial_up=client_extra,
            initial_down=target_extra,
        )

    def _detach(self) -> None:
        """Hand both connections back to their streams (idempotent)."""
        if self.splice is not None:
            self.splice.cancel()
            self.splice = None
        if self.client.sink is self:
            self.client.sink = None
        if self._client_hold and not self.client_transport.is_closing():
            self.client_transport.resume_reading()
        self._client_hold = 0
        target = self.target
        if target is not None and isinstance(target.sink, _TargetSink):
            target.sink = None
            transport = self.target_transport
            if self._target_hold and transport is not None and not transport.is_closing():
                transport.resume_reading()
        self._target_hold = 0


class _TargetSink:
    """Routes the target protocol's events to the session's target handlers (bound methods
    held as attributes: one call per read, no extra frame)."""

    __slots__ = ("on_data", "on_eof", "on_lost", "on_write_paused")

    def __init__(self, session: HttpSession) -> None:
        self.on_data = session.on_target_data
        self.on_eof = session.on_target_eof
        self.on_lost = session.on_target_lost
        self.on_write_paused = session.on_target_write_paused
