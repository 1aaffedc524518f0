"""The one error of the wire layer: a message that must not be relayed, and the status to
answer (pure)."""

from __future__ import annotations


class MessageError(ValueError):
    """A head or body that breaks RFC 9112 (or a limit). ``status`` is what the proxy answers
    the client: 400, 408, 414, 431, 501 or 505 for a request; 502 for a target's response."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
