"""Active HTTP health probe of the target (system.md §13.2 item 2.1).

Passive checks (a failed proxied connection) only notice a dead target when a client suffers
for it, and miss a "zombie" target that accepts connections but answers errors. When
``[health] http_probe_enabled`` is set, the node GETs ``http_probe_path`` every
``http_probe_interval_secs`` through **the same path the proxy uses** (tor's SOCKS port for an
onion target, a direct connection otherwise, TLS when ``use_tls``), so the probe sees what a
client would see, and expects ``probe_expected_status``.

:class:`TargetHealth` is the pure state machine: after ``probe_failure_threshold`` consecutive
failures the target is DOWN (ERROR ``Target is DOWN``; WARN for every failure), one success
brings it back (INFO ``Target is UP again``). :class:`HealthProber` is the asyncio loop around
it; the first probe runs after a start delay (120 s by default) so that a node that has just
started, and its tor, get time to settle. Clock and sleep are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from rustbalance.config.schema import HealthConfig
from rustbalance.proxy.settings import ProxySettings
from rustbalance.proxy.upstream import UpstreamError, connect_upstream

__all__ = [
    "DEFAULT_START_DELAY_SECS",
    "HealthProber",
    "ProbeResult",
    "TargetHealth",
    "probe_once",
]

log = logging.getLogger("rustbalance.health")

DEFAULT_START_DELAY_SECS = 120.0
# The status line and headers of any sane answer fit; the body is never read.
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str  # "status 200", "status 503", "connect failed: ...", "timed out after 5 s"


class TargetHealth:
    """Consecutive-failure state machine (pure). The target starts out as up."""

    def __init__(self, failure_threshold: int) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.up = True
        self.consecutive_failures = 0

    def observe(self, result: ProbeResult) -> list[tuple[int, str]]:
        """Feed one probe result; returns the log records (level, message) it causes."""
        records: list[tuple[int, str]] = []
        if result.ok:
            self.consecutive_failures = 0
            if not self.up:
                self.up = True
                records.append((logging.INFO, f"Target is UP again ({result.detail})"))
            return records
        # Saturate: the count only matters up to the threshold, and must not grow forever.
        self.consecutive_failures = min(self.consecutive_failures + 1, 1_000_000)
        records.append(
            (
                logging.WARNING,
                f"Target health probe failed ({self.consecutive_failures}/"
                f"{self.failure_threshold}): {result.detail}",
            )
        )
        if self.up and self.consecutive_failures >= self.failure_threshold:
            self.up = False
            records.append(
                (
                    logging.ERROR,
                    f"Target is DOWN after {self.consecutive_failures} consecutive failed probes",
                )
            )
        return records


async def probe_once(
    settings: ProxySettings, path: str, expected_status: int, timeout_secs: float
) -> ProbeResult:
    """One ``GET path`` to the target, the way the proxy connects; never raises."""
    try:
        async with asyncio.timeout(timeout_secs):
            upstream = await connect_upstream(settings)
            try:
                status = await _request(upstream.reader, upstream.writer, settings, path)
            finally:
                upstream.writer.close()
                with contextlib.suppress(Exception):
                    await upstream.writer.wait_closed()
    except TimeoutError:
        return ProbeResult(False, f"timed out after {timeout_secs:g} s")
    except UpstreamError as exc:  # includes ConnectTimeout
        return ProbeResult(False, str(exc))
    except (OSError, h11.ProtocolError) as exc:
        return ProbeResult(False, f"bad answer: {type(exc).__name__}")
    if status == expected_status:
        return ProbeResult(True, f"status {status}")
    return ProbeResult(False, f"status {status}, expected {expected_status}")


async def _request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    settings: ProxySettings,
    path: str,
) -> int:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", settings.target.authority),
            ("User-Agent", "rustbalance-health-probe"),
            ("Connection", "close"),
        ],
    )
    writer.write((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    await writer.drain()
    # Bounded: h11 refuses a head larger than _MAX_HEAD_BYTES, every pass reads or returns,
    # and the caller's timeout bounds the waiting.
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(16384))
            continue
        if isinstance(event, h11.Response):
            return int(event.status_code)
        if isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("target closed the connection without answering")
        # h11.InformationalResponse (1xx): keep reading for the final answer.


ProbeFn = Callable[[ProxySettings, str, int, float], Awaitable[ProbeResult]]


class HealthProber:
    """Runs the probe every interval and keeps :class:`TargetHealth` up to date.

    ``on_change(up)`` is called when the target goes down or comes back (the daemon feeds the
    ``target_up`` metric and its status from it). ``run`` ends when :meth:`stop` is called or
    after ``max_probes`` probes.
    """

    def __init__(
        self,
        settings: ProxySettings,
        health: HealthConfig,
        *,
        start_delay: float = DEFAULT_START_DELAY_SECS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_change: Callable[[bool], None] | None = None,
        probe: ProbeFn = probe_once,
        logger: logging.Logger = log,
    ) -> None:
        if start_delay < 0:
            raise ValueError("start_delay must not be negative")
        self.settings = settings
        self.health = health
        self.state = TargetHealth(health.probe_failure_threshold)
        self.start_delay = start_delay
        self._clock = clock
        self._sleep = sleep
        self._on_change = on_change
        self._probe = probe
        self._log = logger
        self._stopped = asyncio.Event()
        self.probes = 0
        self.last_result: ProbeResult | None = None

    @property
    def up(self) -> bool:
        return self.state.up

    def stop(self) -> None:
        self._stopped.set()

    async def run(self, max_probes: int | None = None) -> None:
        interval = self.health.http_probe_interval_secs
        # Scheduled against a fixed origin, so a slow probe does not shift every later one.
        next_at = self._clock() + self.start_delay
        while not self._stopped.is_set() and (max_probes is None or self.probes < max_probes):
            delay = next_at - self._clock()
            if delay > 0:
                await self._sleep(delay)
                if self._stopped.is_set():
                    break
            await self.probe_now()
            next_at += interval
            now = self._clock()
            if next_at <= now:  # we fell behind (suspend, long probe): skip, do not burst
                next_at = now + interval

    async def probe_now(self) -> ProbeResult:
        """One probe, its log lines and the state change."""
        result = await self._probe(
            self.settings,
            self.health.http_probe_path,
            self.health.probe_expected_status,
            self.health.http_probe_timeout_secs,
        )
        self.probes += 1
        self.last_result = result
        was_up = self.state.up
        for level, message in self.state.observe(result):
            self._log.log(level, "%s", message)
        if self.state.up != was_up and self._on_change is not None:
            self._on_change(self.state.up)
        return result
