"""The reverse proxy's asyncio shell: listen, cap, time out, relay, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from types import TracebackType

from .http import ClientGone, HttpContext, HttpSession, Interceptor, TargetGone
from .protocol import make_protocol_factory
from .relay import can_splice, relay_both, splice_both
from .rewrite import RewriteRules
from .session import Outcome, Phase, ProxyStats, SessionState, error_response_bytes
from .settings import ProxyError, ProxySettings
from .upstream import ConnectTimeout, Upstream, UpstreamError, connect_upstream

log = logging.getLogger("rustbalance.proxy")

# How long a refused connection may linger so its 503 reaches the client: closing a socket
# with unread input makes the kernel send RST, which can destroy the response in flight.
_REJECT_LINGER = 0.2


class ReverseProxy:
    """Listens on ``listen_host:listen_port`` and relays every connection to the target.

    ``start()`` binds (``port`` is then the bound port); ``close(drain_timeout)`` stops
    accepting, lets in-flight sessions finish for a bounded time, then cuts the rest.
    ``splice=False`` forces the stream relay in tcp mode (TLS targets always use it);
    ``http_fast_path=False`` sends every http-mode request through h11 (for comparison).
    """

    def __init__(
        self,
        settings: ProxySettings,
        *,
        interceptor: Interceptor | None = None,
        splice: bool = True,
        http_fast_path: bool = True,
    ) -> None:
        self.settings = settings
        # tcp mode to a plain-TCP target relays with splice(2) where the OS has it.
        self._splice = splice
        # http mode parses simple requests itself; False sends every request through h11.
        self._http_fast_path = http_fast_path
        self.stats = ProxyStats()
        self.rules = RewriteRules(
            target_host=settings.target.host,
            target_port=settings.target.port,
            target_tls=settings.target.use_tls,
            master_host=settings.master_onion,
            master_scheme=settings.master_scheme,
        )
        self._interceptor = interceptor
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], SessionState] = {}
        self._stopped_by_us: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._draining = False
        self._port = 0

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen_port=0``)."""
        if self._server is None:
            raise ProxyError("proxy not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.listen_host, self.port

    async def start(self) -> None:
        if self._server is not None:
            raise ProxyError("proxy already started")
        try:
            # asyncio.start_server, but with protocols the http fast path can divert.
            self._server = await asyncio.get_running_loop().create_server(
                make_protocol_factory(self.settings.read_size * 2, self._on_client),
                self.settings.listen_host,
                self.settings.listen_port,
                backlog=min(4096, max(128, self.settings.max_connections)),
            )
        except OSError as exc:
            raise ProxyError(
                f"cannot listen on {self.settings.listen_host}:{self.settings.listen_port}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "Proxy listening on %s:%d (%s mode) -> %s",
            self.settings.listen_host,
            self._port,
            self.settings.mode,
            self.settings.target,
        )

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; wait up to ``drain_timeout`` (default: the setting) for sessions."""
        server = self._server
        if server is None or self._draining:
            return
        self._draining = True
        server.close()
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        # Keep-alive connections waiting for their next request have nothing in flight.
        self._stop(
            [task for task, state in self._sessions.items() if state.phase is Phase.WAITING_REQUEST]
        )
        pending = set(self._sessions)
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=max(0.0, timeout))
        self._stop(list(pending))
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await server.wait_closed()

    async def __aenter__(self) -> ReverseProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _stop(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            state = self._sessions.get(task)
            if state is not None:
                state.set_outcome(Outcome.SHUTDOWN)
            self._stopped_by_us.add(task)
            task.cancel()

    # -- per connection ---------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._next_id += 1
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "?"
        state = SessionState(
            session_id=self._next_id,
            peer=peer,
            target=str(self.settings.target),
            started=loop.time(),
            idle_timeout=self.settings.idle_timeout,
            max_session_seconds=self.settings.max_session_seconds,
        )
        if self.stats.active >= self.settings.max_connections or self._draining:
            self.stats.rejected += 1
            state.outcome = Outcome.REJECTED
            log.info("%s", state.log_line(loop.time(), self.settings.mode))
            await self._reject(reader, writer)
            return
        self.stats.active += 1
        self.stats.total += 1
        self._sessions[task] = state
        _set_nodelay(writer)
        watchdog = asyncio.create_task(self._watch(state, task))
        try:
            if self.settings.mode == "tcp":
                await self._serve_tcp(state, reader, writer)
            else:
                await self._serve_http(state, reader, writer)
        except asyncio.CancelledError:
            if task not in self._stopped_by_us:
                raise
            task.uncancel()
        except (ClientGone, ConnectionError, OSError):
            state.set_outcome(Outcome.CLIENT_ERROR)
        except TargetGone:
            state.set_outcome(Outcome.UPSTREAM_ERROR)
            self.stats.upstream_errors += 1
        except Exception:
            log.exception("Session #%d: internal error", state.session_id)
            state.set_outcome(Outcome.CLIENT_ERROR)
        finally:
            watchdog.cancel()
            try:
                await _close_writer(writer, graceful=state.outcome not in _ABORT_OUTCOMES)
            except asyncio.CancelledError:
                # Cut while flushing (the drain on shutdown ran out): drop the rest. A task
                # we stopped ends normally, so asyncio has no cancelled callback to report.
                writer.transport.abort()
                if task not in self._stopped_by_us:
                    raise
                task.uncancel()
            finally:
                self._sessions.pop(task, None)
                self._stopped_by_us.discard(task)
                self.stats.active -= 1
                log.info("%s", state.log_line(loop.time(), self.settings.mode))

    async def _watch(self, state: SessionState, task: asyncio.Task[None]) -> None:
        """End the session after ``idle_timeout`` without a byte either way, or after
        ``max_session_seconds`` in all (if set)."""
        loop = asyncio.get_running_loop()
        while True:  # each turn sleeps until the next deadline, which moves only forward
            now = loop.time()
            why = state.expired(now)
            if why is not None:
                if why is Outcome.IDLE_TIMEOUT:
                    self.stats.idle_timeouts += 1
                else:
                    self.stats.session_timeouts += 1
                state.set_outcome(why)
                self._stopped_by_us.add(task)
                task.cancel()
                return
            await asyncio.sleep(max(0.001, state.deadline() - now))

    async def _reject(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.settings.mode == "http":
                writer.write(error_response_bytes(503))
                if writer.can_write_eof():
                    writer.write_eof()
                # Read (and drop) what the client sent, briefly, so close() sends FIN, not RST.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_REJECT_LINGER):
                        await writer.drain()
                        await reader.read(65536)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.settings.mode == "tcp":
                writer.transport.abort()
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- helpers the modes share ------------------------------------------------------------

    def _count_up(self, state: SessionState, n: int) -> None:
        state.bytes_up += n
        self.stats.bytes_up += n
        state.touch(asyncio.get_running_loop().time())

    def _count_down(self, state: SessionState, n: int) -> None:
        state.bytes_down += n
        self.stats.bytes_down += n
        state.touch(asyncio.get_running_loop().time())

    def _touch(self, state: SessionState) -> None:
        state.touch(asyncio.get_running_loop().time())

    async def _connect(self) -> Upstream:
        return await connect_upstream(self.settings)

    # -- tcp mode ---------------------------------------------------------------------------

    async def _serve_tcp(
        self, state: SessionState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        state.phase = Phase.CONNECTING
        try:
            upstream = await self._connect()
        except ConnectTimeout as exc:
            log.warning("%s", exc)
            self.stats.connect_timeouts += 1
            state.set_outcome(Outcome.CONNECT_TIMEOUT)
            return
        except UpstreamError as exc:
            log.warning("Session #%d: %s", state.session_id, exc)
            self.stats.upstream_errors += 1
            state.set_outcome(Outcome.UPSTREAM_ERROR)
            return
        state.phase = Phase.ACTIVE
        self._touch(state)
        try:
            if self._splice and can_splice(writer, upstream.writer):
                # Plain TCP both sides: the bytes stay in the kernel (splice through a pipe).
                await splice_both(
                    reader,
                    writer,
                    upstream.reader,
                    upstream.writer,
                    count_up=lambda n: self._count_up(state, n),
                    count_down=lambda n: self._count_down(state, n),
                )
                return
            await relay_both(
                reader,
                writer,
                upstream.reader,
                upstream.writer,
                read_size=self.settings.read_size,
                count_up=lambda n: self._count_up(state, n),
                count_down=lambda n: self._count_down(state, n),
            )
        finally:
            await _close_writer(upstream.writer, graceful=False)

    # -- http mode --------------------------------------------------------------------------

    async def _serve_http(
        self, state: SessionState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ctx = HttpContext(
            settings=self.settings,
            rules=self.rules,
            stats=self.stats,
            connect=self._connect,
            count_up=self._count_up,
            count_down=self._count_down,
            touch=self._touch,
            draining=lambda: self._draining,
            interceptor=self._interceptor,
            fast_path=self._http_fast_path,
        )
        await HttpSession(ctx, state, reader, writer).run()


_ABORT_OUTCOMES = frozenset(
    {Outcome.IDLE_TIMEOUT, Outcome.SESSION_TIMEOUT, Outcome.CLIENT_ERROR, Outcome.SHUTDOWN}
)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close_writer(writer: asyncio.StreamWriter, *, graceful: bool) -> None:
    """Close a stream; a graceful close flushes what is buffered, but never waits long
    (a peer that stopped reading must not pin the socket)."""
    if not graceful:
        writer.transport.abort()
        return
    writer.close()
    try:
        async with asyncio.timeout(5.0):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
