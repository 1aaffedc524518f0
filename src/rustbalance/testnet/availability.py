"""Client-visible availability of an onion address: load, gaps, time to first byte (issue 14).

What a visitor of the master address sees, measured from outside through real Tor clients:

- *fresh-circuit* clients: one request every ``1 / fresh_rate`` seconds (open loop: a request
  starts on schedule whether or not earlier ones finished), each with its own SOCKS user name,
  so tor (IsolateSOCKSAuth) builds a new rendezvous circuit for it: every request goes through
  the descriptor and an introduction, as a new visitor's does;
- *keep-alive* clients: each holds one connection (one circuit) and sends a request on it every
  ``keepalive_interval`` seconds; a failed request closes it and the next one reconnects.

Output (:func:`summarize`): per kind the success rate, p50/p95 time to first byte and every
*gap*, plus the timeline marks (tor's descriptor rotations, time-period changes, injected
faults). A gap is a stretch of arrival times in which requests failed: it starts at the start
of the first failed request after a success and ends at the start of the next request that
succeeded (or at the end of the window). With requests every ``1 / rate`` seconds the true
outage is within one interval of that. The picture is drawn by :mod:`.timeline`.

The pure part (records, gaps, percentiles, marks) has no sockets and no clock; the load
generator (:class:`LoadGenerator`) is a thin asyncio shell over python-socks. Used by the test
suite (tests/reliability/test_availability.py, a CI-length run) and by ``make bench``
(benchmarks/bench_availability.py, the long run): one harness.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

from python_socks.async_.asyncio import Proxy

from rustbalance.crypto.time_period import (
    TimeParams,
    srv_run_start,
    time_period_num,
    time_period_start,
)

__all__ = [
    "FRESH",
    "KEEPALIVE",
    "Gap",
    "LoadGenerator",
    "LoadSettings",
    "Mark",
    "MarkKind",
    "RequestRecord",
    "bucket_outcomes",
    "find_gaps",
    "percentile",
    "plan_cover",
    "schedule_marks",
    "summarize",
]

RequestKind = Literal["fresh", "keepalive"]
FRESH: RequestKind = "fresh"
KEEPALIVE: RequestKind = "keepalive"
MarkKind = Literal["rotation", "period", "fault"]


@dataclass(frozen=True)
class RequestRecord:
    """One request: times are seconds since the start of the run."""

    kind: RequestKind
    started: float
    finished: float
    ok: bool
    ttfb: float | None = None  # start (fresh) or send (keep-alive) to the first response byte
    error: str | None = None
    answered_by: str | None = None
    client: int = 0


@dataclass(frozen=True)
class Mark:
    """Something on the timeline: tor's descriptor rotation (a shared-random run starts), a
    time-period change, or an injected fault. ``at`` in seconds since the start of the run."""

    at: float
    kind: MarkKind
    label: str


@dataclass(frozen=True)
class Gap:
    """Arrival times ``[start, start + length)`` (seconds since the start) all failed."""

    start: float
    length: float
    failed: int  # requests that started in it


def find_gaps(records: Iterable[RequestRecord], end: float) -> list[Gap]:
    """Every stretch of failed arrivals, in time order (see the module docstring).

    Requests are ordered by start time; a run of failures after a success (or from the first
    request) is a gap up to the start of the next success, or up to ``end`` when none came. Of
    requests that started at the same instant the failures count first, so a success at that
    instant closes the gap.
    """
    ordered = sorted(records, key=lambda r: (r.started, r.ok))
    gaps: list[Gap] = []
    gap_start: float | None = None
    failed = 0
    for record in ordered:
        if record.ok:
            if gap_start is not None:
                gaps.append(Gap(gap_start, record.started - gap_start, failed))
                gap_start, failed = None, 0
        else:
            if gap_start is None:
                gap_start = record.started
            failed += 1
    if gap_start is not None:
        gaps.append(Gap(gap_start, max(0.0, end - gap_start), failed))
    return gaps


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be within 0..1")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def schedule_marks(valid_after: int, params: TimeParams, since: float, until: float) -> list[Mark]:
    """tor's descriptor rotations and time-period starts between the Unix times ``since`` and
    ``until``, as marks relative to ``since``.

    tor rotates its service descriptors when a consensus of a new shared-random run arrives
    (hs_service.c ``should_rotate_descriptors``: valid-after >= the next run start) and clients
    change descriptors at the start of each time period (hs_cache.c ``cache_client_desc_new``:
    a cached descriptor expires at the next period start). ``valid_after`` is any consensus's,
    which anchors the voting schedule.
    """
    run = params.srv_run_seconds
    marks: list[Mark] = []
    first_run = srv_run_start(valid_after, params)
    steps = int((first_run - since) // run) + 1
    at = first_run - steps * run
    for _ in range(100_000):  # bounded: (until - since) / run + 2 iterations
        if at > until:
            break
        if at >= since:
            marks.append(Mark(at - since, "rotation", "descriptor rotation (new SRV)"))
        at += run
    tp = time_period_num(int(since), params)
    for _ in range(100_000):
        start = time_period_start(tp, params)
        if start > until:
            break
        if start >= since:
            marks.append(Mark(start - since, "period", f"time period {tp} starts"))
        tp += 1
    return sorted(marks, key=lambda m: m.at)


def bucket_outcomes(
    records: Iterable[RequestRecord], duration: float, bucket: float
) -> list[list[float]]:
    """Requests per time bucket, by start time: ``[start, fresh ok, fresh failed, keep-alive
    ok, keep-alive failed]`` per bucket (the compact timeline the benchmark chart is drawn
    from; a request starting at or after ``duration`` counts in the last bucket)."""
    if bucket <= 0:
        raise ValueError("bucket must be positive")
    count = max(1, math.ceil(duration / bucket))
    rows: list[list[float]] = [[round(i * bucket, 3), 0, 0, 0, 0] for i in range(count)]
    for record in records:
        index = min(count - 1, max(0, int(record.started // bucket)))
        column = (1 if record.kind == FRESH else 3) + (0 if record.ok else 1)
        rows[index][column] += 1
    return rows


def plan_cover(
    marks: Sequence[Mark], not_before: float, cover: Iterable[MarkKind], tail: float
) -> tuple[float, float] | None:
    """When a load that must see each kind in ``cover`` ("rotation", "period") can end: for
    each kind its first mark at or after ``not_before``; returns (the first of those, the
    last of those + ``tail``), or None when ``marks`` lack one (schedule further ahead).
    An empty ``cover`` gives (not_before, not_before + tail)."""
    firsts: list[float] = []
    for kind in set(cover):
        at = min((m.at for m in marks if m.kind == kind and m.at >= not_before), default=None)
        if at is None:
            return None
        firsts.append(at)
    if not firsts:
        return not_before, not_before + tail
    return min(firsts), max(firsts) + tail


def _kind_summary(records: Sequence[RequestRecord], end: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttfbs = [r.ttfb for r in ok if r.ttfb is not None]
    gaps = find_gaps(records, end)
    p50 = percentile(ttfbs, 0.50)
    p95 = percentile(ttfbs, 0.95)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "success_rate": round(len(ok) / len(records), 4) if records else None,
        "ttfb_p50_secs": None if p50 is None else round(p50, 3),
        "ttfb_p95_secs": None if p95 is None else round(p95, 3),
        "longest_gap_secs": round(max((g.length for g in gaps), default=0.0), 1),
        "gaps": [
            {"start_secs": round(g.start, 1), "length_secs": round(g.length, 1), "failed": g.failed}
            for g in gaps
        ],
        "errors": dict(Counter(r.error or "?" for r in records if not r.ok)),
        "answered_by": dict(Counter(r.answered_by for r in ok if r.answered_by)),
    }


def summarize(
    records: Sequence[RequestRecord],
    marks: Sequence[Mark],
    duration: float,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report: overall and per-kind figures, gaps, marks (JSON-ready)."""
    kinds = {
        kind: _kind_summary([r for r in records if r.kind == kind], duration)
        for kind in (FRESH, KEEPALIVE)
    }
    ok = sum(1 for r in records if r.ok)
    longest = max((k["longest_gap_secs"] for k in kinds.values()), default=0.0)
    return {
        **(info or {}),
        "duration_secs": round(duration, 1),
        "requests": len(records),
        "success_rate": round(ok / len(records), 4) if records else None,
        "longest_gap_secs": longest,
        "kinds": kinds,
        "marks": [asdict(m) for m in sorted(marks, key=lambda m: m.at)],
    }


