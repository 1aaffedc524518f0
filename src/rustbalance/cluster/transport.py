"""The asyncio UDP endpoint of the coordination channel (thin shell over messages.py).

:class:`ClusterTransport` binds one UDP socket to ``coordination.listen``, sends the datagrams
the coordinator sealed (per recipient, :class:`~rustbalance.cluster.messages.Sender`) and
passes every received datagram through a :class:`~rustbalance.cluster.messages.Receiver`.
Accepted envelopes go to the ``on_message`` callback; rejected datagrams are counted per
:class:`RejectReason` and logged as a rate-limited WARNING naming the reason and the source
address, never the content (which may be an attacker's text).

Oversize datagrams cannot crash anything: asyncio reads up to 256 KiB per datagram, which is more
than UDP carries, and the Receiver rejects anything larger than ``max_datagram_bytes`` before
looking at it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rustbalance.cluster.messages import (
    DEFAULT_MAX_DATAGRAM_BYTES,
    CoordinationError,
    Envelope,
    Receiver,
    RejectReason,
)
from rustbalance.errors import ConfigError
from rustbalance.rules import parse_endpoint

__all__ = ["DEFAULT_WARN_INTERVAL_SECS", "Address", "ClusterTransport", "RateLimitedLog"]

log = logging.getLogger(__name__)

DEFAULT_WARN_INTERVAL_SECS = 60.0
# A host name is resolved again after this long (a peer may move); IP literals never are.
_RESOLVE_TTL_SECS = 60.0
_RESOLVE_TIMEOUT_SECS = 5.0

# A timestamp outside the tolerance is a replay or, far more often, a wrong clock on one side.
_SKEW_HINT = (
    " (timestamp beyond coordination.clock_skew_tolerance_secs: check the clocks (NTP) of "
    "both nodes)"
)

Address = tuple[str, int]
MessageHandler = Callable[[Envelope, Address], None]


@dataclass
class RateLimitedLog:
    """At most one log line per key per ``interval`` seconds; counts what it suppressed.

    An attacker can send thousands of forged datagrams a second; one line per reason per
    interval keeps the log useful without hiding that it happens.
    """

    logger: logging.Logger
    interval: float = DEFAULT_WARN_INTERVAL_SECS
    monotonic: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: dict[str, int] = field(default_factory=dict)

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log unless ``key`` was logged less than ``interval`` ago; True if a line was written."""
        now = self.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            self.logger.warning(message + " (%d similar suppressed)", *args, suppressed)
        else:
            self.logger.warning(message, *args)
        return True


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: ClusterTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._owner._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP "port unreachable" from a peer that is down lands here on Linux: expected while
        # a node restarts, so it is counted and logged at DEBUG only.
        self._owner.send_errors += 1
        log.debug("coordination socket error: %s", exc)


