"""The front door under attack: RustBalance beside HAProxy, in one run (issue 15).

For each attack of :mod:`benchmarks.frontdoor` (2,000 slow-header connections, 2,000 idle
connections, one circuit opening streams as fast as it can) and each proxy (HAProxy 2.6 with
its usual timeouts and per-circuit stick-table limits; RustBalance with its defaults), a
fresh proxy in front of one static application, the attack held WARM seconds (longer than
the 10 s head timeout, so the attacker is cycling), then a legitimate client measured for
SECONDS: its success rate (a 200 within LIMIT seconds, each request a new connection on its
own circuit) and its latency. Both proxies get the same connection cap. Then case (c)
through real tor on a private network (:mod:`benchmarks.frontdoor_tor`, also run short in
``tests/proxy/test_front_door_tor.py``).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from benchmarks import frontdoor as fd
from benchmarks.frontdoor_tor import TorFloodResult, circuit_flood_through_tor
from benchmarks.results import finite, record
from rustbalance.testnet import PrivateTorNetwork

ATTACK_CONNECTIONS = 2000
CAP = 1024  # RustBalance's default max_connections; HAProxy's frontend maxconn the same
HEAD_TIMEOUT = 10.0  # RustBalance's default; HAProxy's timeout http-request the same
WARM = 12.0
SECONDS = 30.0
GOAL = 0.99

_WHAT = {
    "slow": f"{ATTACK_CONNECTIONS} slow-header connections (one header byte a second)",
    "idle": f"{ATTACK_CONNECTIONS} idle connections (tor's PROXY line, then nothing)",
    "circuit": f"one circuit opening streams as fast as it can (up to {ATTACK_CONNECTIONS})",
}


# Through real tor: the flooding circuit's workers, the per-circuit limit, legitimate requests.
TOR_WIDTH = 64
TOR_LIMIT = 32
TOR_REQUESTS = 40


def _figures(success: float, ok: int, failed: int, p50: float, p95: float) -> dict[str, object]:
    """What results.json keeps of one measurement (latencies in ms; None when none passed)."""
    return {
        "success": success,
        "ok": ok,
        "failed": failed,
        "p50_ms": finite(p50 * 1000),
        "p95_ms": finite(p95 * 1000),
    }


def run() -> list[str]:
    return [*_local(), *_through_tor()]


def _local() -> list[str]:
    rows: list[str] = []
    verdicts: list[str] = []
    recorded: dict[str, dict[str, object]] = {}
    static = fd.free_port()
    with fd.haproxy(fd.static_target_config(static), static):
        for kind in fd.KINDS:
            hap_port = fd.free_port()
            config = fd.haproxy_config(hap_port, static, cap=CAP, head_timeout=HEAD_TIMEOUT)
            with fd.haproxy(config, hap_port):
                hap = fd.measure(hap_port, kind, ATTACK_CONNECTIONS, warm=WARM, seconds=SECONDS)
            with fd.rustbalance(static, max_connections=CAP) as ours_proxy:
                ours = fd.measure(
                    ours_proxy.port, kind, ATTACK_CONNECTIONS, warm=WARM, seconds=SECONDS
                )
            stats = ours_proxy.stats
            for name, result, note in (
                ("HAProxy", hap, "—"),
                (
                    "RustBalance",
                    ours,
                    f"{stats.get('evicted', 0)} waiting connections displaced, "
                    f"{stats.get('circuits_cut', 0)} circuits cut",
                ),
            ):
                rows.append(
                    f"| {_WHAT[kind]} | {name} | {result.success:.1%} ({result.ok} of "
                    f"{result.ok + result.failed}) | {result.p50 * 1000:.0f} | "
                    f"{result.percentile(0.95) * 1000:.0f} | {note} |"
                )
            recorded[kind] = {
                "what": _WHAT[kind],
                "paths": {
                    name: _figures(r.success, r.ok, r.failed, r.p50, r.percentile(0.95))
                    for name, r in (("HAProxy", hap), ("RustBalance", ours))
                },
                "displaced": stats.get("evicted", 0),
                "circuits_cut": stats.get("circuits_cut", 0),
            }
            met = ours.success >= GOAL and ours.success >= hap.success
            verdicts.append(
                f"- {kind}: RustBalance {ours.success:.1%}, HAProxy {hap.success:.1%}: "
                f"{'met' if met else 'NOT met'}."
            )
    record("frontdoor", "attacks", recorded)
    record("frontdoor", "goal", GOAL)
    record("frontdoor", "attack_connections", ATTACK_CONNECTIONS)
    return [
        "## Front door under attack (RustBalance vs HAProxy)",
        "",
        f"A legitimate client makes one request every {fd.INTERVAL:g} s for {SECONDS:.0f} s, "
        "each a new "
        "connection starting with tor's PROXY line for its own circuit, while an attacker "
        f"(its own process) has held its connections for {WARM:.0f} s already; a request "
        f"succeeds when its 200 arrives within 5 s. Both proxies: cap {CAP} connections, a "
        f"request head within {HEAD_TIMEOUT:.0f} s. HAProxy 2.6 (`mode http`, `timeout "
        f"http-request {HEAD_TIMEOUT:.0f}s`, `timeout http-keep-alive 30s`, `accept-proxy`, a "
        "stick table per circuit: over 32 connections at once refused, over 200 requests per "
        "10 s a 429); RustBalance with its defaults (waiting connections displaced at the cap, "
        "32 streams per circuit, 20 requests/s with a burst of 200, a cut circuit refused for "
        f"60 s). {os.cpu_count()} cores, everything on 127.0.0.1.",
        "",
        "| attack | proxy | legitimate success | p50 ms | p95 ms | RustBalance did |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Goal: the legitimate client's success >= {GOAL:.0%} in every case, and no worse than "
        "HAProxy's:",
        "",
        *verdicts,
        "",
    ]


def _through_tor() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="rb-frontdoor-") as tmp:
        net = PrivateTorNetwork(Path(tmp) / "net", n_relays=4)
        net.start()
        try:
            attacker = net.add_client("attacker")
            legit = net.add_client("legit")
            assert attacker.socks_address is not None and legit.socks_address is not None
            measured: dict[str, TorFloodResult] = {}
            for name, haproxy in (("HAProxy", True), ("RustBalance", False)):
                measured[name] = asyncio.run(
                    circuit_flood_through_tor(
                        net,
                        attacker.socks_address,
                        legit.socks_address,
                        limit=TOR_LIMIT,
                        width=TOR_WIDTH,
                        requests=TOR_REQUESTS,
                        warm=15.0,
                        haproxy=haproxy,
                    )
                )
        finally:
            net.stop()
    rows = []
    for name, result in measured.items():
        did = (
            f"{len(result.cut)} circuits cut, {len(result.closed_by_tor)} closed by tor"
            if name == "RustBalance"
            else "extra streams refused by the stick table"
        )
        rows.append(
            f"| {name} | {result.success:.1%} ({result.ok} of {result.ok + result.failed}) | "
            f"{result.percentile(0.5) * 1000:.0f} | {result.percentile(0.95) * 1000:.0f} | "
            f"{result.attacker_streams} | {did} |"
        )
    ours, hap = measured["RustBalance"], measured["HAProxy"]
    record(
        "frontdoor",
        "through_tor",
        {
            name: {
                **_figures(r.success, r.ok, r.failed, r.percentile(0.5), r.percentile(0.95)),
                "attacker_streams": r.attacker_streams,
                "circuits_cut": len(r.cut),
                "closed_by_tor": len(r.closed_by_tor),
            }
            for name, r in measured.items()
        },
    )
    met = ours.success >= GOAL and ours.success >= hap.success
    return [
        "## Front door under attack through real tor (case c)",
        "",
        f"The private Tor network (3 authorities, 4 relays). An onion service "
        "(`HiddenServiceExportCircuitID haproxy`) in front of each proxy; an attacker's tor "
        f"client opens streams on one circuit ({TOR_WIDTH} at once, each sending a request and "
        f"staying open, reopened at once) for 15 s, then a legitimate client (its own tor "
        f"client and circuit) makes {TOR_REQUESTS} requests, one after the other, the flood "
        f"going on. Both proxies allow {TOR_LIMIT} streams per circuit: HAProxy refuses the "
        "extra streams (stick table, as above), RustBalance cuts the circuit and has tor close "
        "it (CLOSECIRCUIT), so the attacker must build a new rendezvous circuit each time.",
        "",
        "| proxy | legitimate success | p50 ms | p95 ms | attacker streams opened | "
        "what the proxy did |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Goal (success >= {GOAL:.0%}, no worse than HAProxy): {'met' if met else 'NOT met'}.",
        "",
    ]


if __name__ == "__main__":
    print("\n".join(run()))
