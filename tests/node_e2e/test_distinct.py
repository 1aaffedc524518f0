"""Distinct descriptors per HSDir, end to end: 10 nodes x 3 intro points on the private network.

Ten ``rustbalance run`` daemons (one master key, each its own managed tor with tor's default 3
intro points, UDP coordination with short timings: heartbeat 1 s, timeout 3 s) on the
session network (3 authorities + 7 relays = 10 HSDirs, tor's ring: 8 store, 6 fetch). 30 intro
points do not fit one descriptor (20), so the publisher (``[publish] distinct_descriptors``
is "auto" by default) deals them to the 8 responsible HSDirs of each descriptor, one
descriptor each (docs/distinct-descriptors.md). The session network has only 10 relays, and a
descriptor lists at most one intro point per relay (descriptor/merge.py, issue 14), so each
descriptor holds at most 10 points here (20 on a large network).

Checked, in one cluster (the launch is what costs):

1. the publisher's own fetch-back verified all 8 HSDirs of the descriptor clients use;
2. the test's own tor client fetches from each of the 8 HSDirs with ``HSFETCH SERVER=``: each
   serves a valid descriptor signed with the master key, all with the round's one revision
   counter, each exactly the set dealt to that HSDir (the publisher's status), one intro
   point per relay, and together the 6 fetch HSDirs list every node;
3. fresh clients (NEWNYM before each descriptor fetch, a new isolation per request: tor's
   own HSDir and intro-point choice) reach every one of the 10 nodes;
4. a node killed with SIGKILL leaves every HSDir's descriptor: detected within the heartbeat
   timeout, then one new round to all 8 HSDirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rustbalance.crypto.blinding import blind_public_key
from rustbalance.crypto.time_period import DescriptorTarget, client_fetch_target
from rustbalance.descriptor.link_specifiers import LS_LEGACY_ID
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.cluster import (
    LOCALHOST,
    LaunchedCluster,
    free_udp_ports,
    launch_cluster,
)
from rustbalance.testnet.fresh_clients import sample_fresh_clients
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.network import HsDirFetch, NetworkView, fetch_per_hsdir, read_network_view
from tests.node_e2e import NODE_PUBLISH_TIMEOUT
from tests.node_e2e.cluster_helpers import wait_for

pytestmark = pytest.mark.tor

log = logging.getLogger(__name__)

NAMES = tuple(f"node-{c}" for c in "abcdefghij")
HEARTBEAT, TIMEOUT, GRACE = 1.0, 3.0, 3.0
# Fresh clients besides the session's client, each one descriptor fetch per 10 s (NEWNYM).
FRESH_CLIENTS = 6
MAX_FRESH_REQUESTS = 150


@pytest.fixture(scope="module")
def cluster(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LaunchedCluster]:
    ports = free_udp_ports(len(NAMES))

    def coordination(index: int) -> dict[str, object]:
        return {
            "listen": f"{LOCALHOST}:{ports[index]}",
            "peers": [f"{LOCALHOST}:{p}" for i, p in enumerate(ports) if i != index],
            "heartbeat_interval_secs": HEARTBEAT,
            "heartbeat_timeout_secs": TIMEOUT,
            "takeover_grace_secs": GRACE,
        }

    work = tmp_path_factory.mktemp("distinct")
    with launch_cluster(
        tor_network, work, coordination=coordination, listen_ports=ports, names=NAMES
    ) as launched:
        yield launched


def client_target(view: NetworkView) -> DescriptorTarget:
    c = view.consensus
    tp, srv = client_fetch_target(c.valid_after, view.time_params, c.srv_current, c.srv_previous)
    return next(t for t in view.descriptor_targets() if (t.time_period, t.srv) == (tp, srv))


def own_keys(cluster: LaunchedCluster) -> dict[str, set[str]]:
    return {n.name: set(n.own_auth_keys()) for n in cluster.alive()}


def verified_round(doc: dict[str, Any] | None, alive: int) -> dict[str, Any] | None:
    """The publisher's round for the clients' descriptor once it is published to every
    HSDir and verified on every one, with ``alive`` nodes live; else None."""
    if doc is None or doc["role"] != "publisher":
        return None
    if sum(1 for p in doc["peers"] if p["alive"]) != alive - 1:
        return None
    distinct = doc.get("distinct_descriptors") or {}
    if not distinct.get("active"):
        return None
    for period in distinct["periods"].values():
        hsdirs = period["hsdirs"]
        if len(hsdirs) == 8 and all(h["verified"] == "ok" for h in hsdirs):
            return dict(period)
    return None


async def fetch_each(
    client: TorInstance, cluster: LaunchedCluster
) -> tuple[list[HSDirRelay], list[HSDirRelay], list[HsDirFetch]]:
    """(store HSDirs, fetch HSDirs, what each store HSDir serves) of the clients' descriptor."""
    async with await ControlConnection.connect(client.control_address) as conn:
        view = await read_network_view(conn)
        target = client_target(view)
        key = cluster.master.public_key
        blinded = blind_public_key(key, target.time_period, view.period_length)
        store = view.store_hsdirs(blinded, target)
        fetch = view.target_fetch_hsdirs(blinded, target)
        fetched = await fetch_per_hsdir(conn, cluster.address, view, store, timeout=60)
    return store, fetch, fetched