class ClusterTransport:
    """One bound UDP socket: ``await open()``, ``send(payload, targets)``, ``close()``.

    Not a long-running task: the owner (the coordinator's run loop) opens and closes it. The
    callback ``on_message(envelope, source)`` runs in the event loop for each accepted message.
    """

    def __init__(
        self,
        listen: str,
        receiver: Receiver,
        on_message: MessageHandler,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_datagram_bytes: int = DEFAULT_MAX_DATAGRAM_BYTES,
        warn_interval: float = DEFAULT_WARN_INTERVAL_SECS,
    ) -> None:
        try:
            endpoint = parse_endpoint(listen, allow_port_zero=True)
        except ConfigError as exc:
            raise CoordinationError(f"invalid listen address: {exc}") from None
        self.listen: Address = (endpoint.host, endpoint.port)
        self.receiver = receiver
        self._on_message = on_message
        self._clock = clock
        self._monotonic = monotonic
        self.max_datagram_bytes = max_datagram_bytes
        self._warn = RateLimitedLog(log, warn_interval, monotonic)
        self._transport: asyncio.DatagramTransport | None = None
        self._resolved: dict[str, tuple[Address | None, float]] = {}
        self.rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.datagrams_accepted = 0
        self.send_errors = 0

    def __repr__(self) -> str:
        return f"ClusterTransport(listen={_format_address(self.listen)}, open={self.is_open})"

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def local_address(self) -> Address:
        """The bound address (useful when ``listen`` used port 0)."""
        if self._transport is None:
            raise CoordinationError("transport is not open")
        sockname = self._transport.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1]))

    async def open(self, *, ephemeral: bool = False) -> None:
        """Bind to ``listen`` (or, with ``ephemeral``, to a free port on the same host: used to
        send a last message after the socket was closed)."""
        if self.is_open:
            return
        loop = asyncio.get_running_loop()
        host, port = self.listen
        if ephemeral:
            port = 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(host, port), family=family
        )
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def warn(self, key: str, message: str, *args: object) -> None:
        """A WARNING rate-limited per ``key`` (shared with the reject warnings' limiter)."""
        self._warn.warning(key, message, *args)

    # -- sending ------------------------------------------------------------------------------

    def send_datagram(self, datagram: bytes, targets: Iterable[Address]) -> int:
        if self._transport is None:
            return 0
        sent = 0
        for target in targets:
            try:
                self._transport.sendto(datagram, target)
            except (OSError, ValueError) as exc:
                # An IPv6 target on an IPv4 socket: OSError on the stock loop, ValueError on
                # uvloop ("socket family mismatch"), which must not end the coordinator.
                self._send_failed(exc, target)
                continue
            sent += 1
        self.datagrams_sent += sent
        return sent

    def resolve_cached(self, address: str) -> Address | None:
        """``host:port`` as a socket address without blocking: literals at once, names from
        the cache that :meth:`resolve` fills (None until then)."""
        literal = _literal(address)
        if literal is not None:
            return literal
        entry = self._resolved.get(address)
        return entry[0] if entry is not None else None

    async def resolve(self, address: str) -> Address | None:
        """Resolve ``host:port`` (DNS names through the loop's resolver, cached); None on error."""
        literal = _literal(address)
        if literal is not None:
            return literal
        now = self._monotonic()
        entry = self._resolved.get(address)
        if entry is not None and now - entry[1] < _RESOLVE_TTL_SECS:
            return entry[0]
        resolved: Address | None = None
        try:
            endpoint = parse_endpoint(address)
            family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(
                    endpoint.host, endpoint.port, family=family, type=socket.SOCK_DGRAM
                ),
                _RESOLVE_TIMEOUT_SECS,
            )
            if infos:
                resolved = (str(infos[0][4][0]), int(infos[0][4][1]))
        except (OSError, ConfigError, TimeoutError) as exc:
            self._warn.warning(
                f"resolve:{address}", "cannot resolve peer address %s: %s", address, exc
            )
        self._resolved[address] = (resolved, now)
        return resolved

    # -- receiving ----------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.datagrams_received += 1
        source: Address = (str(addr[0]), int(addr[1]))
        result = self.receiver.receive(data, self._clock())
        if isinstance(result, RejectReason):
            self.rejected[result] += 1
            self._warn.warning(
                f"reject:{result.value}",
                "dropped coordination datagram from %s: %s%s",
                _format_address(source),
                result.value,
                _SKEW_HINT if result in (RejectReason.STALE, RejectReason.FUTURE) else "",
            )
            return
        self.datagrams_accepted += 1
        try:
            self._on_message(result, source)
        except Exception:
            # A bug in a handler must not kill the endpoint (asyncio would only log it and
            # keep going, but say where it came from).
            log.exception("coordination message handler failed for a %s", result.type.name)

    def _send_failed(self, exc: Exception, target: Address | None) -> None:
        self.send_errors += 1
        where = _format_address(target) if target is not None else "a peer"
        self._warn.warning(f"send:{where}", "coordination send to %s failed: %s", where, exc)


def _literal(address: str) -> Address | None:
    try:
        endpoint = parse_endpoint(address)
    except ConfigError:
        return None
    try:
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        return None
    return (endpoint.host, endpoint.port)
