"""Prometheus metrics (system.md §13.2 item 3.5) and the ``/metrics`` HTTP endpoint.

The daemon's components own their counters (the proxy's :class:`~rustbalance.proxy.ProxyStats`,
the publisher's results, the peer table...). Rather than mirroring every increment into
prometheus objects, :func:`feed_metrics` hands :meth:`NodeMetrics.update` the daemon's typed
snapshot rendered by :func:`rustbalance.node.snapshot.metrics_values` (the same snapshot the
status document is rendered from), and a custom collector renders the latest one at scrape
time. So the numbers can never drift
from the daemon's own, and a part that has not reported yet simply exports nothing.

The registry is private (never prometheus-client's global one): tests and several daemons in
one process do not collide, and nothing registered by a library leaks into our output.

Snapshot keys (all optional; unknown keys and wrong types raise :class:`MetricsError`, so a
typo in the daemon is caught at once instead of silently exporting nothing). ``_total`` values
are monotonic totals since the daemon started:

=========================== ================================ ===================================
key                         value                            exported as
=========================== ================================ ===================================
``publishes``               ``{period: {"ok": n, "failed":   ``rustbalance_publishes_total
                            n}}`` (period e.g. "current")    {period, result}``
``hsdir_uploads``           ``{"ok": n, "failed": n}``       ``rustbalance_hsdir_uploads_total
                                                             {result}``
``hsdir_last_upload``       ``{hsdir_fingerprint: bool}``    ``rustbalance_hsdir_last_upload_ok
                            (at most 64 entries)             {hsdir}``
``descriptor_age_seconds``  float, or None = never published ``rustbalance_descriptor_age_seconds``
``is_publisher``            bool                             ``rustbalance_is_publisher``
``peers_alive``             int                              ``rustbalance_peers_alive``
``heartbeats_sent``         int                              ``rustbalance_heartbeats_sent_total``
``heartbeats_received``     int                              ``rustbalance_heartbeats_received_
                                                             total``
``rejected_messages``       ``{reason: n}`` (<= 32 reasons)  ``rustbalance_rejected_messages_total
                                                             {reason}``
``intro_points``            ``{"own"|"peers"|"merged": n}``  ``rustbalance_intro_points{source}``
``tor_up``                  bool                             ``rustbalance_tor_up``
``tor_restarts``            int                              ``rustbalance_tor_restarts_total``
``proxy_connections_active``int                              ``rustbalance_proxy_connections_
                                                             active``
``proxy_connections_total`` int                              ``rustbalance_proxy_connections_
                                                             total``
``proxy_bytes``             ``{"up": n, "down": n}``         ``rustbalance_proxy_bytes_total
                                                             {direction}``
``proxy_timeouts``          ``{"connect"|"idle"|"session"|   ``rustbalance_proxy_timeouts_total
                            "head"|"keepalive"|"body": n}``  {kind}``
``proxy_refused``           ``{"full"|"displaced"|           ``rustbalance_proxy_refused_total
                            "throttled"|"circuit_cut": n}``  {reason}``
``proxy_circuits_cut``      int                              ``rustbalance_proxy_circuits_cut_
                                                             total``
``target_up``               bool                             ``rustbalance_target_up``
``last_publish_time``       ``{"current"|"next": unix time}``  ``rustbalance_last_publish_
                            of the last successful publish   timestamp_seconds{period}``
``peers_up``                ``{node_id: bool}`` (<= 256)     ``rustbalance_peer_up{peer}``
``backends_up``             ``{"<56>.onion": bool}`` (<= 64) ``rustbalance_backend_up{backend}``
``etcd_connected``          bool (etcd backend only: the     ``rustbalance_etcd_connected``
                            lease is valid)
``etcd_registered``         bool (etcd backend only: our     ``rustbalance_etcd_registered``
                            member record is on the lease)
``etcd_fencing``            ``{"passed"|"refused"|"failed":  ``rustbalance_etcd_fencing_total
                            n}`` (checks before uploads)     {result}``
``distinct_descriptors``    ``{period: n}``: different       ``rustbalance_distinct_descriptors
                            descriptors of the last distinct {period}``
                            round (empty: one descriptor)
``expected_node_share``     ``{period: {"min"|"max": 0..1}}`` ``rustbalance_expected_node_share
                            a node's expected share of fresh {period, bound}``
                            clients, lowest and highest
=========================== ================================ ===================================

Always exported, snapshot or not: ``rustbalance_build_info{version, python}`` = 1, the
process metrics of prometheus-client's process collector (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ``process_start_time_seconds``...),
and ``rustbalance_last_publish_timestamp_seconds`` for both periods, 0 until the first
successful publish (so an alert on its age needs no ``absent()``; deploy/prometheus/).

:func:`proxy_snapshot` turns a ``ProxyStats`` into the ``proxy_*`` keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import platform
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import h11
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rustbalance import __version__
from rustbalance.config.schema import METRICS_PORT
from rustbalance.errors import RustBalanceError
from rustbalance.proxy.session import ProxyStats

__all__ = [
    "DEFAULT_LISTEN",
    "MAX_BACKENDS",
    "MAX_PEERS",
    "METRICS_UPDATE_SECS",
    "MetricsError",
    "MetricsServer",
    "NodeMetrics",
    "feed_metrics",
    "proxy_snapshot",
    "start_metrics_server",
]

log = logging.getLogger("rustbalance.metrics")

# [metrics] listen's default (config/schema.py says why this port).
DEFAULT_LISTEN = ("127.0.0.1", METRICS_PORT)
# How often the daemon's snapshot is rendered into the metrics (scrapes read the latest).
METRICS_UPDATE_SECS = 5.0
_MAX_HSDIRS = 64
_MAX_REASONS = 32
MAX_PEERS = 256
MAX_BACKENDS = 64
# The two descriptors tor keeps (tor.md 3.2), as the publish loop names them.
_PERIODS = ("current", "next")
# Label values come from the daemon, but keep them printable and short all the same: a label
# is part of every scrape and of the time series' identity.
_LABEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class MetricsError(RustBalanceError):
    """A metrics snapshot has an unknown key or a wrongly typed value."""


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MetricsError(f"metrics snapshot: {key} must be a non-negative integer")
    return value


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise MetricsError(f"metrics snapshot: {key} must be a boolean")
    return value


def _label(value: object, key: str) -> str:
    if not isinstance(value, str) or not _LABEL_RE.fullmatch(value):
        raise MetricsError(f"metrics snapshot: {key} has a bad label value")
    return value


def _counts(
    value: object, key: str, allowed: tuple[str, ...] | None = None, limit: int = _MAX_REASONS
) -> dict[str, int]:
    if not isinstance(value, Mapping) or len(value) > limit:
        raise MetricsError(f"metrics snapshot: {key} must be a mapping of at most {limit}")
    result: dict[str, int] = {}
    for name, count in value.items():
        label = _label(name, key)
        if allowed is not None and label not in allowed:
            raise MetricsError(f"metrics snapshot: {key} has unknown entry {label!r}")
        result[label] = _count(count, f"{key}.{label}")
    return result


def _flags(value: object, key: str, limit: int) -> dict[str, bool]:
    if not isinstance(value, Mapping) or len(value) > limit:
        raise MetricsError(f"metrics snapshot: {key} must be a mapping of at most {limit}")
    return {_label(name, key): _flag(up, f"{key}.{name}") for name, up in value.items()}


def _times(value: object, key: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise MetricsError(f"metrics snapshot: {key} must map periods to Unix times")
    result: dict[str, float] = {}
    for period, when in value.items():
        if period not in _PERIODS:
            raise MetricsError(f"metrics snapshot: {key} has unknown period {period!r}")
        if (
            isinstance(when, bool)
            or not isinstance(when, int | float)
            or not math.isfinite(when)
            or when < 0
        ):
            raise MetricsError(f"metrics snapshot: {key}.{period} must be a Unix time >= 0")
        result[period] = float(when)
    return result


def _shares(value: object, key: str) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise MetricsError(f"metrics snapshot: {key} must map periods to min/max shares")
    result: dict[str, dict[str, float]] = {}
    for period, bounds in value.items():
        if period not in _PERIODS or not isinstance(bounds, Mapping):
            raise MetricsError(f"metrics snapshot: {key} has a bad entry {period!r}")
        clean: dict[str, float] = {}
        for bound, share in bounds.items():
            if (
                bound not in ("min", "max")
                or isinstance(share, bool)
                or not isinstance(share, int | float)
                or not 0.0 <= share <= 1.0
            ):
                raise MetricsError(f"metrics snapshot: {key}.{period} must hold min/max in 0..1")
            clean[bound] = float(share)
        result[period] = clean
    return result


_COUNTERS = (
    "heartbeats_sent",
    "heartbeats_received",
    "tor_restarts",
    "proxy_connections_total",
    "proxy_circuits_cut",
)
_GAUGES_INT = ("peers_alive", "proxy_connections_active")
_FLAGS = ("is_publisher", "tor_up", "target_up", "etcd_connected", "etcd_registered")
_TIMEOUT_KINDS = ("connect", "idle", "session", "head", "keepalive", "body")
# Why the proxy refused or closed a connection before serving it (the front door, issue 15).
_REFUSALS = ("full", "displaced", "throttled", "circuit_cut")


def _validate(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in snapshot.items():
        if key in _COUNTERS or key in _GAUGES_INT:
            clean[key] = _count(value, key)
        elif key in _FLAGS:
            clean[key] = _flag(value, key)
        elif key == "descriptor_age_seconds":
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise MetricsError("metrics snapshot: descriptor_age_seconds must be >= 0 or None")
            clean[key] = None if value is None else float(value)
        elif key == "publishes":
            if not isinstance(value, Mapping) or len(value) > 8:
                raise MetricsError("metrics snapshot: publishes must map at most 8 periods")
            clean[key] = {
                _label(period, key): _counts(results, f"{key}.{period}", ("ok", "failed"))
                for period, results in value.items()
            }
        elif key == "hsdir_uploads":
            clean[key] = _counts(value, key, ("ok", "failed"))
        elif key == "hsdir_last_upload":
            if not isinstance(value, Mapping) or len(value) > _MAX_HSDIRS:
                raise MetricsError(
                    f"metrics snapshot: hsdir_last_upload must map at most {_MAX_HSDIRS} HSDirs"
                )
            clean[key] = {_label(fp, key): _flag(ok, f"{key}.{fp}") for fp, ok in value.items()}
        elif key == "rejected_messages":
            clean[key] = _counts(value, key)
        elif key == "intro_points":
            clean[key] = _counts(value, key, ("own", "peers", "merged"))
        elif key == "proxy_bytes":
            clean[key] = _counts(value, key, ("up", "down"))
        elif key == "proxy_timeouts":
            clean[key] = _counts(value, key, _TIMEOUT_KINDS)
        elif key == "proxy_refused":
            clean[key] = _counts(value, key, _REFUSALS)
        elif key == "etcd_fencing":
            clean[key] = _counts(value, key, ("passed", "refused", "failed"))
        elif key == "last_publish_time":
            clean[key] = _times(value, key)
        elif key == "peers_up":
            clean[key] = _flags(value, key, MAX_PEERS)
        elif key == "backends_up":
            clean[key] = _flags(value, key, MAX_BACKENDS)
        elif key == "distinct_descriptors":
            clean[key] = _counts(value, key, _PERIODS)
        elif key == "expected_node_share":
            clean[key] = _shares(value, key)
        else:
            raise MetricsError(f"metrics snapshot: unknown key {key!r}")
    return clean


def proxy_snapshot(stats: ProxyStats) -> dict[str, Any]:
    """The ``proxy_*`` snapshot keys from the reverse proxy's counters."""
    return {
        "proxy_connections_active": stats.active,
        "proxy_connections_total": stats.total,
        "proxy_bytes": {"up": stats.bytes_up, "down": stats.bytes_down},
        "proxy_timeouts": {
            "connect": stats.connect_timeouts,
            "idle": stats.idle_timeouts,
            "session": stats.session_timeouts,
            "head": stats.head_timeouts,
            "keepalive": stats.keepalive_timeouts,
            "body": stats.body_timeouts,
        },
        "proxy_refused": {
            "full": stats.rejected,
            "displaced": stats.evicted,
            "throttled": stats.throttled,
            "circuit_cut": stats.circuit_refused,
        },
        "proxy_circuits_cut": stats.circuits_cut,
    }


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        v = self.values
        info = GaugeMetricFamily(
            "rustbalance_build_info",
            "Always 1; the labels name the running version and Python.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        published = GaugeMetricFamily(
            "rustbalance_last_publish_timestamp_seconds",
            "Unix time of the last successful publish of each descriptor (0 = never).",
            labels=["period"],
        )
        times = v.get("last_publish_time", {})
        for period in _PERIODS:
            published.add_metric([period], times.get(period, 0.0))
        yield published
        yield from self._up("peers_up", "rustbalance_peer_up", "peer", "1 if this peer is live.")
        yield from self._up(
            "backends_up",
            "rustbalance_backend_up",
            "backend",
            "1 if this plain tor backend is merged (descriptor fresh, reachable).",
        )
        yield from self._counter(
            "rustbalance_publishes",
            "Master descriptor publishes by time period and result.",
            ["period", "result"],
            [
                ((period, result), n)
                for period, results in v.get("publishes", {}).items()
                for result, n in results.items()
            ],
        )
        yield from self._counter(
            "rustbalance_hsdir_uploads",
            "Descriptor uploads to single HSDirs (HS_DESC UPLOADED / FAILED).",
            ["result"],
            [((r,), n) for r, n in v.get("hsdir_uploads", {}).items()],
        )
        if "hsdir_last_upload" in v:
            family = GaugeMetricFamily(
                "rustbalance_hsdir_last_upload_ok",
                "1 if the last upload to this HSDir succeeded.",
                labels=["hsdir"],
            )
            for fp, ok in v["hsdir_last_upload"].items():
                family.add_metric([fp], 1.0 if ok else 0.0)
            yield family
        age = v.get("descriptor_age_seconds")
        if age is not None:
            yield GaugeMetricFamily(
                "rustbalance_descriptor_age_seconds",
                "Seconds since the last successful publish.",
                value=age,
            )
        yield from self._gauge("is_publisher", "1 if this node is the publisher.")
        yield from self._gauge("peers_alive", "Peers whose heartbeats are current.")
        yield from self._plain_counter("heartbeats_sent", "Heartbeats sent.")
        yield from self._plain_counter("heartbeats_received", "Authenticated heartbeats received.")
        yield from self._counter(
            "rustbalance_rejected_messages",
            "Coordination messages dropped, by reason.",
            ["reason"],
            [((r,), n) for r, n in v.get("rejected_messages", {}).items()],
        )
        if "intro_points" in v:
            family = GaugeMetricFamily(
                "rustbalance_intro_points",
                "Introduction points: this node's own, its peers', and in the merged descriptor.",
                labels=["source"],
            )
            for source, n in v["intro_points"].items():
                family.add_metric([source], float(n))
            yield family
        yield from self._gauge("tor_up", "1 if the tor process is up and bootstrapped.")
        yield from self._plain_counter("tor_restarts", "Times the watchdog restarted tor.")
        yield from self._gauge("proxy_connections_active", "Client connections open now.")
        yield from self._plain_counter("proxy_connections_total", "Client connections accepted.")
        yield from self._counter(
            "rustbalance_proxy_bytes",
            "Bytes relayed by the proxy (up = client to target).",
            ["direction"],
            [((d,), n) for d, n in v.get("proxy_bytes", {}).items()],
        )
        yield from self._counter(
            "rustbalance_proxy_timeouts",
            "Proxied connections ended by a timeout, by kind.",
            ["kind"],
            [((k,), n) for k, n in v.get("proxy_timeouts", {}).items()],
        )
        yield from self._counter(
            "rustbalance_proxy_refused",
            "Connections or requests the front door refused or closed unserved, by reason.",
            ["reason"],
            [((k,), n) for k, n in v.get("proxy_refused", {}).items()],
        )
        yield from self._plain_counter(
            "proxy_circuits_cut", "Tor circuits cut for going over their per-circuit limits."
        )
        yield from self._gauge("target_up", "1 if the target passes its health checks.")
        yield from self._gauge(
            "etcd_connected", "1 if this node's etcd lease is valid (etcd coordination)."
        )
        yield from self._gauge(
            "etcd_registered", "1 if this node's member record is in etcd on a valid lease."
        )
        yield from self._counter(
            "rustbalance_etcd_fencing",
            "Fencing checks with etcd before an upload, by result (refused/failed: not sent).",
            ["result"],
            [((r,), n) for r, n in v.get("etcd_fencing", {}).items()],
        )
        if v.get("distinct_descriptors"):
            family = GaugeMetricFamily(
                "rustbalance_distinct_descriptors",
                "Different descriptors in the last distinct round (one per responsible HSDir).",
                labels=["period"],
            )
            for period, n in v["distinct_descriptors"].items():
                family.add_metric([period], float(n))
            yield family
        if v.get("expected_node_share"):
            family = GaugeMetricFamily(
                "rustbalance_expected_node_share",
                "Lowest and highest expected share of fresh clients a node gets (distinct).",
                labels=["period", "bound"],
            )
            for period, bounds in v["expected_node_share"].items():
                for bound, share in bounds.items():
                    family.add_metric([period, bound], share)
            yield family

    def _up(self, key: str, name: str, label: str, doc: str) -> Iterator[GaugeMetricFamily]:
        if key in self.values:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value, up in self.values[key].items():
                family.add_metric([value], 1.0 if up else 0.0)
            yield family

    def _gauge(self, key: str, doc: str) -> Iterator[GaugeMetricFamily]:
        if key in self.values:
            yield GaugeMetricFamily(f"rustbalance_{key}", doc, value=float(self.values[key]))

    def _plain_counter(self, key: str, doc: str) -> Iterator[CounterMetricFamily]:
        if key in self.values:
            name = f"rustbalance_{key.removesuffix('_total')}"
            yield CounterMetricFamily(name, doc, value=float(self.values[key]))

    @staticmethod
    def _counter(
        name: str, doc: str, labels: list[str], samples: list[tuple[tuple[str, ...], int]]
    ) -> Iterator[CounterMetricFamily]:
        if samples:
            family = CounterMetricFamily(name, doc, labels=labels)
            for values, n in samples:
                family.add_metric(list(values), float(n))
            yield family


