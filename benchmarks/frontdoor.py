"""The front door under attack: a legitimate client's success rate and latency while an attacker
holds connections against the proxy (issue 15). Shared by ``bench_frontdoor`` (``make bench``,
beside HAProxy) and the test suite's short run (tests/proxy/test_front_door_load.py).

Attacks (each from its own process, ``python -m benchmarks.frontdoor KIND PORT COUNT``):

* ``slow``: COUNT connections each sending a request head one byte per second, reconnecting
  as soon as one is closed;
* ``idle``: COUNT connections that send nothing after tor's PROXY line, reconnecting;
* ``circuit``: one circuit opening streams as fast as it can, each sending a request and
  staying open, up to COUNT at once.

Every connection starts with the PROXY line tor writes (``HiddenServiceExportCircuitID
haproxy``): the ``slow`` and ``idle`` attackers use a new circuit per connection (the worst
case for per-circuit limits), ``circuit`` one circuit for all. The legitimate client opens a
new connection per request on its own circuit, one request every ``INTERVAL`` seconds; a
request succeeds when its 200 arrives within 5 seconds. Everything runs on
127.0.0.1; every process is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import bench_proxy
from rustbalance.proxy.wire import tor_proxy_line

# HAProxy by PID on a generated config, and a free port: bench_proxy's.
haproxy = bench_proxy._haproxy
free_port = bench_proxy._free_port

KINDS = ("slow", "idle", "circuit")
LEGIT_CIRCUIT = 42
# The legitimate client's pace: 5 requests a second on its one circuit, each a new stream (10
# of the circuit's tokens a second: within the default 20/s, as a browser's use would be).
INTERVAL = 0.2
ATTACK_CIRCUIT = 666
_REQUEST = b"GET / HTTP/1.1\r\nHost: frontdoor\r\nConnection: close\r\n\r\n"
_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    ok: int
    failed: int
    latencies: tuple[float, ...]  # seconds, successful requests

    @property
    def success(self) -> float:
        total = self.ok + self.failed
        return self.ok / total if total else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("inf")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("inf")


# -- the attacker (a child process) ---------------------------------------------------------


async def _slow(port: int, stop: asyncio.Event, circuits: Iterator[int]) -> None:
    while not stop.is_set():  # one connection per turn; reconnects when the proxy closes it
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            writer.write(tor_proxy_line(next(circuits)) + b"GET / HTTP/1.1\r\nHost: x\r\nX-S: ")
            while not stop.is_set() and not reader.at_eof():
                await asyncio.sleep(1.0)
                writer.write(b"a")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(65536), 0.001)
        except OSError:
            pass
        finally:
            writer.transport.abort()


async def _idle(port: int, stop: asyncio.Event, circuits: Iterator[int]) -> None:
    while not stop.is_set():  # one connection per turn; reconnects when the proxy closes it
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            writer.write(tor_proxy_line(next(circuits)))
            while not stop.is_set():
                data = await reader.read(65536)
                if not data:
                    break
        except OSError:
            pass
        finally:
            writer.transport.abort()


async def _circuit(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """One of COUNT workers of the one-circuit flood: streams as fast as they can be opened."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        opened[0] += 1
        try:
            writer.write(tor_proxy_line(ATTACK_CIRCUIT) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            while not stop.is_set():  # held open, reading (and dropping) what comes
                if not await reader.read(65536):
                    break
        except OSError:
            pass
        finally:
            writer.transport.abort()


async def _attack(kind: str, port: int, count: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes stdin to stop us
    circuits = itertools.count(random.randrange(1000, 2**31))
    opened = [0]
    if kind == "slow":
        workers = [_slow(port, stop, circuits) for _ in range(count)]
    elif kind == "idle":
        workers = [_idle(port, stop, circuits) for _ in range(count)]
    else:
        workers = [_circuit(port, stop, opened) for _ in range(count)]
    tasks = []
    for worker in workers:  # opened in a stream, not all in one instant
        tasks.append(asyncio.ensure_future(worker))
        await asyncio.sleep(0)
    print("ready", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"opened": opened[0]}), flush=True)


