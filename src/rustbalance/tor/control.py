"""asyncio Tor control-port client: connect, authenticate, commands, events, reconnect.

A thin shell over the sans-IO :mod:`rustbalance.tor.control_protocol`:

- :class:`ControlConnection` is one authenticated session. One reader task feeds every byte to
  the parser and routes replies to the waiting command (commands are serialized, replies come
  back in order, control-spec §2.3) and 650 events to subscribers (control-spec §4.1).
- Every write and every wait for a reply has a deadline. When tor does not answer in time the
  connection is closed with :class:`ControlTimeoutError`: once a reply is missing the stream is
  out of sync, so it cannot be reused.
- :class:`ReconnectingController` keeps one session up across tor restarts, with exponential
  backoff and jitter, and re-issues SETEVENTS for its subscribers.

Secrets (cookie, password, SAFECOOKIE hashes) are never logged: only command keywords are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import random as _random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

from rustbalance.errors import ConfigError, ControlError, RuleError
from rustbalance.rules import parse_endpoint
from rustbalance.tor.control_protocol import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_REPLY_SIZE,
    ControlParser,
    ControlProtocolError,
    ControlReplyError,
    Event,
    Reply,
    encode_command,
    encode_data_command,
    parse_authchallenge,
    parse_getconf,
    parse_getinfo,
    parse_protocolinfo,
    quote_string,
    setconf_args,
)

__all__ = [
    "COOKIE_LENGTH",
    "PASSWORD_ENV_VAR",
    "ControlAddress",
    "ControlAuthenticationError",
    "ControlClosedError",
    "ControlConnection",
    "ControlConnectionError",
    "ControlTimeoutError",
    "ReconnectingController",
    "Subscription",
    "password_from_env",
    "safecookie_client_hash",
    "safecookie_server_hash",
]

log = logging.getLogger(__name__)

#: The control password is read from this environment variable, never from argv.
PASSWORD_ENV_VAR = "RUSTBALANCE_TOR_PASSWORD"  # noqa: S105 (a variable name, not a secret)

#: control-spec §3.5 / §3.24: the authentication cookie is 32 bytes.
COOKIE_LENGTH = 32

# control-spec §3.24 (AUTHCHALLENGE): HMAC-SHA256 keys for the two SAFECOOKIE hashes.
_SAFECOOKIE_SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
_SAFECOOKIE_CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"

_ONION_RE = re.compile(r"\A[a-z2-7]{56}\Z")
_FINGERPRINT_RE = re.compile(r"\A\$?([0-9A-Fa-f]{40})\Z")
_EVENT_NAME_RE = re.compile(r"\A[A-Z0-9_]+\Z")


class ControlTimeoutError(ControlError):
    """Tor did not answer (or accept our bytes) within the timeout."""


class ControlConnectionError(ControlError):
    """The control port could not be reached."""


class ControlClosedError(ControlConnectionError):
    """The control connection is closed (by us, by tor, or after an earlier failure)."""


class ControlAuthenticationError(ControlError):
    """Authentication to the control port failed or no usable method was offered."""


def password_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The control password from ``RUSTBALANCE_TOR_PASSWORD`` (None when unset or empty).

    Passwords are taken from the environment so they never appear in ``ps`` output.
    """
    env = os.environ if environ is None else environ
    value = env.get(PASSWORD_ENV_VAR)
    return value or None


