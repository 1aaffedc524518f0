"""Per-connection state, counters and canned responses (pure, no I/O; clock injected)."""

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
    REJECTED = "rejected"
    BAD_REQUEST = "bad_request"
    INTERCEPTED = "intercepted"
    CLIENT_ERROR = "client_error"
    SHUTDOWN = "shutdown"


class Phase(StrEnum):
    """Where a session is; the drain on shutdown closes sessions idle between requests."""

    CONNECTING = "connecting"
    WAITING_REQUEST = "waiting_request"
    ACTIVE = "active"


@dataclass
class ProxyStats:
    """Counters for status and metrics (the node layer exports them)."""

    active: int = 0
    total: int = 0
    rejected: int = 0
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connect_timeouts: int = 0
    idle_timeouts: int = 0
    session_timeouts: int = 0
    upstream_errors: int = 0
    bad_requests: int = 0

    def snapshot(self) -> ProxyStats:
        return dataclasses.replace(self)


@dataclass
class SessionState:
    """One client connection: its counters, deadlines and outcome.

    ``now`` values come from the caller's monotonic clock. ``deadline`` tells the watchdog
    when to look again; ``expired`` tells it whether the session must end and why.
    """

    session_id: int
    peer: str
    target: str
    started: float
    idle_timeout: float
    max_session_seconds: float | None = None
    last_activity: float = field(init=False)
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    outcome: Outcome = Outcome.OK
    phase: Phase = Phase.CONNECTING

    def __post_init__(self) -> None:
        self.last_activity = self.started

    def touch(self, now: float) -> None:
        self.last_activity = now

    def deadline(self) -> float:
        idle_at = self.last_activity + self.idle_timeout
        if self.max_session_seconds is None:
            return idle_at
        return min(idle_at, self.started + self.max_session_seconds)

    def expired(self, now: float) -> Outcome | None:
        if self.max_session_seconds is not None and now >= self.started + self.max_session_seconds:
            return Outcome.SESSION_TIMEOUT
        if now >= self.last_activity + self.idle_timeout:
            return Outcome.IDLE_TIMEOUT
        return None

    def set_outcome(self, outcome: Outcome) -> None:
        """Keep the first failure: a timeout that closes the sockets is the cause, not the
        client error the closing provokes afterwards."""
        if self.outcome is Outcome.OK or self.outcome is Outcome.INTERCEPTED:
            self.outcome = outcome

    def log_line(self, now: float, mode: str) -> str:
        duration = max(0.0, now - self.started)
        line = (
            f"Session #{self.session_id}: {self.peer} -> {self.target} mode={mode} "
            f"up={self.bytes_up}B down={self.bytes_down}B duration={duration:.3f}s "
            f"outcome={self.outcome.value}"
        )
        if mode == "http":
            line += f" requests={self.requests}"
        return line


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

_MESSAGES = {
    400: "The request could not be understood.",
    413: "The request body is too large.",
    431: "The request headers are too large.",
    501: "The request uses a feature this service does not support.",
    502: "The service is unreachable right now. Please try again in a moment.",
    503: "The service is busy right now. Please try again in a moment.",
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


def error_response_bytes(status: int) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection (RFC 9112 §9.6)."""
    body = error_page(status)
    head = (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body
