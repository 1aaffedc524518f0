"""HTTP mode: one client connection, HTTP/1.1 framed by h11 on both sides (asyncio shell).

The client side is an h11 server, the target side an h11 client, so every body is
re-framed from the message headers (RFC 9112 §6): HEAD / 1xx / 204 / 304 responses carry
no body whatever their Content-Length says (§6.3), chunked bodies stream both ways, and
keep-alive carries several requests per connection. After a 101 the connection is a raw
byte relay both ways (RFC 9110 §7.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from .relay import relay_both
from .rewrite import RewriteRules, rewrite_request_headers, rewrite_response_headers
from .session import Outcome, Phase, ProxyStats, SessionState, error_page, reason_phrase
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
        if self.ctx.interceptor is not None:
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
        upstream = self.upstream
        sender = asyncio.create_task(self._send_body(body))

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
        self.state.set_outcome(Outcome.INTERCEPTED)
        # An unread body would be taken for the next request: close instead (RFC 9112 §9.6).
        close = not body.done
        await self._send_simple(reply.status, reply.headers, reply.body, close=close)
        return not close

    async def _ensure_upstream(self) -> bool:
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
            await self._send_error(502)
            return False
        except UpstreamError as exc:
            log.warning("Session #%d: %s", self.state.session_id, exc)
            self.ctx.stats.upstream_errors += 1
            self.state.set_outcome(Outcome.UPSTREAM_ERROR)
            await self._send_error(502)
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