async def test_ten_nodes_each_hsdir_serves_its_own_descriptor_and_every_node_gets_clients(
    tor_network: PrivateTorNetwork, cluster: LaunchedCluster
) -> None:
    publisher = cluster.node("node-a")  # priority 10: the best-ranked node publishes
    address = cluster.address
    started = time.monotonic()

    def listed_everyone() -> dict[str, Any] | None:
        period = verified_round(publisher.try_status(), len(NAMES))
        if period is None:
            return None
        listed = {k for h in period["hsdirs"] for k in h["auth_keys"]}
        keys = own_keys(cluster)
        return period if all(keys[n] & listed for n in NAMES) else None

    await asyncio.to_thread(
        wait_for,
        lambda: listed_everyone() is not None,
        2 * NODE_PUBLISH_TIMEOUT,
        "10 nodes, a distinct round verified on all 8 HSDirs listing every node",
        1.0,
    )
    formed_after = time.monotonic() - started

    # -- 2. what each HSDir serves, fetched by the test's own client ---------------------------
    period: dict[str, Any] = {}
    for _attempt in range(3):
        period = listed_everyone() or {}
        assert period
        store, fetch, fetched = await fetch_each(tor_network.clients[0], cluster)
        dealt = {h["hsdir"]: set(h["auth_keys"]) for h in period["hsdirs"]}
        served = {
            f.fingerprint: {p.auth_key.hex() for p in f.descriptor.intro_points}
            for f in fetched
            if f.descriptor is not None
        }
        if served == dealt:
            break
        await asyncio.sleep(5)  # a new round (an intro point changed) or a new period: again
    assert [f.reason for f in fetched] == [None] * 8
    assert {r.fingerprint for r in store} == set(dealt)
    assert served == dealt
    counters = {f.descriptor.revision_counter for f in fetched if f.descriptor is not None}
    assert counters == {period["revision"]}
    for result in fetched:
        assert result.descriptor is not None
        relays = [
            spec.data
            for p in result.descriptor.intro_points
            for spec in p.link_specifiers
            if spec.type == LS_LEGACY_ID
        ]
        assert len(relays) == len(set(relays)) <= 10  # one point per relay, 10 relays
    keys = own_keys(cluster)
    owner = {k: node for node, ks in keys.items() for k in ks}
    by_fetch_hsdir = [{owner[k] for k in served[r.fingerprint]} for r in fetch]
    assert set().union(*by_fetch_hsdir) == set(NAMES)
    shares = period["expected_share"]
    log.info(
        "formed in %.1f s; %d different descriptors; nodes per fetch HSDir %s; expected shares "
        "%.3f-%.3f",
        formed_after,
        period["descriptors"],
        [len(n) for n in by_fetch_hsdir],
        min(shares.values()),
        max(shares.values()),
    )

    # -- 3. fresh clients reach every node -----------------------------------------------------
    clients = await asyncio.gather(
        *(
            asyncio.to_thread(tor_network.add_client, f"distinctfresh{i}")
            for i in range(FRESH_CLIENTS)
        )
    )
    try:
        samples = await sample_fresh_clients(
            clients,
            address,
            max_requests=MAX_FRESH_REQUESTS,
            deadline_s=180,
            done=lambda s: set(s.by_node) >= set(NAMES),
            requests_per_fetch=2,
        )
    finally:
        for client in clients:
            await asyncio.to_thread(tor_network.remove, client)
    log.info(
        "fresh clients: %s, %d failed, %d fetches",
        dict(samples.by_node),
        samples.failures,
        samples.fetches,
    )
    assert set(samples.by_node) == set(NAMES), samples

    # -- 4. a killed node leaves every descriptor ----------------------------------------------
    victim = cluster.node("node-e")
    dead = set(victim.own_auth_keys())
    assert dead
    victim.kill()
    killed_at = time.monotonic()

    def published_without() -> bool:
        doc = publisher.try_status()
        return doc is not None and not dead & set(doc["intro_points"]["published_auth_keys"])

    republished = await asyncio.to_thread(
        wait_for, published_without, TIMEOUT + 60, "a round without the killed node", 0.2
    )
    await asyncio.to_thread(
        wait_for,
        lambda: verified_round(publisher.try_status(), len(NAMES) - 1) is not None,
        60,
        "the new round verified on every HSDir",
        0.5,
    )
    _, _, fetched = await fetch_each(tor_network.clients[0], cluster)
    gone_after = time.monotonic() - killed_at
    for result in fetched:
        assert result.descriptor is not None, result.reason
        listed = {p.auth_key.hex() for p in result.descriptor.intro_points}
        assert listed and not listed & dead
    log.info(
        "killed node out of every descriptor: published after %.1f s, all 8 HSDirs "
        "checked after %.1f s",
        republished,
        gone_after,
    )
    # Detection takes the heartbeat timeout; the new round is one upload (the test's
    # UPLOAD_TIMEOUT_SECS bounds its stragglers).
    assert republished < TIMEOUT + 30
