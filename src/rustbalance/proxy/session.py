"""Per-connection state, deadlines, counters and canned responses (pure, no I/O; clock injected).

Each phase of a connection has its own deadline, so a client that trickles bytes cannot keep
a connection by staying barely active (every byte used to reset one idle timer):

=============  ===============================================  ==========================
phase          what the connection does                         ends at
=============  ===============================================  ==========================
``WAITING``    waits for the first byte of a request (the first  accept + head timeout; or
               one, or the next one on a kept-alive connection;  end of the last response
               also tor's PROXY line)                            + keep-alive timeout
``HEAD``       receives a request head                           its first byte (accept,
                                                                  for the first) + head
                                                                  timeout: 408
``BODY``       receives the request body                         last body byte + body
                                                                  timeout: 408 or close
``ACTIVE``     waits for the target, relays a response (tcp:     last byte either way +
               relays)                                          idle timeout
``CONNECTING`` connects to the target (bounded by the connect    as ACTIVE
               timeout itself)
=============  ===============================================  ==========================

``max_session_seconds``, when set, bounds every phase. Connections in ``WAITING`` and
``HEAD`` may be displaced at the connection cap (:mod:`.admission`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """How a session ended; one word in the session log line."""

    OK = "ok"
    CONNECT_TIMEOUT = "connect_timeout"
    UPSTREAM_ERROR = "upstream_error"
    IDLE_TIMEOUT = "idle_timeout"
    SESSION_TIMEOUT = "session_timeout"
    HEAD_TIMEOUT = "head_timeout"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    BODY_TIMEOUT = "body_timeout"
    REJECTED = "rejected"
    EVICTED = "evicted"
    THROTTLED = "throttled"
    CIRCUIT_CUT = "circuit_cut"
    BAD_REQUEST = "bad_request"
    INTERCEPTED = "intercepted"
    CLIENT_ERROR = "client_error"
    SHUTDOWN = "shutdown"


class Phase(StrEnum):
    """Where a session is (see the module docstring for each phase's deadline)."""

    WAITING = "waiting"
    HEAD = "head"
    BODY = "body"
    ACTIVE = "active"
    CONNECTING = "connecting"


# Members as module constants for the per-request methods below (Enum attribute access
# costs a lookup per use on Python 3.11).
_WAITING, _HEAD, _BODY = Phase.WAITING, Phase.HEAD, Phase.BODY
_HEAD_TIMEOUT, _KEEPALIVE_TIMEOUT = Outcome.HEAD_TIMEOUT, Outcome.KEEPALIVE_TIMEOUT


@dataclass
class ProxyStats:
    """Counters for status, metrics and the summary line (the node layer exports them)."""

    active: int = 0
    total: int = 0
    rejected: int = 0  # every slot busy with a request: 503
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connect_timeouts: int = 0
    idle_timeouts: int = 0
    session_timeouts: int = 0
    head_timeouts: int = 0
    keepalive_timeouts: int = 0
    body_timeouts: int = 0
    upstream_errors: int = 0
    bad_requests: int = 0
    evicted: int = 0  # waiting connections closed to make room at the cap
    throttled: int = 0  # requests (and tcp streams) over their circuit's rate: 429 / closed
    circuit_refused: int = 0  # streams of a cut circuit, closed at once
    circuits_cut: int = 0

    def snapshot(self) -> ProxyStats:
        return dataclasses.replace(self)

    @property
    def errors(self) -> int:
        """Connections that ended badly for the client or the target (the summary's number)."""
        return (
            self.connect_timeouts
            + self.upstream_errors
            + self.bad_requests
            + self.head_timeouts
            + self.body_timeouts
            + self.rejected
        )


def summary_line(before: ProxyStats, now: ProxyStats, seconds: float) -> str | None:
    """The periodic INFO line (what changed since ``before``); None when nothing happened."""
    if now.total == before.total and now.requests == before.requests and not now.active:
        return None
    mb = 1024 * 1024
    return (
        f"Proxy, last {seconds:.0f} s: {now.total - before.total} connections "
        f"({now.active} open), {now.requests - before.requests} requests, "
        f"{(now.bytes_up - before.bytes_up) / mb:.1f} MB up, "
        f"{(now.bytes_down - before.bytes_down) / mb:.1f} MB down, "
        f"{now.errors - before.errors} errors, "
        f"{now.evicted - before.evicted} displaced, "
        f"{now.throttled - before.throttled} throttled, "
        f"{now.circuits_cut - before.circuits_cut} circuits cut"
    )


@dataclass(frozen=True)
class Timeouts:
    """The per-phase timeouts of a session (seconds); ``session`` None = no overall bound."""

    idle: float = 300.0
    head: float = 10.0
    keep_alive: float = 30.0
    body: float = 30.0
    session: float | None = None


@dataclass
class SessionState:
    """One client connection: its counters, phase, deadlines and outcome.

    ``now`` values come from the caller's monotonic clock. ``deadline`` tells the watchdog
    when to look again; ``expired`` tells it whether the session must end and why.
    """

    session_id: int
    peer: str
    target: str
    started: float
    timeouts: Timeouts = field(default_factory=Timeouts)
    circuit: int | str | None = None
    last_activity: float = field(init=False)
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    outcome: Outcome = Outcome.OK
    phase: Phase = Phase.WAITING
    # WAITING / HEAD: when the head must be complete; what ending there means.
    phase_deadline: float = field(init=False)
    phase_outcome: Outcome = Outcome.HEAD_TIMEOUT

    def __post_init__(self) -> None:
        self.last_activity = self.started
        self.phase_deadline = self.started + self.timeouts.head

    def touch(self, now: float) -> None:
        self.last_activity = now

    def wait_for_request(self, now: float) -> None:
        """A response ended and the connection stays open: the keep-alive wait."""
        self.phase = _WAITING
        self.phase_deadline = now + self.timeouts.keep_alive
        self.phase_outcome = _KEEPALIVE_TIMEOUT

    def head_begins(self, now: float) -> None:
        """The first byte of a request head (the first request's clock runs since accept)."""
        if self.phase is _WAITING:
            self.phase = _HEAD
            if self.phase_outcome is _KEEPALIVE_TIMEOUT:
                self.phase_deadline = now + self.timeouts.head
            self.phase_outcome = _HEAD_TIMEOUT

    def deadline(self) -> float:
        phase = self.phase
        if phase is _WAITING or phase is _HEAD:
            at = self.phase_deadline
        elif phase is _BODY:
            at = self.last_activity + self.timeouts.body
        else:
            at = self.last_activity + self.timeouts.idle
        if self.timeouts.session is not None:
            at = min(at, self.started + self.timeouts.session)
        return at

    def expired(self, now: float) -> Outcome | None:
        session = self.timeouts.session
        if session is not None and now >= self.started + session:
            return Outcome.SESSION_TIMEOUT
        phase = self.phase
        if phase is _WAITING or phase is _HEAD:
            return self.phase_outcome if now >= self.phase_deadline else None
        if phase is _BODY:
            return Outcome.BODY_TIMEOUT if now >= self.last_activity + self.timeouts.body else None
        return Outcome.IDLE_TIMEOUT if now >= self.last_activity + self.timeouts.idle else None

    def set_outcome(self, outcome: Outcome) -> None:
        """Keep the first failure: a timeout that closes the sockets is the cause, not the
        client error the closing provokes afterwards."""
        if self.outcome is Outcome.OK or self.outcome is Outcome.INTERCEPTED:
            self.outcome = outcome

    def log_line(self, now: float, mode: str) -> str:
        duration = max(0.0, now - self.started)
        circuit = "" if self.circuit is None else f" circuit={self.circuit}"
        line = (
            f"Session #{self.session_id}: {self.peer} -> {self.target} mode={mode}{circuit} "
            f"up={self.bytes_up}B down={self.bytes_down}B duration={duration:.3f}s "
            f"outcome={self.outcome.value}"
        )
        if mode == "http":
            line += f" requests={self.requests}"
        return line


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_MESSAGES = {
    400: "The request could not be understood.",
    408: "The request took too long to arrive.",
    413: "The request body is too large.",
    414: "The request target is too long.",
    429: "Too many requests. Please slow down.",
    431: "The request headers are too large.",
    501: "The request uses a feature this service does not support.",
    502: "The service is unreachable right now. Please try again in a moment.",
    503: "The service is busy right now. Please try again in a moment.",
    505: "The request uses an HTTP version this service does not speak.",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Error")


def error_page(status: int) -> bytes:
    """A small HTML page for a proxy-made error; it names nothing internal."""
    reason = reason_phrase(status)
    message = _MESSAGES.get(status, reason + ".")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{status} {reason}</title></head>\n"
        f"<body><h1>{status} {reason}</h1><p>{message}</p></body></html>\n"
    ).encode()


def error_response_bytes(status: int, *, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection (RFC 9112 §9.6);
    ``head_only`` for a HEAD request (RFC 9110 §9.3.2: the same head, no body)."""
    body = error_page(status)
    retry = "Retry-After: 1\r\n" if status in (429, 503) else ""
    head = (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{retry}"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body