def safecookie_server_hash(cookie: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """control-spec §3.24: HMAC-SHA256(server key, cookie | client nonce | server nonce)."""
    msg = cookie + client_nonce + server_nonce
    return hmac.new(_SAFECOOKIE_SERVER_KEY, msg, hashlib.sha256).digest()


def safecookie_client_hash(cookie: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """control-spec §3.24: HMAC-SHA256(controller key, cookie | client nonce | server nonce)."""
    msg = cookie + client_nonce + server_nonce
    return hmac.new(_SAFECOOKIE_CLIENT_KEY, msg, hashlib.sha256).digest()


def _read_cookie(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            cookie = fh.read(COOKIE_LENGTH + 1)
    except OSError as exc:
        raise ControlAuthenticationError(
            f"cannot read tor's cookie file {path}: {exc.strerror or exc}"
        ) from None
    if len(cookie) != COOKIE_LENGTH:
        raise ControlAuthenticationError(
            f"tor's cookie file {path} is not {COOKIE_LENGTH} bytes long"
        )
    return cookie


def _onion_arg(address: str) -> str:
    addr = address.strip().lower().removesuffix(".onion")
    if not _ONION_RE.match(addr):
        raise ControlError(f"not a v3 onion address: {address[:70]!r}")
    return addr


def _server_args(servers: Iterable[str]) -> list[str]:
    out = []
    for server in servers:
        match = _FINGERPRINT_RE.match(server)
        if not match:
            raise ControlError(f"SERVER must be a 40-hex relay fingerprint, got {server[:50]!r}")
        out.append(f"SERVER={match.group(1).upper()}")
    return out


def _tokens(what: str, values: Iterable[str]) -> list[str]:
    """Keys and names must be single tokens: a space would silently split one key into two."""
    out = list(values)
    for value in out:
        if not value or re.search(r"[\x00-\x20\x7f]", value):
            raise ControlError(f"invalid {what} {value[:60]!r}: empty or contains whitespace")
    return out


def _event_names(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        upper = name.upper()
        if not _EVENT_NAME_RE.match(upper):
            raise ControlError(f"invalid event name {name!r}")
        out.append(upper)
    return out


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlAddress:
    """Where tor's control port listens: TCP ``host:port`` or a unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ControlAddress:
        """Accept ``HOST:PORT``, ``[v6]:PORT``, ``PORT`` (127.0.0.1), ``unix:/path``, ``/path``."""
        value = text.strip()
        if value.startswith("unix:"):
            value = value[5:]
            if not value:
                raise ConfigError("control address 'unix:' needs a socket path")
        if value.startswith("/"):
            return cls(path=value)
        if value.isascii() and value.isdigit():
            value = f"127.0.0.1:{value}"  # a bare port, as tor's ControlPort takes it
        try:
            endpoint = parse_endpoint(value)
        except RuleError as exc:
            raise ConfigError(f"control address {text!r}: {exc}") from None
        return cls(host=endpoint.host, port=endpoint.port)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host is not None and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the stream (no timeout here: callers wrap it in one)."""
        if self.path is not None:
            return await asyncio.open_unix_connection(self.path)
        return await asyncio.open_connection(self.host, self.port)


# --------------------------------------------------------------------------------------------
# Event delivery
# --------------------------------------------------------------------------------------------

EventListener = Callable[[Event], None]


class Subscription:
    """A bounded stream of events of some types. Iterate with ``async for``.

    When the queue is full the oldest event is dropped (``dropped`` counts them): a slow consumer
    must never stall the reader, which also carries command replies. Iteration ends when the
    subscription or its connection is closed, after the queued events were delivered.
    """

    def __init__(self, hub: _EventHub, event_types: frozenset[str], maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be positive")
        self.event_types = event_types
        self.dropped = 0
        self._hub = hub
        self._items: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _put(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._items) >= self._maxsize:
            self._items.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("event subscriber too slow: %d events dropped", self.dropped)
        self._items.append(event)
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def get_nowait(self) -> Event | None:
        """The next queued event, or None."""
        return self._items.popleft() if self._items else None

    async def get(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        """Wait for the next event; ControlTimeoutError after ``timeout`` s, ControlClosedError
        once closed and drained."""
        try:
            async with asyncio.timeout(timeout):
                while not self._items:
                    if self._closed:
                        raise ControlClosedError("event subscription closed")
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError:
            raise ControlTimeoutError(f"no event within {timeout} s") from None
        return self._items.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except ControlClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Unsubscribe (SETEVENTS is narrowed to what other subscribers still need)."""
        if self._closed:
            return
        self._end()
        await self._hub.remove(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _EventHub:
    """Subscriptions and listeners of one owner; ``on_change`` re-sends SETEVENTS."""

    def __init__(self, on_change: Callable[[], Awaitable[None]]) -> None:
        self._on_change = on_change
        self._subscriptions: list[Subscription] = []
        # A listener with an empty type set receives every event and adds nothing to SETEVENTS.
        self._listeners: list[tuple[frozenset[str], EventListener]] = []

    def event_types(self) -> frozenset[str]:
        types: set[str] = set()
        for sub in self._subscriptions:
            types |= sub.event_types
        for listener_types, _ in self._listeners:
            types |= listener_types
        return frozenset(types)

    async def subscribe(self, event_types: Iterable[str], maxsize: int) -> Subscription:
        names = frozenset(_event_names(event_types))
        if not names:
            raise ControlError("subscribe() needs at least one event type")
        sub = Subscription(self, names, maxsize)
        self._subscriptions.append(sub)
        try:
            await self._on_change()
        except BaseException:
            sub._end()
            self._subscriptions.remove(sub)
            raise
        return sub

    async def remove(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
            with contextlib.suppress(ControlError):
                await self._on_change()

    async def add_listener(self, listener: EventListener, event_types: Iterable[str]) -> None:
        names = frozenset(_event_names(event_types))
        self._listeners.append((names, listener))
        if names:
            await self._on_change()

    async def remove_listener(self, listener: EventListener) -> None:
        before = len(self._listeners)
        self._listeners = [(t, cb) for t, cb in self._listeners if cb is not listener]
        if len(self._listeners) != before:
            with contextlib.suppress(ControlError):
                await self._on_change()

    def dispatch(self, event: Event) -> None:
        for sub in list(self._subscriptions):
            if event.type in sub.event_types:
                sub._put(event)
        for types, listener in list(self._listeners):
            if not types or event.type in types:
                try:
                    listener(event)
                except Exception:
                    log.exception("event listener failed on a %s event", event.type)

    def end_all(self) -> None:
        for sub in self._subscriptions:
            sub._end()
        self._subscriptions.clear()


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------

DisconnectListener = Callable[[BaseException | None], None]


class ControlConnection:
    """One control-port session. Build it with :meth:`connect`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = 10.0,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        name: str = "control",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._randbytes = randbytes
        self._name = name
        self._parser = ControlParser(max_line_length=max_line_length, max_reply_size=max_reply_size)
        self._lock = asyncio.Lock()
        # Futures of commands sent and not yet answered, in order. A caller cancelled while
        # waiting leaves its future here so its late reply is consumed, not misrouted.
        self._pending: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self._base_events: frozenset[str] = frozenset()
        self._hub = _EventHub(self._sync_events)
        self._disconnect_listeners: list[DisconnectListener] = []
        self._closed = asyncio.Event()
        #: The authentication method that succeeded (None before authentication).
        self.auth_method: str | None = None
        self._close_reason: BaseException | None = None
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"rustbalance-{name}-reader"
        )

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: ControlAddress | str,
        *,
        password: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (part of the documented API)
        authenticate: bool = True,
        allowed_methods: Iterable[str] | None = None,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> ControlConnection:
        """Open and (by default) authenticate a connection; see :meth:`authenticate`.

        ``password`` is for HASHEDPASSWORD: callers take it from :func:`password_from_env`.
        """
        addr = ControlAddress.parse(address) if isinstance(address, str) else address
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await addr.open()
        except TimeoutError:
            raise ControlTimeoutError(
                f"connecting to tor's control port {addr} timed out after {timeout} s"
            ) from None
        except OSError as exc:
            raise ControlConnectionError(
                f"cannot connect to tor's control port {addr}: {exc.strerror or exc}"
            ) from None
        conn = cls(
            reader,
            writer,
            timeout=timeout,
            max_line_length=max_line_length,
            max_reply_size=max_reply_size,
            randbytes=randbytes,
            name=str(addr),
        )
        if authenticate:
            try:
                await conn.authenticate(password, allowed_methods=allowed_methods)
            except BaseException:
                await conn.close()
                raise
        return conn

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> BaseException | None:
        """Why the connection ended (None after a deliberate :meth:`close` or while open)."""
        return self._close_reason

    async def wait_closed(self) -> None:
        """Return once the connection is closed, for whatever reason."""
        await self._closed.wait()

    def add_disconnect_listener(self, listener: DisconnectListener) -> None:
        """Call ``listener(reason)`` once when the connection ends (reason None: closed by us)."""
        if self.is_closed:
            listener(self._close_reason)
        else:
            self._disconnect_listeners.append(listener)

    async def close(self) -> None:
        """Close the connection and cancel the reader. Idempotent."""
        self._shutdown(None)
        task = self._reader_task
        if task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    async def __aenter__(self) -> ControlConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _shutdown(self, reason: BaseException | None) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        failure = reason or ControlClosedError("control connection closed")
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(failure)
                # Mark retrieved: a cancelled caller will never look at it.
                fut.exception()
        self._writer.close()
        self._hub.end_all()
        listeners, self._disconnect_listeners = self._disconnect_listeners, []
        if reason is not None:
            log.warning("control connection %s lost: %s", self._name, reason)
        for listener in listeners:
            try:
                listener(reason)
            except Exception:
                log.exception("disconnect listener failed")

    async def _read_loop(self) -> None:
        reason: BaseException | None = None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    reason = ControlClosedError("tor closed the control connection")
                    return
                for item in self._parser.feed(data):
                    if isinstance(item, Event):
                        self._hub.dispatch(item)
                    elif self._pending:
                        fut = self._pending.popleft()
                        if not fut.done():
                            fut.set_result(item)
                    else:
                        raise ControlProtocolError(
                            f"tor sent a {item.status} reply to no command: {item.message[:60]!r}"
                        )
        except ControlError as exc:
            reason = exc
        except OSError as exc:
            reason = ControlClosedError(f"control connection failed: {exc.strerror or exc}")
        finally:
            if not self._closed.is_set():
                self._shutdown(reason or ControlClosedError("control connection reader stopped"))

    # -- commands -----------------------------------------------------------------------------

    async def request(
        self,
        command: str,
        *args: str,
        data: str | None = None,
        check: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (per-command override)
    ) -> Reply:
        """Send one command (``+command`` with a data block when ``data`` is given), return the
        reply. ``check`` turns a non-2xx reply into :class:`ControlReplyError`. ``args`` are
        tokens sent as they are; quote values with the helpers of ``control_protocol``.
        """
        line = (
            encode_command(command, *args)
            if data is None
            else encode_data_command(command, args, data)
        )
        limit = self._timeout if timeout is None else timeout
        keyword = command.upper()
        async with self._lock:
            if self.is_closed:
                raise ControlClosedError(f"{keyword}: control connection is closed")
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._pending.append(fut)
            # Only the keyword is logged: arguments may be cookies, hashes or passwords.
            log.debug("control %s -> %s", self._name, keyword)
            try:
                async with asyncio.timeout(limit):
                    self._writer.write(line)
                    await self._writer.drain()
                    reply = await asyncio.shield(fut)
            except TimeoutError:
                error = ControlTimeoutError(f"{keyword}: no reply from tor within {limit} s")
                self._shutdown(error)
                raise error from None
            except (OSError, RuntimeError) as exc:
                closed = ControlClosedError(f"{keyword}: cannot write to tor: {exc}")
                self._shutdown(closed)
                raise closed from None
        log.debug("control %s <- %d (%s)", self._name, reply.status, keyword)
        if check:
            reply.raise_for_status(keyword)
        return reply

    async def authenticate(
        self, password: str | None = None, *, allowed_methods: Iterable[str] | None = None
    ) -> None:
        """Authenticate using what PROTOCOLINFO offers (control-spec §3.21, §3.5, §3.24).

        Order: SAFECOOKIE (cookie never sent, tor proves it knows the cookie too), COOKIE,
        HASHEDPASSWORD with ``password``, NULL. The cookie path is the one tor reports.
        ``allowed_methods`` restricts the choice (e.g. ``{"HASHEDPASSWORD"}``). The method used
        is left in :attr:`auth_method`.
        """
        info = parse_protocolinfo(await self.request("PROTOCOLINFO", "1"))
        methods = info.auth_methods
        if allowed_methods is not None:
            methods = methods & {m.upper() for m in allowed_methods}
        problems: list[str] = []
        if info.cookie_file and methods & {"SAFECOOKIE", "COOKIE"}:
            try:
                cookie = _read_cookie(info.cookie_file)
            except ControlAuthenticationError as exc:
                problems.append(str(exc))
            else:
                if "SAFECOOKIE" in methods:
                    await self._auth_safecookie(cookie)
                    self.auth_method = "SAFECOOKIE"
                else:
                    await self._authenticate_with(cookie.hex())
                    self.auth_method = "COOKIE"
                return
        if "HASHEDPASSWORD" in methods:
            if password is not None:
                await self._authenticate_with(quote_string(password))
                self.auth_method = "HASHEDPASSWORD"
                return
            problems.append(f"tor wants a password: set {PASSWORD_ENV_VAR}")
        if "NULL" in methods:
            await self._authenticate_with(None)
            self.auth_method = "NULL"
            return
        offered = ",".join(sorted(methods)) or "none"
        detail = "; ".join(problems) or "no supported method"
        raise ControlAuthenticationError(
            f"cannot authenticate to tor (methods offered: {offered}): {detail}"
        )

    async def _authenticate_with(self, secret_arg: str | None) -> None:
        args = () if secret_arg is None else (secret_arg,)
        try:
            await self.request("AUTHENTICATE", *args)
        except ControlReplyError as exc:
            raise ControlAuthenticationError(
                f"tor refused authentication: {exc.code} {exc.tor_message}"
            ) from None

    async def _auth_safecookie(self, cookie: bytes) -> None:
        client_nonce = self._randbytes(32)
        reply = await self.request("AUTHCHALLENGE", "SAFECOOKIE", client_nonce.hex())
        challenge = parse_authchallenge(reply)
        expected = safecookie_server_hash(cookie, client_nonce, challenge.server_nonce)
        if not hmac.compare_digest(expected, challenge.server_hash):
            raise ControlAuthenticationError(
                "tor's SAFECOOKIE server hash does not match our cookie (wrong tor or cookie file)"
            )
        client_hash = safecookie_client_hash(cookie, client_nonce, challenge.server_nonce)
        await self._authenticate_with(client_hash.hex())

    async def get_info(self, *keys: str) -> dict[str, str]:
        """GETINFO (control-spec §3.9); every requested key is in the result."""
        if not keys:
            raise ControlError("get_info() needs at least one key")
        result = parse_getinfo(await self.request("GETINFO", *_tokens("GETINFO key", keys)))
        missing = [k for k in keys if k not in result]
        if missing:
            raise ControlProtocolError(f"GETINFO reply lacks {', '.join(missing)}")
        return result

    async def get_conf(self, *keys: str) -> dict[str, list[str]]:
        """GETCONF (control-spec §3.3): values per option, as tor spells the option names."""
        if not keys:
            raise ControlError("get_conf() needs at least one key")
        return parse_getconf(await self.request("GETCONF", *_tokens("option name", keys)))

    async def set_conf(self, items: Mapping[str, str | Iterable[str] | None]) -> None:
        """SETCONF (control-spec §3.1); None resets an option, a list sets it several times."""
        if not items:
            raise ControlError("set_conf() needs at least one option")
        await self.request("SETCONF", *setconf_args(items))

    async def reset_conf(self, *keys: str) -> None:
        """RESETCONF (control-spec §3.2): back to defaults."""
        if not keys:
            raise ControlError("reset_conf() needs at least one key")
        await self.request("RESETCONF", *_tokens("option name", keys))

    async def signal(self, name: str) -> None:
        """SIGNAL (control-spec §3.7), e.g. NEWNYM, ACTIVE, RELOAD."""
        await self.request("SIGNAL", *_tokens("signal name", [name]))

    async def set_events(self, *names: str) -> None:
        """Ask for these events (control-spec §3.4). SETEVENTS replaces the whole set, so what is
        sent is these names plus every subscriber's types."""
        self._base_events = frozenset(_event_names(names))
        await self._sync_events()

    async def _sync_events(self) -> None:
        if self.is_closed:
            return
        wanted = sorted(self._base_events | self._hub.event_types())
        await self.request("SETEVENTS", *wanted)

    async def hs_fetch(self, address: str, servers: Iterable[str] = ()) -> None:
        """HSFETCH (control-spec §3.26); results come as HS_DESC / HS_DESC_CONTENT events."""
        await self.request("HSFETCH", _onion_arg(address), *_server_args(servers))

    async def hs_post(
        self, descriptor_text: str, address: str, servers: Iterable[str] = ()
    ) -> None:
        """+HSPOST (control-spec §3.27). HSADDRESS= is always sent: tor 0.4.9 never answers
        without it (tor.md §9.3). ``250`` only means it parsed; results are HS_DESC events."""
        args = [*_server_args(servers), f"HSADDRESS={_onion_arg(address)}"]
        await self.request("HSPOST", *args, data=descriptor_text)

    # -- events -------------------------------------------------------------------------------

    async def subscribe(self, *event_types: str, maxsize: int = 1024) -> Subscription:
        """Subscribe to events; SETEVENTS becomes the union of all subscriptions."""
        if self.is_closed:
            raise ControlClosedError("cannot subscribe: control connection is closed")
        return await self._hub.subscribe(event_types, maxsize)

    async def add_event_listener(self, listener: EventListener, *event_types: str) -> None:
        """Call ``listener(event)`` (synchronously, from the reader) for these event types;
        with no types, for every event received (SETEVENTS is then left to others)."""
        await self._hub.add_listener(listener, event_types)

    async def remove_event_listener(self, listener: EventListener) -> None:
        await self._hub.remove_listener(listener)


# --------------------------------------------------------------------------------------------
# Reconnecting session
# --------------------------------------------------------------------------------------------

ConnectFn = Callable[..., Awaitable[ControlConnection]]
ConnectedListener = Callable[[ControlConnection], Awaitable[None]]


class ReconnectingController:
    """Keeps one authenticated control session up; reconnects with backoff and jitter.

    Subscriptions made here survive reconnects: SETEVENTS is re-issued on every new
    connection. ``on_connected`` callbacks (async) run after each (re)connection, e.g. to re-apply
    SETCONF after a tor restart; ``on_disconnected`` callbacks get the reason of each drop.
    Commands wait up to ``timeout`` for a connection, then raise :class:`ControlTimeoutError`.
    """

    def __init__(
        self,
        address: ControlAddress | str,
        *,
        password: str | None = None,
        timeout: float = 10.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 60.0,
        connect: ConnectFn | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.address = ControlAddress.parse(address) if isinstance(address, str) else address
        self._password = password
        self._timeout = timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._connect: ConnectFn = connect or ControlConnection.connect
        self._sleep = sleep
        self._random = random
        self._hub = _EventHub(self._sync_events)
        self._conn: ControlConnection | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connected_listeners: list[ConnectedListener] = []
        self._disconnected_listeners: list[DisconnectListener] = []
        #: Number of successful connections so far (useful for metrics and tests).
        self.connections = 0

    def backoff_delay(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (0-based): exponential, capped, jittered in [d/2, d]."""
        delay = min(self._max_backoff, self._initial_backoff * 2 ** min(attempt, 32))
        return float(delay / 2 + delay / 2 * self._random())

    def on_connected(self, callback: ConnectedListener) -> None:
        self._connected_listeners.append(callback)

    def on_disconnected(self, callback: DisconnectListener) -> None:
        self._disconnected_listeners.append(callback)

    @property
    def connection(self) -> ControlConnection | None:
        conn = self._conn
        return conn if conn is not None and not conn.is_closed else None

    async def start(self) -> None:
        if self._closing:
            raise ControlClosedError("controller is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="rustbalance-control-reconnect"
            )

    async def wait_connected(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ControlConnection:
        """The live connection, waiting up to ``timeout`` s (default: the command timeout)."""
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while True:
                    if self._closing:
                        raise ControlClosedError("controller is closed")
                    conn = self.connection
                    if conn is not None:
                        return conn
                    await self._up.wait()
                    # _up may still be set for a connection that just dropped: yield once.
                    await asyncio.sleep(0)
        except TimeoutError:
            raise ControlTimeoutError(
                f"no control connection to {self.address} within {limit} s"
            ) from None

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                conn = await self._connect(
                    self.address, password=self._password, timeout=self._timeout
                )
            except (ControlError, OSError) as exc:
                delay = self.backoff_delay(attempt)
                attempt += 1
                log.warning(
                    "control port %s unavailable (%s); retrying in %.1f s", self.address, exc, delay
                )
                await self._sleep(delay)
                continue
            try:
                await conn.add_event_listener(self._hub.dispatch)
                types = self._hub.event_types()
                if types:
                    await conn.set_events(*types)
            except ControlError as exc:
                await conn.close()
                delay = self.backoff_delay(attempt)
                attempt += 1
                log.warning("control session setup failed (%s); retrying in %.1f s", exc, delay)
                await self._sleep(delay)
                continue
            attempt = 0
            self.connections += 1
            self._conn = conn
            self._up.set()
            log.info("control session to %s up", self.address)
            for callback in list(self._connected_listeners):
                try:
                    await callback(conn)
                except Exception:
                    log.exception("on_connected callback failed")
            await conn.wait_closed()
            self._up.clear()
            self._conn = None
            if self._closing:
                break
            reason = conn.close_reason
            for listener in list(self._disconnected_listeners):
                try:
                    listener(reason)
                except Exception:
                    log.exception("on_disconnected callback failed")
            await self._sleep(self.backoff_delay(0))

    async def _sync_events(self) -> None:
        conn = self.connection
        if conn is not None:
            # A lost connection is fine: the next one re-issues SETEVENTS. A refusal by tor
            # (e.g. 552 Unrecognized event) is the caller's to see.
            with contextlib.suppress(ControlConnectionError, ControlTimeoutError):
                await conn.set_events(*self._hub.event_types())

    async def subscribe(self, *event_types: str, maxsize: int = 1024) -> Subscription:
        """A subscription that lives across reconnects until closed."""
        return await self._hub.subscribe(event_types, maxsize)

    async def request(
        self, command: str, *args: str, data: str | None = None, check: bool = True
    ) -> Reply:
        conn = await self.wait_connected()
        return await conn.request(command, *args, data=data, check=check)

    async def get_info(self, *keys: str) -> dict[str, str]:
        return await (await self.wait_connected()).get_info(*keys)

    async def get_conf(self, *keys: str) -> dict[str, list[str]]:
        return await (await self.wait_connected()).get_conf(*keys)

    async def set_conf(self, items: Mapping[str, str | Iterable[str] | None]) -> None:
        await (await self.wait_connected()).set_conf(items)

    async def reset_conf(self, *keys: str) -> None:
        await (await self.wait_connected()).reset_conf(*keys)

    async def signal(self, name: str) -> None:
        await (await self.wait_connected()).signal(name)

    async def hs_fetch(self, address: str, servers: Iterable[str] = ()) -> None:
        await (await self.wait_connected()).hs_fetch(address, servers)

    async def hs_post(
        self, descriptor_text: str, address: str, servers: Iterable[str] = ()
    ) -> None:
        await (await self.wait_connected()).hs_post(descriptor_text, address, servers)

    async def close(self) -> None:
        """Stop reconnecting and close the session. Idempotent."""
        self._closing = True
        self._up.set()  # wake wait_connected() callers so they see the close
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._hub.end_all()

    async def __aenter__(self) -> ReconnectingController:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
