"""The clock every node component is given (never ``time.time()`` read directly).

Two kinds of time, each for its own job: ``wall()`` (unix seconds) for what is compared with
other machines or written down (descriptor revision counters, certificate expiry, status
timestamps), ``monotonic()`` for durations on this node (timeouts, debounces, uptime), which a
stepped wall clock must not stretch or shrink. ``sleep`` belongs to the same clock, so a test
clock can jump instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    def wall(self) -> float:
        """Unix time in seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks: ``time.time``, ``time.monotonic``, ``asyncio.sleep``."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