# ----------------------------------------------------------------------------- load (asyncio)


@dataclass(frozen=True)
class LoadSettings:
    fresh_rate: float = 2.0  # fresh-circuit requests per second
    keepalive_clients: int = 2
    keepalive_interval: float = 1.0
    timeout: float = 30.0  # per request (SOCKS connect + answer)
    reconnect_pause: float = 1.0  # keep-alive: after a failure, before reconnecting
    path: str = "/"
    port: int = 80
    expect_prefix: str = "hello from "  # a body that does not start with it is a failure


class _HeadError(Exception):
    """The response head was not HTTP."""


async def _read_response(
    reader: asyncio.StreamReader, on_first_byte: Callable[[], None]
) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one HTTP/1.1 response framed by Content-Length (or
    by the connection's end)."""
    first = await reader.read(1)
    if not first:
        raise ConnectionResetError("closed before the response")
    on_first_byte()
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _HeadError(lines[0][:80])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close"
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        body = await reader.readexactly(int(length))
    else:
        body, keep = await reader.read(), False
    return int(parts[1]), body, keep


@dataclass
class LoadGenerator:
    """Fresh-circuit and keep-alive clients against ``address`` through Tor SOCKS ports."""

    socks: Sequence[tuple[str, int]]
    address: str
    settings: LoadSettings = field(default_factory=LoadSettings)
    clock: Callable[[], float] = time.monotonic
    records: list[RequestRecord] = field(default_factory=list)
    _origin: float = 0.0
    _stop_at: float = 0.0
    _isolation: Iterator[int] = field(default_factory=itertools.count)

    def _now(self) -> float:
        return self.clock() - self._origin

    def _stamp(self, sink: list[float]) -> None:
        sink.append(self._now())

    def _answer(self, status: int, body: bytes) -> tuple[bool, str | None, str | None]:
        expect = self.settings.expect_prefix.encode()
        if status == 200 and body.startswith(expect):
            name = body[len(expect) :].decode("utf-8", "replace").strip()
            return True, None, name.removesuffix("-target")
        return False, f"HTTP {status}", None

    def _request(self, keep_alive: bool) -> bytes:
        connection = "keep-alive" if keep_alive else "close"
        return (
            f"GET {self.settings.path} HTTP/1.1\r\nHost: {self.address}\r\n"
            f"Connection: {connection}\r\n\r\n"
        ).encode()

    async def _open(self, client: int, isolation: str) -> tuple[asyncio.StreamReader, Any]:
        host, port = self.socks[client % len(self.socks)]
        proxy = Proxy.from_url(f"socks5://{isolation}:x@{host}:{port}", rdns=True)
        sock = await proxy.connect(self.address, self.settings.port, timeout=self.settings.timeout)
        return await asyncio.open_connection(sock=sock)

    async def fresh_request(self, client: int) -> None:
        """One request on a new circuit through SOCKS port ``client`` (modulo their number),
        recorded in :attr:`records`."""
        started = self._now()
        first: list[float] = []
        writer: Any = None
        try:
            async with asyncio.timeout(self.settings.timeout):
                reader, writer = await self._open(client, f"avail-{next(self._isolation)}")
                writer.write(self._request(keep_alive=False))
                await writer.drain()
                status, body, _ = await _read_response(reader, partial(self._stamp, first))
            ok, error, by = self._answer(status, body)
        except Exception as exc:  # python-socks, timeouts, resets: all are failures
            ok, error, by = False, type(exc).__name__, None
        finally:
            if writer is not None:
                writer.close()
        ttfb = first[0] - started if first and ok else None
        self.records.append(RequestRecord(FRESH, started, self._now(), ok, ttfb, error, by, client))

    def end_at(self, seconds: float) -> None:
        """Stop the load ``seconds`` after its origin instead (earlier or later than the
        duration :meth:`run` was given); requests under way finish."""
        self._stop_at = seconds

    async def _fresh_clients(self) -> None:
        interval = 1.0 / self.settings.fresh_rate
        async with asyncio.TaskGroup() as group:
            for n in itertools.count():
                at = n * interval
                if at >= self._stop_at:
                    break
                await asyncio.sleep(max(0.0, at - self._now()))
                group.create_task(self.fresh_request(n))

    async def _keepalive_client(self, client: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: Any = None
        generation = 0
        try:
            while self._now() < self._stop_at:
                started = self._now()
                first: list[float] = []
                try:
                    async with asyncio.timeout(self.settings.timeout):
                        if writer is None:
                            generation += 1
                            reader, writer = await self._open(
                                client, f"avail-ka-{client}-{generation}"
                            )
                        assert reader is not None
                        sent = self._now()
                        writer.write(self._request(keep_alive=True))
                        await writer.drain()
                        status, body, keep = await _read_response(
                            reader, partial(self._stamp, first)
                        )
                    ok, error, by = self._answer(status, body)
                    ttfb = first[0] - sent if first and ok else None
                except Exception as exc:
                    ok, error, by, ttfb, keep = False, type(exc).__name__, None, None, False
                self.records.append(
                    RequestRecord(KEEPALIVE, started, self._now(), ok, ttfb, error, by, client)
                )
                if not keep or not ok:
                    if writer is not None:
                        writer.close()
                    reader, writer = None, None
                pause = self.settings.keepalive_interval if ok else self.settings.reconnect_pause
                await asyncio.sleep(max(0.0, min(pause, self._stop_at - self._now())))
        finally:
            if writer is not None:
                writer.close()

    async def run(self, duration: float, origin: float | None = None) -> list[RequestRecord]:
        """Run the load for ``duration`` seconds; the records (also in :attr:`records`).
        ``origin`` (a ``clock()`` value, default now) is time 0 of the records; :meth:`end_at`
        moves the end while it runs."""
        self._origin = self.clock() if origin is None else origin
        self._stop_at = self._now() + duration
        async with asyncio.TaskGroup() as group:
            group.create_task(self._fresh_clients())
            for client in range(self.settings.keepalive_clients):
                group.create_task(self._keepalive_client(client))
        return self.records