class NodeMetrics:
    """A private registry holding the latest snapshot of the daemon's numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        # process_* metrics of this process (Linux /proc), in the private registry too.
        ProcessCollector(registry=self.registry)

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Merge ``snapshot`` into the current values (keys not given keep their value).

        Validates everything first, so a bad snapshot changes nothing.
        """
        clean = _validate(snapshot)
        self._collector.values = {**self._collector.values, **clean}

    def render(self) -> bytes:
        """The text exposition format, as served on ``/metrics``."""
        return bytes(generate_latest(self.registry))


async def feed_metrics(
    metrics: NodeMetrics,
    values: Callable[[], Mapping[str, Any]],
    *,
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """Supervised task: update ``metrics`` from ``values()`` every few seconds."""
    while True:
        metrics.update(values())
        await sleep(METRICS_UPDATE_SECS)


# --- the HTTP endpoint ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    max_request_bytes: int = 8192
    read_timeout: float = 5.0
    max_connections: int = 16


class MetricsServer:
    """Serves ``GET /metrics`` (and HEAD) on ``host:port``; every other path is 404.

    One request per connection (``Connection: close``), a bounded request head, a read
    timeout and a cap on concurrent connections: a scraper needs nothing more, and nothing
    more is exposed. Bind it to loopback (the default) unless a firewall guards the port.
    """

    def __init__(
        self,
        metrics: NodeMetrics,
        host: str = DEFAULT_LISTEN[0],
        port: int = DEFAULT_LISTEN[1],
        *,
        max_request_bytes: int = 8192,
        read_timeout: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._limits = _Limits(max_request_bytes, read_timeout, max_connections)
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("Metrics served on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self._limits.max_connections:
                return  # just close: a scraper retries, a flood gets nothing
            try:
                async with asyncio.timeout(self._limits.read_timeout):
                    response = await self._answer(reader)
            except TimeoutError:
                response = _simple(408, b"request timeout\n")
            writer.write(response)
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.drain(), self._limits.read_timeout)
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_request_bytes)
        received = 0
        # Bounded: each pass reads at least one byte or ends (EOF -> ConnectionClosed/error),
        # and at most max_request_bytes are accepted.
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return _simple(exc.error_status_hint, b"bad request\n")
            if event is h11.NEED_DATA:
                data = await reader.read(4096)
                received += len(data)
                if received > self._limits.max_request_bytes:
                    return _simple(431, b"request too large\n")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            return _simple(400, b"bad request\n")
        method = bytes(event.method)
        path = bytes(event.target).split(b"?", 1)[0]
        if path != b"/metrics":
            return _simple(404, b"not found\n")
        if method not in (b"GET", b"HEAD"):
            return _simple(405, b"method not allowed\n", (("Allow", "GET, HEAD"),))
        body = self.metrics.render()
        return _response(200, CONTENT_TYPE_LATEST, body, include_body=method == b"GET")


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}


def _response(
    status: int,
    content_type: str,
    body: bytes,
    extra: tuple[tuple[str, str], ...] = (),
    *,
    include_body: bool = True,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in extra),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head + body if include_body else head


def _simple(status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    return _response(status, "text/plain; charset=utf-8", body, extra)


async def start_metrics_server(
    metrics: NodeMetrics, *, enabled: bool, host: str, port: int
) -> MetricsServer | None:
    """Start the endpoint per ``[metrics]`` (``enabled``, ``listen``); None when switched off."""
    if not enabled:
        log.info("Metrics endpoint disabled ([metrics] enabled = false)")
        return None
    server = MetricsServer(metrics, host, port)
    await server.start()
    return server
