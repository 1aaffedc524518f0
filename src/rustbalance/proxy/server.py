"""The reverse proxy's asyncio shell: listen, admit, time out, hand to the mode, drain.

Per connection: a slot at the cap (:class:`.admission.Admission`: a connection still waiting
for a request makes room for a newcomer), tor's PROXY line when circuit ids are on (then the
circuit's limits), a watchdog timer on the phase's deadline (:class:`.session.SessionState`),
then the mode: :class:`.http.HttpSession`, or :func:`.tcp.serve_tcp`. One INFO line per
minute sums up what happened; each connection's own line is DEBUG. Socket and stream helpers
(tor's PROXY line off a stream, the unix socket, the lingering close) are in :mod:`.sockets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from .admission import Admission, Key, Verdict
from .http import ClientGone, HttpContext, HttpSession, Interceptor, TargetGone
from .protocol import make_protocol_factory
from .rewrite import RewriteRules
from .session import (
    Outcome,
    Phase,
    ProxyStats,
    SessionState,
    error_response_bytes,
    summary_line,
)
from .settings import ProxyError, ProxySettings
from .sockets import (
    NO_CIRCUIT,
    bind_unix,
    buffered,
    close_writer,
    read_tor_proxy_line,
    set_nodelay,
)
from .tcp import serve_tcp
from .upstream import Upstream, connect_upstream
from .wire import ProxyLineError

log = logging.getLogger("rustbalance.proxy")

# How long a refused connection may linger so its 503 reaches the client: closing a socket
# with unread input makes the kernel send RST, which can destroy the response in flight.
_REJECT_LINGER = 0.2
# At most one summary line per this many seconds (issue 17: per-connection lines are DEBUG).
SUMMARY_SECONDS = 60.0

CloseCircuit = Callable[[int], Coroutine[Any, Any, None]]


class _Conn:
    """One accepted connection: its task, state, watchdog timer and the mode's way to end
    it gracefully (the http session answers 408 where one is due)."""

    __slots__ = ("expire", "state", "task", "timer")

    def __init__(self, task: asyncio.Task[None], state: SessionState) -> None:
        self.task = task
        self.state = state
        self.timer: asyncio.TimerHandle | None = None
        self.expire: Callable[[Outcome], bool] | None = None


class ReverseProxy:
    """Listens on ``listen_host:listen_port`` (or the unix socket ``listen_unix``) and relays
    every connection to the target.

    ``start()`` binds (``port`` is then the bound port); ``close(drain_timeout)`` stops
    accepting, lets in-flight sessions finish for a bounded time, then cuts the rest.
    ``splice=False`` forces the stream relay in tcp mode (TLS targets always use it).
    ``close_circuit`` (optional) asks tor to close a circuit the proxy cut (CLOSECIRCUIT).
    ``summary_seconds``: how often the INFO summary line may be written.
    """

    def __init__(
        self,
        settings: ProxySettings,
        *,
        interceptor: Interceptor | None = None,
        splice: bool = True,
        close_circuit: CloseCircuit | None = None,
        summary_seconds: float = SUMMARY_SECONDS,
    ) -> None:
        self.settings = settings
        # tcp mode to a plain-TCP target relays with splice(2) where the OS has it.
        self._splice = splice
        self.stats = ProxyStats()
        self.admission = Admission(
            settings.max_connections, settings.circuit_limits, is_waiting=self._is_waiting
        )
        self.rules = RewriteRules(
            target_host=settings.target.host,
            target_port=settings.target.port,
            target_tls=settings.target.use_tls,
            master_host=settings.master_onion,
            master_scheme=settings.master_scheme,
        )
        self._interceptor = interceptor
        self._close_circuit = close_circuit
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._stopped_by_us: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._draining = False
        self._port = 0
        self._summary: asyncio.TimerHandle | None = None
        self._summary_seconds = summary_seconds
        timeouts = settings.timeouts
        self._step = min(timeouts.head, timeouts.keep_alive, timeouts.body, timeouts.idle)
        self._summarised = ProxyStats()
        self._circuit_field = (
            settings.circuit_header.lower().encode("ascii")
            if settings.circuit_header is not None
            else None
        )
        self._http_ctx = HttpContext(
            settings=settings,
            rules=self.rules,
            stats=self.stats,
            connect=self._connect,
            on_request=self._on_request,
            waiting=self.admission.waiting,
            admission=self.admission,
            interceptor=interceptor,
        )

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``listen_port=0``); 0 on a unix socket."""
        if self._server is None:
            raise ProxyError("proxy not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.listen_host, self.port

    @property
    def where(self) -> str:
        """Where the proxy listens once started: ``unix:PATH`` or ``HOST:PORT`` (bound)."""
        if self.settings.listen_unix is not None:
            return f"unix:{self.settings.listen_unix}"
        return f"{self.settings.listen_host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise ProxyError("proxy already started")
        settings = self.settings
        loop = asyncio.get_running_loop()
        # asyncio.start_server, but with protocols the http path can divert to callbacks.
        factory = make_protocol_factory(settings.read_size * 2, self._on_client)
        backlog = min(4096, max(128, settings.max_connections))
        try:
            if settings.listen_unix is not None:
                sock = bind_unix(Path(settings.listen_unix), settings.unix_mode)
                self._server = await loop.create_unix_server(factory, sock=sock, backlog=backlog)
            else:
                self._server = await loop.create_server(
                    factory, settings.listen_host, settings.listen_port, backlog=backlog
                )
                self._port = int(self._server.sockets[0].getsockname()[1])
        except OSError as exc:
            raise ProxyError(f"cannot listen on {settings.where}: {exc.strerror or exc}") from exc
        log.info(
            "Proxy listening on %s (%s mode) -> %s", self.where, settings.mode, settings.target
        )
        if settings.circuit_ids:
            limits = settings.circuit_limits
            log.info(
                "Proxy reads tor's circuit ids: per circuit at most %s streams at once, "
                "%s requests/s (burst %d); a circuit over them is cut for %g s",
                limits.max_connections or "unlimited",
                f"{limits.rate:g}" if limits.rate else "unlimited",
                limits.burst,
                limits.cut_seconds,
            )
        self._summary = loop.call_later(self._summary_seconds, self._summarise)

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting; wait up to ``drain_timeout`` (default: the setting) for sessions."""
        server = self._server
        if server is None or self._draining:
            return
        self._draining = True
        self._http_ctx.draining = True
        server.close()
        if self._summary is not None:
            self._summary.cancel()
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        # Connections waiting for a request have nothing in flight.
        for conn in list(self._conns.values()):
            if conn.state.phase is Phase.WAITING:
                self._expire(conn, Outcome.SHUTDOWN)
        pending = {conn.task for conn in self._conns.values()}
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=max(0.0, timeout))
        for task in pending:
            self._stop(task, Outcome.SHUTDOWN)
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await server.wait_closed()
        for task in list(self._background):
            task.cancel()
        if self.settings.listen_unix is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.listen_unix)

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

    def _stop(self, task: asyncio.Task[None], outcome: Outcome) -> None:
        for conn in self._conns.values():
            if conn.task is task:
                conn.state.set_outcome(outcome)
        self._stopped_by_us.add(task)
        task.cancel()

    def _summarise(self) -> None:
        """The periodic INFO line; also forgets idle circuits."""
        now = self.stats.snapshot()
        line = summary_line(self._summarised, now, self._summary_seconds)
        if line is not None:
            log.info("%s", line)
        self._summarised = now
        loop = asyncio.get_running_loop()
        self.admission.sweep(loop.time())
        self._summary = loop.call_later(self._summary_seconds, self._summarise)

    # -- per connection ---------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next_id += 1
        sid = self._next_id
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "unix"
        settings = self.settings
        state = SessionState(
            session_id=sid,
            peer=peer,
            target=str(settings.target),
            started=now,
            timeouts=settings.timeouts,
        )
        admitted, victim = (False, None) if self._draining else self.admission.admit(sid, now)
        if not admitted:
            self.stats.rejected += 1
            state.outcome = Outcome.REJECTED
            log.debug("%s", state.log_line(loop.time(), settings.mode))
            await self._reject(reader, writer, 503)
            return
        if victim is not None:
            self.stats.evicted += 1
            displaced = self._conns.get(victim)
            if displaced is not None:
                self._expire(displaced, Outcome.EVICTED)
        if settings.mode == "tcp" and not settings.circuit_ids:
            # Nothing to wait for: the stream is relayed at once, so it must fit the cap now.
            state.phase = Phase.CONNECTING
            if not self._make_room(state):
                self.admission.release(sid)
                log.debug("%s", state.log_line(loop.time(), settings.mode))
                await self._reject(reader, writer, 503)
                return
        conn = _Conn(task, state)
        self._conns[sid] = conn
        self.stats.active += 1
        self.stats.total += 1
        set_nodelay(writer)
        self._arm(conn)
        try:
            if await self._identify(conn, reader, writer):
                if settings.mode == "tcp":
                    await self._serve_tcp(state, reader, writer)
                else:
                    await self._serve_http(conn, reader, writer)
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
            log.exception("Session #%d: internal error", sid)
            state.set_outcome(Outcome.CLIENT_ERROR)
        finally:
            if conn.timer is not None:
                conn.timer.cancel()
            try:
                graceful = state.outcome not in _ABORT_OUTCOMES
                await close_writer(writer, graceful=graceful, reader=reader)
            except asyncio.CancelledError:
                # Cut while flushing (the drain on shutdown ran out): drop the rest. A task
                # we stopped ends normally, so asyncio has no cancelled callback to report.
                writer.transport.abort()
                if task not in self._stopped_by_us:
                    raise
                task.uncancel()
            finally:
                self._conns.pop(sid, None)
                self.admission.release(sid)
                self._stopped_by_us.discard(task)
                self.stats.active -= 1
                log.debug("%s", state.log_line(loop.time(), settings.mode))

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, conn: _Conn) -> None:
        """Look again at the phase's deadline, or sooner: never later than the shortest
        timeout from now, so a phase change to a sooner deadline (a response ends, the
        keep-alive wait begins) needs no re-arming per request."""
        loop = asyncio.get_running_loop()
        at = min(conn.state.deadline(), loop.time() + self._step)
        conn.timer = loop.call_at(at, self._check, conn)

    def _is_waiting(self, session: int) -> bool:
        """Whether a session waits for a request (or tor's PROXY line): it may be displaced."""
        conn = self._conns.get(session)
        return conn is None or conn.state.phase in _WAITING_PHASES

    def _check(self, conn: _Conn) -> None:
        """The watchdog: end the connection when its phase's deadline passed, else look again
        at the (moved) deadline."""
        why = conn.state.expired(asyncio.get_running_loop().time())
        if why is None:
            self._arm(conn)
            return
        conn.timer = None
        stats = self.stats
        if why is Outcome.IDLE_TIMEOUT:
            stats.idle_timeouts += 1
        elif why is Outcome.SESSION_TIMEOUT:
            stats.session_timeouts += 1
        elif why is Outcome.HEAD_TIMEOUT:
            stats.head_timeouts += 1
        elif why is Outcome.KEEPALIVE_TIMEOUT:
            stats.keepalive_timeouts += 1
        elif why is Outcome.BODY_TIMEOUT:
            stats.body_timeouts += 1
        self._expire(conn, why)

    def _expire(self, conn: _Conn, why: Outcome) -> None:
        """End a connection: gracefully by its mode where it can, else by cancelling it (not
        the task running this: the connection whose own stream cut its circuit ends by
        itself, and a cancel it would never await again would end it as cancelled)."""
        if conn.expire is not None and conn.expire(why):
            return
        conn.state.set_outcome(why)
        if conn.task is asyncio.current_task():
            return
        self._stopped_by_us.add(conn.task)
        conn.task.cancel()

    # -- circuits ---------------------------------------------------------------------------

    async def _identify(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read tor's PROXY line (when circuit ids are on) and count the stream against its
        circuit; False when the connection ends here."""
        if not self.settings.circuit_ids:
            return True
        state = conn.state
        if not buffered(reader):
            # Found waiting for tor's line: it may be displaced at the cap meanwhile.
            self.admission.waiting(state.session_id, True)
        try:
            line = await read_tor_proxy_line(reader)
        except ProxyLineError as exc:
            log.warning(
                "Session #%d: %s (is HiddenServiceExportCircuitID on?)", state.session_id, exc
            )
            state.set_outcome(Outcome.BAD_REQUEST)
            self.stats.bad_requests += 1
            return False
        if line is None:  # closed before the line
            return False
        if line is NO_CIRCUIT:  # a local client: no circuit, no circuit limits
            if self.settings.mode == "tcp":
                state.phase = Phase.CONNECTING
                self.admission.waiting(state.session_id, False)
                return self._make_room(state)
            return True
        state.circuit = line.key
        loop = asyncio.get_running_loop()
        verdict = self.admission.identify(state.session_id, line.key, loop.time())
        if verdict is Verdict.OK:
            if self.settings.mode == "tcp":
                state.phase = Phase.CONNECTING
                self.admission.waiting(state.session_id, False)
                return self._make_room(state)
            return True
        if verdict is Verdict.THROTTLE:
            self.stats.throttled += 1
            state.set_outcome(Outcome.THROTTLED)
            if self.settings.mode == "http":
                await self._reject(reader, writer, 429)
            return False
        if verdict is Verdict.CUT:
            self._cut(line.key)
        else:
            self.stats.circuit_refused += 1
        state.set_outcome(Outcome.CIRCUIT_CUT)
        return False

    def _make_room(self, state: SessionState) -> bool:
        """The session starts work: over the cap it displaces a waiting one or is refused."""
        ok, victim = self.admission.make_room(state.session_id)
        if victim is not None:
            self.stats.evicted += 1
            displaced = self._conns.get(victim)
            if displaced is not None:
                self._expire(displaced, Outcome.EVICTED)
        if not ok:
            self.stats.rejected += 1
            state.set_outcome(Outcome.REJECTED)
        return ok

    def _on_request(self, state: SessionState) -> int | None:
        """An http request head arrived: None to go on, 503 (every slot busy), 429 (over the
        circuit's rate), or 0 (the circuit is cut: close)."""
        if self.admission.over_cap and not self._make_room(state):
            return 503
        if state.circuit is None:
            return None
        verdict = self.admission.request(state.session_id, asyncio.get_running_loop().time())
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.THROTTLE:
            self.stats.throttled += 1
            state.set_outcome(Outcome.THROTTLED)
            return 429
        if verdict is Verdict.CUT:
            self._cut(state.circuit)
        else:
            self.stats.circuit_refused += 1
        return 0

    def _cut(self, key: Key) -> None:
        """Close every connection of a circuit that went over its limits; tor is asked to
        close the circuit itself when the proxy can reach its control port."""
        cut = self.admission.last_cut
        reason = cut.reason if cut is not None else "over its limits"
        self.stats.circuits_cut += 1
        sessions = self.admission.sessions_of(key)
        victims = [self._conns[sid] for sid in sessions if sid in self._conns]
        log.warning(
            "Cut circuit %s: %s; closed its %d connection(s), its new streams are refused for %g s",
            key,
            reason,
            len(victims),
            self.settings.circuit_limits.cut_seconds,
        )
        for conn in victims:
            conn.state.set_outcome(Outcome.CIRCUIT_CUT)
            self._expire(conn, Outcome.CIRCUIT_CUT)
        if self._close_circuit is not None and isinstance(key, int):
            task = asyncio.get_running_loop().create_task(self._close_circuit(key))
            self._background.add(task)
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("Could not ask tor to close a cut circuit: %s", task.exception())

    # -- helpers the modes share ------------------------------------------------------------

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int
    ) -> None:
        try:
            if self.settings.mode == "http":
                writer.write(error_response_bytes(status))
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

    def _counter(self, state: SessionState, up: bool) -> Callable[[int], None]:
        stats = self.stats
        clock = asyncio.get_running_loop().time

        def count(n: int) -> None:
            if up:
                state.bytes_up += n
                stats.bytes_up += n
            else:
                state.bytes_down += n
                stats.bytes_down += n
            state.last_activity = clock()

        return count

    async def _connect(self) -> Upstream:
        return await connect_upstream(self.settings)

    # -- tcp mode ---------------------------------------------------------------------------

    async def _serve_tcp(
        self, state: SessionState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await serve_tcp(
            state,
            reader,
            writer,
            connect=self._connect,
            stats=self.stats,
            read_size=self.settings.read_size,
            splice=self._splice,
            count_up=self._counter(state, True),
            count_down=self._counter(state, False),
        )

    # -- http mode --------------------------------------------------------------------------

    async def _serve_http(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        field = None
        if self._circuit_field is not None and conn.state.circuit is not None:
            field = (self._circuit_field, str(conn.state.circuit).encode("ascii"))
        session = HttpSession(self._http_ctx, conn.state, reader, writer, circuit_field=field)
        conn.expire = session.expire
        await session.run()


_WAITING_PHASES = frozenset({Phase.WAITING, Phase.HEAD})
_ABORT_OUTCOMES = frozenset(
    {
        Outcome.IDLE_TIMEOUT,
        Outcome.SESSION_TIMEOUT,
        Outcome.CLIENT_ERROR,
        Outcome.SHUTDOWN,
        Outcome.EVICTED,
        Outcome.CIRCUIT_CUT,
    }
)
