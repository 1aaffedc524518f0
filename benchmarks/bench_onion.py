"""In the private Tor network: RustBalance vs Onionbalance 0.2.4, and the proxy's CPU vs tor's.

* Onionbalance 0.2.4 (installed by this benchmark into its own venv, OB_VENV, git-ignored)
  with two backends (tor ``HiddenServiceOnionbalanceInstance``), driven through a client's
  ControlPort with ``--is-testnet`` (it hard-codes 20 s voting, tor.md §13.5):
  - seconds from starting the publisher to the master address answering through a client;
  - seconds from killing one backend's tor to a master descriptor without its intro points
    (Onionbalance logs "created ... descriptor (N intro points)" with only the survivor's 2).
* RustBalance, single node (``rustbalance run`` with its managed tor): seconds from starting
  the daemon to the master address answering. The failover figure needs several nodes; the
  variant table (``_OUR_VARIANTS``) is where a multi-node run gets added.
* CPU seconds per GB: the proxy (tcp mode, splice and stream relay) vs the tors of the
  network carrying the same bytes (client SOCKS -> onion service -> a local source).

Probes fetch the master through a separate client tor; after a failed fetch it gets NEWNYM,
which purges its descriptor cache (tor.md §13.9). Everything listens on 127.0.0.1, every
process is stopped by PID, every wait is bounded. Times depend on where the clock stands in
the 20 s voting schedule (±10 s), so read them as a comparison within one run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_proxy import _bulk_source
from rustbalance.errors import TorProcessError
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.testnet.network import TorInstance

OB_VERSION = "0.2.4"
OB_VENV = Path(__file__).resolve().parent.parent / ".bench-venv"  # git-ignored cache
ANSWER_TIMEOUT = 180.0
FAILOVER_TIMEOUT = 120.0
TOR_BYTES = 64 * 1024 * 1024
PROXY_BYTES = 1024 * 1024 * 1024

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers ------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _stop_pid(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, SIGKILL after ``grace`` s: only the process we started (tor.md §13.10.6)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _ensure_onionbalance() -> Path:
    binary = OB_VENV / "bin" / "onionbalance"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OB_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(OB_VENV / "bin" / "pip"), "install", "-q", f"onionbalance=={OB_VERSION}"],
            check=True,
            timeout=600,
        )
    return binary


def _fetch(socks_port: int, address: str, attempt: int, timeout: float = 20.0) -> bool:
    """One HTTP GET of the master through the probe client (own circuit per attempt)."""
    result = subprocess.run(
        [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "--socks5-hostname", f"127.0.0.1:{socks_port}",
            "-U", f"probe{attempt}-{secrets.token_hex(4)}:x",
            "--max-time", str(timeout), f"http://{address}/",
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )  # fmt: skip
    return result.stdout.strip() == "200"


def _newnym(control_port: int, cookie_file: Path) -> None:
    """SIGNAL NEWNYM over a plain control connection (cookie auth). Not stem: stem takes
    ownership of a tor whose __OwningControllerProcess is our PID, and that tor then exits
    when stem's connection closes."""
    cookie = cookie_file.read_bytes().hex()
    with socket.create_connection(("127.0.0.1", control_port), timeout=10) as sock:
        sock.sendall(f"AUTHENTICATE {cookie}\r\nSIGNAL NEWNYM\r\nQUIT\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    if reply.count(b"250 ") < 2:
        raise RuntimeError(f"NEWNYM failed: {reply!r}")


def _time_until_answering(probe: TorInstance, address: str, started: float) -> float | None:
    """Seconds from ``started`` until a fetch of ``address`` through ``probe`` succeeds
    (None: not within ANSWER_TIMEOUT)."""
    socks, control = probe.socks_port, probe.control_port
    assert socks is not None and control is not None
    cookie = probe.data_dir / "control_auth_cookie"
    attempt = 0
    while time.monotonic() - started < ANSWER_TIMEOUT:
        attempt += 1
        if _fetch(socks, address, attempt):
            return time.monotonic() - started
        with contextlib.suppress(Exception):
            _newnym(control, cookie)  # forget the failed descriptor lookup
        time.sleep(1.0)
    return None


# -- Onionbalance ---------------------------------------------------------------------------


def _write_ob_key(path: Path) -> str:
    """A fresh master key in Onionbalance's PEM format; returns its onion address."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rustbalance.crypto.keys import IdentityKey

    seed = secrets.token_bytes(32)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return IdentityKey.from_seed(seed).onion_address


@dataclass
class _LogWatch:
    """Timestamps (monotonic) of log lines as they appear in a growing file."""

    path: Path
    offset: int = 0

    def wait_for(
        self,
        pattern: str,
        timeout: float,
        after: float,
        accept: Callable[[re.Match[str]], bool] = lambda _match: True,
    ) -> float | None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
                end = chunk.rfind(b"\n") + 1
                self.offset += end
                for line in chunk[:end].decode("utf-8", "replace").splitlines():
                    match = regex.search(line)
                    if match and accept(match) and time.monotonic() >= after:
                        return time.monotonic()
            time.sleep(0.2)
        return None


def _onionbalance(
    net: PrivateTorNetwork, probe: TorInstance, work: Path
) -> dict[str, float | None]:
    from rustbalance.testnet.apps import NamedHTTPServer

    binary = _ensure_onionbalance()
    work.mkdir(parents=True, exist_ok=True)
    key_path = work / "master.pem"
    master = _write_ob_key(key_path)
    servers = [NamedHTTPServer(f"ob-backend-{i}") for i in range(2)]
    backends = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        for i, server in enumerate(servers):
            backends.append(
                net.add_onion_service(f"ob{i}", {80: server.port}, onionbalance_master=master)
            )
        addresses = [str(b.onion_address).removesuffix(".onion") for b in backends]
        config = work / "config.yaml"
        config.write_text(
            "services:\n"
            f"- key: {key_path}\n"
            "  instances:\n"
            + "".join(
                f"  - address: {a}.onion\n    name: node{i}\n" for i, a in enumerate(addresses)
            )
        )
        client = net.clients[0]
        log_path = work / "onionbalance.log"
        with log_path.open("wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [
                    str(binary), "--is-testnet", "-i", "127.0.0.1", "-p", str(client.control_port),
                    "-c", str(config), "-v", "info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
            )  # fmt: skip
        answering = _time_until_answering(probe, master, started)
        watch = _LogWatch(log_path, offset=log_path.stat().st_size)  # only what comes next
        killed = time.monotonic()
        backends[0].kill()  # the backend's tor, by PID
        # A master descriptor with only the survivor's intro points (Onionbalance takes
        # N_INTROS_PER_INSTANCE = 2 from each backend; it logs the count it publishes).
        published = watch.wait_for(
            r"created \S+ descriptor \((\d+) intro points\)",
            FAILOVER_TIMEOUT,
            killed,
            accept=lambda match: int(match[1]) <= 2,
        )
        return {
            "answering": answering,
            "failover": None if published is None else published - killed,
        }
    finally:
        if proc is not None:
            _stop_pid(proc)
        for backend in backends:
            net.remove(backend)
        for server in servers:
            server.close()


# -- RustBalance ----------------------------------------------------------------------------


def _ours_single(net: PrivateTorNetwork, probe: TorInstance, work: Path) -> dict[str, float | None]:
    from tests.node_e2e import running_node

    started = time.monotonic()
    with running_node(net, work / "node-a") as node:
        answering = _time_until_answering(probe, node.address, started)
    # One node: killing its backend leaves no other intro points to fall back to.
    return {"answering": answering, "failover": None}


# name -> runner; a multi-node variant (start N nodes, kill one, watch the master descriptor's
# intro points) is added here when multi-node exists.
_OUR_VARIANTS: dict[
    str, Callable[[PrivateTorNetwork, TorInstance, Path], dict[str, float | None]]
] = {
    "RustBalance (1 node)": _ours_single,
}


# -- CPU per GB ----------------------------------------------------------------------------


def _tor_cpu_per_gb(net: PrivateTorNetwork, probe: TorInstance) -> tuple[float, float, float]:
    """CPU seconds per GB for TOR_BYTES pulled through an onion service (client SOCKS ->
    rendezvous -> service -> a local source): (all tors, the client, the service)."""
    from python_socks.sync import Proxy

    with _bulk_source(TOR_BYTES) as port:
        service = net.add_onion_service("bulk", {80: port})
        try:
            address = str(service.onion_address)
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while True:  # the first connect waits for the descriptor (bounded)
                auth = secrets.token_hex(4)
                proxy = Proxy.from_url(f"socks5://cpu{auth}:x@127.0.0.1:{probe.socks_port}")
                try:
                    sock = proxy.connect(address, 80, timeout=30)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            pids = list(net.pids().values())
            before = {pid: _cpu_seconds(pid) for pid in pids}
            got = 0
            sock.settimeout(120)
            with sock:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            after = {pid: _cpu_seconds(pid) for pid in pids}
            assert probe.pid is not None and service.pid is not None
            client = after[probe.pid] - before[probe.pid]
            served = after[service.pid] - before[service.pid]
        finally:
            net.remove(service)
    if got != TOR_BYTES:
        raise RuntimeError(f"short download through tor: {got} of {TOR_BYTES}")
    gb = got / 1e9
    total = sum(after[p] - before[p] for p in pids)
    return total / gb, client / gb, served / gb


_PROXY = """
import asyncio, sys
from rustbalance.proxy import ProxySettings, ReverseProxy, Target

async def main() -> None:
    port, splice = int(sys.argv[1]), sys.argv[2] == "1"
    proxy = ReverseProxy(ProxySettings(target=Target("127.0.0.1", port, False), mode="tcp"),
                         splice=splice)
    await proxy.start()
    print(proxy.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await proxy.close(1.0)

asyncio.run(main())
"""


def _proxy_cpu_per_gb(splice: bool) -> float:
    with _bulk_source(PROXY_BYTES) as source:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PROXY, str(source), "1" if splice else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            before = _cpu_seconds(proc.pid)
            got = 0
            buf = bytearray(1 << 20)
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                while n := sock.recv_into(buf):
                    got += n
            cpu = _cpu_seconds(proc.pid) - before
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _stop_pid(proc)
            if proc.stdout is not None:
                proc.stdout.close()
    if got != PROXY_BYTES:
        raise RuntimeError(f"short download through the proxy: {got} of {PROXY_BYTES}")
    return cpu / (got / 1e9)


# -- report ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _network(base: Path) -> Iterator[tuple[PrivateTorNetwork, TorInstance]]:
    """A fresh network; a second try when the first fails to start (the ports it picked
    can be taken in the meantime by other programs on a busy machine)."""
    for attempt in (1, 2):
        net = PrivateTorNetwork(base / f"net{attempt}", n_relays=4)
        try:
            net.start()
            probe = net.add_client("probe")
        except TorProcessError:
            net.stop()
            if attempt == 2:
                raise
            continue
        try:
            yield net, probe
        finally:
            net.stop()
        return


def _fmt(value: float | None, limit: float) -> str:
    return f"not within {limit:.0f} s" if value is None else f"{value:.1f} s"


def run() -> list[str]:
    results: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="rb-bench-onion-") as tmp:
        base = Path(tmp)
        with _network(base) as (net, probe):
            tor_all, tor_client, tor_service = _tor_cpu_per_gb(net, probe)
            results["Onionbalance 0.2.4 (2 backends)"] = _onionbalance(net, probe, base / "ob")
            for name, variant in _OUR_VARIANTS.items():
                results[name] = variant(net, probe, base / "ours")
    ours_splice = _proxy_cpu_per_gb(splice=True)
    ours_streams = _proxy_cpu_per_gb(splice=False)
    ob = results["Onionbalance 0.2.4 (2 backends)"]
    lines = [
        "## Private Tor network: RustBalance vs Onionbalance 0.2.4",
        "",
        "3 authorities + 4 relays on 127.0.0.1, 20 s voting (tor.md §13.5). Probes fetch the "
        "master through a separate client; times include the 1 s pause and NEWNYM between failed "
        "probes and depend on the voting schedule (±10 s).",
        "",
        "| system | start -> master answers | kill a backend -> descriptor without it | "
        "start vs Onionbalance |",
        "|---|---|---|---|",
    ]
    for name, res in results.items():
        ratio = "—"
        if res["answering"] and ob["answering"]:
            ratio = f"{res['answering'] / ob['answering']:.2f}x"
        failover = (
            "n/a (needs ≥ 2 nodes)"
            if name.startswith("RustBalance") and res["failover"] is None
            else _fmt(res["failover"], FAILOVER_TIMEOUT)
        )
        lines.append(
            f"| {name} | {_fmt(res['answering'], ANSWER_TIMEOUT)} | {failover} | {ratio} |"
        )
    lines += [
        "",
        "Onionbalance's start time counts from launching the publisher with both backends "
        "already published; RustBalance's from launching the daemon, which starts and "
        "bootstraps its own tor first.",
        "",
        "CPU seconds per GB relayed (the proxy never being the bottleneck):",
        "",
        "| what | CPU s/GB | vs the proxy (splice) |",
        "|---|---|---|",
        f"| RustBalance tcp mode, splice | {ours_splice:.2f} | 1.00x |",
        f"| RustBalance tcp mode, stream relay | {ours_streams:.2f} | "
        f"{ours_streams / ours_splice:.1f}x |",
        f"| tor client (SOCKS, {TOR_BYTES >> 20} MiB via an onion service) | {tor_client:.2f} | "
        f"{tor_client / ours_splice:.1f}x |",
        f"| tor onion service | {tor_service:.2f} | {tor_service / ours_splice:.1f}x |",
        f"| all tors (client, service, 6 relays on the path, idle others) | {tor_all:.2f} | "
        f"{tor_all / ours_splice:.1f}x |",
        "",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(run()))
