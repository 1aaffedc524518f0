"""Distinct descriptors per HSDir (issue 19): how fresh clients spread over the nodes.

On a private Tor network with 10 HSDirs and tor's ring (3 authorities + 7 relays; 2 x 4 store,
2 x 3 fetch HSDirs, as on the live network), clusters of 10, 14 and 24 ``rustbalance run``
daemons (each its own managed tor with tor's default 3 intro points; the launcher of the
multi-node tests, ``testnet.cluster``) publish the master address with ``[publish]
distinct_descriptors = "auto"`` and with ``"off"``. Fresh tor clients (``testnet.
fresh_clients``: NEWNYM before each descriptor fetch, a new circuit per request; tor chooses
the HSDir and the intro point itself) then request the master; each node's target names the
node. Per configuration: requests per node as min / median / max share, next to the exact
shares expected from what the 6 fetch HSDirs serve at that moment (fetched with ``HSFETCH
SERVER=``; client model of docs/distinct-descriptors.md section 1), the nodes reached, and a
chi-square test of the observed counts against the expected shares.

The network has 10 relays, and a descriptor lists at most one intro point per relay (issue
14), so a descriptor holds at most 10 points here (20 on the live network): "off" can list at
most 10 of the nodes, "auto" deals them over 8 descriptors. The peer in the same run is the
"off" row of the same cluster size.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from benchmarks.results import record
from rustbalance.crypto.blinding import blind_public_key
from rustbalance.crypto.time_period import client_fetch_target
from rustbalance.descriptor.distinct import deal_slots
from rustbalance.errors import TorProcessError
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.cluster import LOCALHOST, LaunchedCluster, free_udp_ports, launch_cluster
from rustbalance.testnet.fresh_clients import Samples, sample_fresh_clients
from rustbalance.testnet.network import SESSION_RELAYS, TOR_DEFAULT_HSDIR_PARAMS
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.network import fetch_per_hsdir, read_network_view

SIZES = (10, 14, 24)
MODES = ("auto", "off")
# Fresh clients in parallel (each one descriptor fetch per 10 s) and requests per fetch.
CLIENTS = 8
REQUESTS_PER_FETCH = 2
REQUESTS = 240
SAMPLE_DEADLINE_SECS = 420.0
FORM_TIMEOUT_SECS = 300.0
# Coordination timings: the distribution is measured, not failover, so formation is quick.
HEARTBEAT, TIMEOUT, GRACE = 1.0, 3.0, 3.0


def _names(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


@contextlib.contextmanager
def _cluster(net: PrivateTorNetwork, work: Path, size: int, mode: str) -> Iterator[LaunchedCluster]:
    ports = free_udp_ports(size)

    def coordination(index: int) -> dict[str, object]:
        return {
            "listen": f"{LOCALHOST}:{ports[index]}",
            "peers": [f"{LOCALHOST}:{p}" for i, p in enumerate(ports) if i != index],
            "heartbeat_interval_secs": HEARTBEAT,
            "heartbeat_timeout_secs": TIMEOUT,
            "takeover_grace_secs": GRACE,
        }

    with launch_cluster(
        net,
        work,
        coordination=coordination,
        listen_ports=ports,
        names=_names(size),
        overrides=lambda _index: {"publish": {"distinct_descriptors": mode}},
    ) as cluster:
        yield cluster


def _formed(cluster: LaunchedCluster, since: float) -> bool:
    """Every node live at the publisher, every node has intro points, and a publish finished
    after ``since`` (Unix time) on both descriptors."""
    docs = cluster.statuses()
    if any(doc is None or not doc["intro_points"]["own"] for doc in docs.values()):
        return False
    publishers = [d for d in docs.values() if d is not None and d["role"] == "publisher"]
    if len(publishers) != 1:
        return False
    doc = publishers[0]
    if sum(1 for p in doc["peers"] if p["alive"]) != len(cluster.nodes) - 1:
        return False
    last = doc["last_publish"]
    return all((last.get(p) or 0) > since for p in ("current", "next"))


async def _wait_formed(cluster: LaunchedCluster) -> float:
    started = time.monotonic()
    # A publish that saw every node: after the last node reported its intro points.
    while time.monotonic() - started < FORM_TIMEOUT_SECS:
        docs = cluster.statuses()
        if all(d is not None and d["intro_points"]["own"] for d in docs.values()):
            break
        await asyncio.sleep(1)
    since = time.time() + TIMEOUT
    while time.monotonic() - started < FORM_TIMEOUT_SECS:
        if _formed(cluster, since):
            await asyncio.sleep(5)  # let the publisher's fetch-back and re-sends settle
            return time.monotonic() - started
        await asyncio.sleep(1)
    raise TimeoutError(f"{len(cluster.nodes)} nodes did not form in {FORM_TIMEOUT_SECS:.0f} s")


async def _expected_shares(
    client: TorInstance, cluster: LaunchedCluster
) -> tuple[dict[str, float], int]:
    """Each node's exact share under tor's client choice, from what the 6 fetch HSDirs serve
    now: (1/F) * sum over fetch HSDirs of (its points of the node / its points); and how many
    different intro-point sets they serve."""
    owner = {k: n.name for n in cluster.alive() for k in n.own_auth_keys()}
    async with await ControlConnection.connect(client.control_address) as conn:
        view = await read_network_view(conn)
        c = view.consensus
        tp, srv = client_fetch_target(
            c.valid_after, view.time_params, c.srv_current, c.srv_previous
        )
        target = next(t for t in view.descriptor_targets() if (t.time_period, t.srv) == (tp, srv))
        blinded = blind_public_key(cluster.master.public_key, tp, view.period_length)
        fetch = view.target_fetch_hsdirs(blinded, target)
        fetched = await fetch_per_hsdir(conn, cluster.address, view, fetch, timeout=60)
    shares: dict[str, Fraction] = {n.name: Fraction(0) for n in cluster.nodes}
    sets = set()
    for result in fetched:
        if result.descriptor is None:
            continue  # a client asking this HSDir retries at another one
        keys = [p.auth_key.hex() for p in result.descriptor.intro_points]
        sets.add(frozenset(keys))
        for key in keys:
            shares[owner[key]] += Fraction(1, len(keys))
    answered = sum(1 for r in fetched if r.descriptor is not None)
    return {n: float(s / answered) if answered else 0.0 for n, s in shares.items()}, len(sets)


# The pure deal on small networks: (nodes, relays) with 3 intro points per node on random
# relays, LAYOUTS random layouts each (seeded: the same figures every run).
RELAY_LAYOUTS = ((10, 7), (10, 10), (10, 20), (24, 10), (24, 50))
LAYOUTS = 300


def relay_layout_shares(nodes: int, relays: int, layouts: int, seed: int = 1) -> dict[str, float]:
    """Each node's exact share (6 fetch descriptors of at most 20 points, one point per relay)
    over ``layouts`` random layouts of 3 points per node on ``relays`` relays: the lowest
    share of any node, the mean of each layout's lowest and highest, the highest, and how
    many nodes no fetch descriptor lists."""
    rnd = random.Random(seed)
    lowest, highest, unlisted = [], [], 0
    for _ in range(layouts):
        layout = [[{r} for r in rnd.sample(range(relays), 3)] for _ in range(nodes)]
        chunks = deal_slots([3] * nodes, 8, 6, 20, 0, layout)
        shares = [Fraction(0)] * nodes
        for chunk in chunks[:6]:
            for slot in chunk:
                shares[slot.node] += Fraction(1, 6 * len(chunk))
        lowest.append(float(min(shares)))
        highest.append(float(max(shares)))
        unlisted += sum(1 for share in shares if share == 0)
    return {
        "min": min(lowest),
        "mean_min": statistics.mean(lowest),
        "mean_max": statistics.mean(highest),
        "max": max(highest),
        "unlisted": unlisted,
    }


def _chi_square_p(observed: Mapping[str, int], expected: Mapping[str, float]) -> float | None:
    """p-value of Pearson's chi-square test of ``observed`` against ``expected`` shares, over
    the nodes with a positive expected share (None when fewer than two)."""
    nodes = [n for n, p in expected.items() if p > 0]
    total = sum(observed.get(n, 0) for n in nodes)
    if len(nodes) < 2 or total == 0:
        return None
    weight = sum(expected[n] for n in nodes)
    stat = sum(
        (observed.get(n, 0) - total * expected[n] / weight) ** 2 / (total * expected[n] / weight)
        for n in nodes
    )
    return _chi2_sf(stat, len(nodes) - 1)


def _chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom: the regularized
    upper incomplete gamma function Q(dof/2, x/2) (series below a + 1, continued fraction
    above; Numerical Recipes 6.2)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_prefix = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        for n in range(1, 500):
            term *= z / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-12:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    b = z + 1 - a
    c, d = 1e300, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-12:
            break
    return math.exp(log_prefix) * h


def _row(
    size: int, mode: str, samples: Samples, expected: dict[str, float], sets: int, formed: float
) -> dict[str, Any]:
    names = _names(size)
    answered = samples.answered or 1
    shares = [samples.by_node.get(n, 0) / answered for n in names]
    wanted = [expected.get(n, 0.0) for n in names]
    return {
        "nodes": size,
        "mode": mode,
        "requests": samples.requests,
        "answered": samples.answered,
        "failed": samples.failures,
        "fetches": samples.fetches,
        "formed_secs": round(formed, 1),
        "different_descriptors": sets,
        "counts": {n: samples.by_node.get(n, 0) for n in names},
        "expected": {n: round(p, 5) for n, p in zip(names, wanted, strict=True)},
        "reached": sum(1 for s in shares if s > 0),
        "expected_reached": sum(1 for p in wanted if p > 0),
        "share_min": min(shares),
        "share_median": statistics.median(shares),
        "share_max": max(shares),
        "expected_min": min(wanted),
        "expected_median": statistics.median(wanted),
        "expected_max": max(wanted),
        "chi2_p": _chi_square_p(samples.by_node, expected),
    }


async def _measure(
    net: PrivateTorNetwork, clients: list[TorInstance], work: Path, size: int, mode: str
) -> dict[str, Any]:
    with _cluster(net, work, size, mode) as cluster:
        formed = await _wait_formed(cluster)
        expected, sets = await _expected_shares(clients[0], cluster)
        samples = await sample_fresh_clients(
            clients,
            cluster.address,
            max_requests=REQUESTS,
            deadline_s=SAMPLE_DEADLINE_SECS,
            requests_per_fetch=REQUESTS_PER_FETCH,
        )
        return _row(size, mode, samples, expected, sets, formed)


@contextlib.contextmanager
def _network(base: Path) -> Iterator[tuple[PrivateTorNetwork, list[TorInstance]]]:
    """The test session's network shape (10 HSDirs, tor's ring) and the fresh clients; a
    second try when the first fails to start (a port taken meanwhile on a busy machine)."""
    for attempt in (1, 2):
        net = PrivateTorNetwork(
            base / f"net{attempt}",
            n_relays=SESSION_RELAYS,
            consensus_params=TOR_DEFAULT_HSDIR_PARAMS,
        )
        try:
            net.start()
            clients = [net.add_client(f"fresh{i}") for i in range(CLIENTS)]
        except TorProcessError:
            net.stop()
            if attempt == 2:
                raise
            continue
        try:
            yield net, clients
        finally:
            net.stop()
        return


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _layout_lines(layouts: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "The deal alone (pure, no network) on small networks, where intro points share relays: "
        f"3 points per node on random relays, {LAYOUTS} random layouts per row, each node's "
        "exact share of fresh clients (6 fetch descriptors, one point per relay; "
        "docs/distinct-descriptors.md section 2.1):",
        "",
        "| nodes | relays | fair share | lowest share (any layout) | mean lowest / mean highest "
        "| highest (any layout) | nodes in no fetch descriptor |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, figures in layouts.items():
        nodes, relays = (int(part) for part in key.split("x"))
        lines.append(
            f"| {nodes} | {relays} | {_pct(1 / nodes)} | {_pct(figures['min'])} | "
            f"{_pct(figures['mean_min'])} / {_pct(figures['mean_max'])} | "
            f"{_pct(figures['max'])} | {figures['unlisted']:.0f} of {nodes * LAYOUTS} |"
        )
    return [*lines, ""]


def _lines(rows: list[dict[str, Any]], failed: dict[str, str]) -> list[str]:
    lines = [
        "## Distinct descriptors: requests per node over fresh clients",
        "",
        f"Private Tor network with 10 HSDirs (3 authorities + {SESSION_RELAYS} relays, tor's "
        "ring: 8 store, 6 fetch HSDirs), N `rustbalance run` nodes with 3 intro points each, "
        f"{CLIENTS} fresh tor clients (NEWNYM before each descriptor fetch, "
        f"{REQUESTS_PER_FETCH} requests per fetch on new circuits; tor picks the HSDir and "
        "the intro point). Expected: the exact shares from what the 6 fetch HSDirs served "
        "(tor's client choice). 10 relays allow at most 10 intro points per descriptor "
        "(one per relay), so `off` lists at most 10 nodes here; on the live network the cap "
        "is 20.",
        "",
        "| nodes | distinct_descriptors | requests (failed) | nodes reached (expected) | "
        "share min / median / max | expected min / median / max | different descriptors | "
        "chi-square p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["chi2_p"]
        lines.append(
            f"| {r['nodes']} | {r['mode']} | {r['answered']} ({r['failed']}) | "
            f"{r['reached']} ({r['expected_reached']}) | {_pct(r['share_min'])} / "
            f"{_pct(r['share_median'])} / {_pct(r['share_max'])} | {_pct(r['expected_min'])} / "
            f"{_pct(r['expected_median'])} / {_pct(r['expected_max'])} | "
            f"{r['different_descriptors']} | {'—' if p is None else f'{p:.2f}'} |"
        )
    lines.append("")
    for name, error in failed.items():
        lines += [f"- {name}: FAILED: {error}"]
    if failed:
        lines.append("")
    lines += [
        "Reading: a node's share is its requests over all answered ones, 1/N is the fair "
        "share. The chi-square p-value compares the observed counts with the expected shares "
        "(over the nodes expected to get any): a small p would mean the clients did not "
        "behave as the model says.",
        "",
    ]
    return lines


def run() -> list[str]:
    layouts = {
        f"{nodes}x{relays}": relay_layout_shares(nodes, relays, LAYOUTS)
        for nodes, relays in RELAY_LAYOUTS
    }
    record("distinct", "relay_layouts", layouts)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rb-bench-distinct-") as tmp:
        base = Path(tmp)
        with _network(base) as (net, clients):
            for size in SIZES:
                for mode in MODES:
                    name = f"{size} nodes, {mode}"
                    try:
                        row = asyncio.run(
                            _measure(net, clients, base / f"{size}-{mode}", size, mode)
                        )
                    except Exception as exc:  # one failed configuration; the others run
                        failed[name] = f"{type(exc).__name__}: {exc}"
                        continue
                    rows.append(row)
    record("distinct", "rows", rows)
    record("distinct", "clients", CLIENTS)
    return _lines(rows, failed) + _layout_lines(layouts)