@contextlib.contextmanager
def attacker(kind: str, port: int, count: int) -> Iterator[int]:
    """The attack in its own process; yields its PID; stopped by closing its stdin, then by
    PID (SIGKILL after 10 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.frontdoor", kind, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=_ROOT,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the attacker did not start")
        yield proc.pid
    finally:
        bench_proxy.end_child(proc, 10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- the legitimate client -----------------------------------------------------------------


async def _one_request(port: int, limit: float) -> float | None:
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(tor_proxy_line(LEGIT_CIRCUIT) + _REQUEST)
            answer = b""
            while chunk := await reader.read(65536):
                answer += chunk
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    if not answer.startswith(b"HTTP/1.1 200 ") or not answer.endswith(b"ok"):
        return None
    return time.perf_counter() - started


async def legitimate_client(
    port: int, seconds: float, *, interval: float = INTERVAL, limit: float = 5.0
) -> Result:
    """One request every ``interval`` seconds (each its own connection, in flight together
    when slow) for ``seconds``; a request succeeds when its 200 arrives within ``limit``
    seconds; every request's outcome is waited for."""
    pending: list[asyncio.Task[float | None]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bounded by ``seconds``
        pending.append(asyncio.ensure_future(_one_request(port, limit)))
        await asyncio.sleep(interval)
    results = await asyncio.gather(*pending)
    latencies = tuple(r for r in results if r is not None)
    return Result(len(latencies), len(results) - len(latencies), latencies)


# -- the proxies ---------------------------------------------------------------------------

_OURS = """
import asyncio, json, sys
from rustbalance.proxy import CircuitLimits, ProxySettings, ReverseProxy, Target
from rustbalance.proxy.eventloop import run

async def main() -> None:
    options = json.loads(sys.argv[1])
    limits = CircuitLimits(**options.pop("circuit_limits", {}))
    settings = ProxySettings(
        target=Target("127.0.0.1", options.pop("target"), False), circuit_ids=True,
        circuit_limits=limits, **options,
    )
    proxy = ReverseProxy(settings)
    await proxy.start()
    print(proxy.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps({"evicted": proxy.stats.evicted, "rejected": proxy.stats.rejected,
                      "circuits_cut": proxy.stats.circuits_cut,
                      "head_timeouts": proxy.stats.head_timeouts}), flush=True)
    await proxy.close(1.0)

run(main(), mode="http")
"""


@dataclass
class Ours:
    """A running RustBalance proxy: its port; ``stats`` (displaced, rejected, cut...) once
    it has stopped."""

    port: int
    stats: dict[str, int]


@contextlib.contextmanager
def rustbalance(target: int, **options: object) -> Iterator[Ours]:
    """Our proxy (http mode, its default front door unless ``options`` say otherwise) in its
    own process, on the event loop ``rustbalance run`` uses."""
    argv = [sys.executable, "-c", _OURS, json.dumps({"target": target, **options})]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_ROOT
    )
    ours: Ours | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("RustBalance did not start")
        ours = Ours(int(line), {})
        yield ours
    finally:
        bench_proxy.end_child(proc, 15)
        if proc.stdout is not None:
            rest = proc.stdout.read().strip()
            if ours is not None and rest.startswith("{"):
                ours.stats.update(json.loads(rest))
            proc.stdout.close()


def haproxy_config(
    port: int, target: int, *, cap: int, head_timeout: float, per_circuit: int = 32
) -> str:
    """HAProxy 2.6 as an onion operator runs it: its usual timeouts (``timeout http-request``
    for the head, ``http-keep-alive``, client/server), tor's PROXY line accepted, and the usual
    per-source (here: per-circuit) limits in a stick table: at most ``per_circuit``
    connections at once,
    at most 200 requests per 10 s (429 above). The rules are ``tcp-request session`` ones:
    those run once the PROXY line is read (``tcp-request connection`` ones run before it)."""
    return f"""
global
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request {head_timeout:g}s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    maxconn {cap}
    stick-table type ipv6 size 100k expire 60s store conn_cur,http_req_rate(10s)
    tcp-request session track-sc0 src
    tcp-request session reject if {{ sc0_conn_cur gt {per_circuit} }}
    http-request deny deny_status 429 if {{ sc0_http_req_rate gt 200 }}
    default_backend be
backend be
    server t 127.0.0.1:{target}
"""


def static_target_config(port: int) -> str:
    """A separate HAProxy answering every request with ``200 ok`` (the application)."""
    return f"""
global
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend static
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok
"""


def measure(port: int, kind: str, count: int, *, warm: float, seconds: float) -> Result:
    """The legitimate client's result through ``port`` while ``kind`` is held against it."""
    with attacker(kind, port, count):
        time.sleep(warm)
        return asyncio.run(legitimate_client(port, seconds))


if __name__ == "__main__":
    asyncio.run(_attack(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    os._exit(0)
