"""Memory: RSS of one proxy process at rest and with many idle proxied connections.

The goal is 10 000 idle connections in <= 200 MB. A proxied tcp-mode connection costs the
proxy two descriptors (client + target) and RLIMIT_NOFILE's hard limit on this kind of
machine is often 20 000, which a non-privileged process cannot raise; so tcp mode is measured
at TCP_CONNECTIONS and scaled linearly to 10 000 (the per-connection cost is what matters),
and http mode (an idle keep-alive client has no target connection yet) at the full 10 000.
HAProxy holds the same connections in the same run for the ratio. Everything on 127.0.0.1;
every process started here is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from benchmarks.bench_proxy import _free_port, _haproxy, _haproxy_proxy_config
from benchmarks.results import record

GOAL_CONNECTIONS = 10_000
GOAL_MB = 200.0

_PROXY = """
import asyncio, os, sys
from rustbalance.proxy import ProxySettings, ReverseProxy, Target
from rustbalance.proxy.eventloop import run

async def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    # Idle connections that never send a request: the head timeout (10 s by default) would
    # close them; here they are held to measure what each costs.
    settings = ProxySettings(target=Target("127.0.0.1", port, False), mode=mode,
                             max_connections=20000, idle_timeout=600.0, head_timeout=600.0)
    proxy = ReverseProxy(settings)
    await proxy.start()
    print(proxy.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await proxy.close(1.0)

# The event loop `rustbalance run` uses for this mode (uvloop for http, stock for tcp).
run(main(), mode=sys.argv[1])
"""

# Accepts connections and holds them, reading nothing (a target that keeps them idle).
_HOLDER = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
held = []
listener.settimeout(1.0)
import select
while True:
    ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
    if sys.stdin in ready:
        break
    if listener in ready:
        try:
            held.append(listener.accept()[0])
        except OSError:
            pass
"""


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(hard)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def _child(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()  # by PID: only the process we started
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _open_idle(port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _wait_fds(pid: int, want: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _fds(pid) >= want:
            time.sleep(0.5)  # let allocations settle
            return
        time.sleep(0.1)
    raise RuntimeError(f"pid {pid}: {_fds(pid)} descriptors, wanted {want}")


def _measure(pid: int, port: int, count: int, fds_each: int, slack: int = 0) -> tuple[float, float]:
    """(RSS at rest, RSS with ``count`` idle connections) in MB. ``slack``: descriptors the
    process may close meanwhile on its own (a whole daemon's short-lived sockets and files)."""
    rest = _rss_mb(pid)
    base = _fds(pid)
    socks = _open_idle(port, count)
    try:
        _wait_fds(pid, base + fds_each * count - slack)
        return rest, _rss_mb(pid)
    finally:
        for sock in socks:
            sock.close()


def _haproxy_pid(port: int) -> int:
    # The haproxy we just started is the one listening on our port (check /proc, by inode).
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                inode = fields[9]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
    raise RuntimeError("haproxy process not found")


def run() -> list[str]:
    hard = _raise_nofile()
    tcp_count = min(GOAL_CONNECTIONS, (hard - 200) // 2)
    http_count = min(GOAL_CONNECTIONS, hard - 200)
    rows: list[tuple[str, int, float, float]] = []
    with _child(_HOLDER) as (_holder, target):
        for mode, count, fds_each in (("tcp", tcp_count, 2), ("http", http_count, 1)):
            with _child(_PROXY, mode, str(target)) as (proc, port):
                rest, loaded = _measure(proc.pid, port, count, fds_each)
                rows.append((f"RustBalance ({mode})", count, rest, loaded))
            hap_port = _free_port()
            config = _haproxy_proxy_config(mode, hap_port, target).replace(
                "maxconn 8192", "maxconn 9900"
            )
            with _haproxy(config, hap_port):
                pid = _haproxy_pid(hap_port)
                rest, loaded = _measure(pid, hap_port, min(count, 9800), fds_each)
                rows.append((f"HAProxy ({mode})", min(count, 9800), rest, loaded))
    lines = [
        "## Memory: idle proxied connections",
        "",
        f"RSS of one proxy process (RLIMIT_NOFILE hard limit here: {hard}; tcp mode holds two "
        "descriptors per connection, so it is measured below 10 000 and scaled).",
        "",
        "| process | connections | RSS at rest MB | RSS loaded MB | KB per connection | "
        f"RSS at {GOAL_CONNECTIONS} MB (scaled) |",
        "|---|---|---|---|---|---|",
    ]
    for name, count, rest, loaded in rows:
        per = (loaded - rest) / count
        at_goal = rest + per * GOAL_CONNECTIONS
        lines.append(
            f"| {name} | {count} | {rest:.1f} | {loaded:.1f} | {per * 1024:.1f} | {at_goal:.0f} |"
        )
    record(
        "memory_idle",
        "rows",
        [
            {"process": name, "connections": count, "rss_rest_mb": rest, "rss_loaded_mb": loaded}
            for name, count, rest, loaded in rows
        ],
    )
    record("memory_idle", "goal_mb", GOAL_MB)
    record("memory_idle", "goal_connections", GOAL_CONNECTIONS)
    ours = [r for r in rows if r[0].startswith("RustBalance")]
    worst = max(r[2] + (r[3] - r[2]) / r[1] * GOAL_CONNECTIONS for r in ours)
    verdict = "met" if worst <= GOAL_MB else "NOT met"
    lines += ["", f"Goal <= {GOAL_MB:.0f} MB at {GOAL_CONNECTIONS} connections: {verdict}.", ""]
    return lines


if __name__ == "__main__":
    print("\n".join(run()))
