"""Distinct descriptors per HSDir (issue 19) on the private Tor network, with real tor.

Three plain tor onion services run as Onionbalance instances of one master address with 8
intro points each (24 > 20: more than one descriptor can hold). For the descriptor clients use
now, :func:`~rustbalance.descriptor.distinct.assign_intro_points` gives each of the 8
responsible HSDirs its own set of 20; each set is built into a descriptor signed with the
master key (one revision counter for all), uploaded to its HSDir only, fetched back from that
HSDir (``HSFETCH SERVER=``), verified and compared with what it should hold. Then a fresh tor
client reaches the master address, and the descriptor it chose is one of the fetch HSDirs'.
The session network has 10 HSDirs with tor's ring parameters (2 x 4 to store, 2 x 3 to
fetch), so the 8 store positions are 8 different relays.

A second test shows, with real tor, the client rule that makes every HSDir of one target carry
the same revision counter.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from rustbalance.crypto.blinding import blind_identity, blind_public_key
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.crypto.revision import revision_counter
from rustbalance.crypto.time_period import DescriptorTarget, client_fetch_target
from rustbalance.descriptor.builder import build_descriptor
from rustbalance.descriptor.distinct import assign_intro_points
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.control import ControlConnection, ControlTimeoutError
from rustbalance.tor.control_protocol import HsDescEvent
from rustbalance.tor.network import (
    NetworkView,
    decode_for_view,
    fetch_per_hsdir,
    read_network_view,
    upload_per_hsdir,
)
from tests.descriptor.helpers import make_intro_point
from tests.torhelpers import NamedHTTPServer, get_with_retries, wait_for_descriptor

pytestmark = pytest.mark.tor

INSTANCES = 3
INTRO_POINTS_EACH = 8  # HiddenServiceNumIntroductionPoints: 3 x 8 = 24 > 20


@dataclass
class Cluster:
    master: IdentityKey
    instances: list[TorInstance]
    names: set[str]


@pytest.fixture(scope="module")
def cluster(tor_network: PrivateTorNetwork) -> Iterator[Cluster]:
    master = IdentityKey.generate(secrets.token_bytes)
    servers = [NamedHTTPServer(f"distinct-{i}") for i in range(INSTANCES)]
    instances: list[TorInstance] = []
    try:
        for i, server in enumerate(servers):
            instances.append(
                tor_network.add_onion_service(
                    f"distinct{i}",
                    {80: server.port},
                    [f"HiddenServiceNumIntroductionPoints {INTRO_POINTS_EACH}"],
                    onionbalance_master=master.onion_address,
                )
            )
        yield Cluster(master, instances, {f"hello from distinct-{i}" for i in range(INSTANCES)})
    finally:
        for inst in instances:
            tor_network.remove(inst)
        for server in servers:
            server.close()


async def _instance_points(conn: ControlConnection, cluster: Cluster) -> list[list[IntroPoint]]:
    """Each instance's intro points, once they add up to more than 20 (a service publishes
    before all its intro circuits are up, then again when they are)."""
    deadline = time.monotonic() + 180
    while True:
        view = await read_network_view(conn)
        points = [
            list((await wait_for_descriptor(conn, inst.onion_address or "", view)).intro_points)
            for inst in cluster.instances
        ]
        if sum(map(len, points)) > 20 or time.monotonic() > deadline:
            return points
        await asyncio.sleep(5)


def _client_target(view: NetworkView) -> DescriptorTarget:
    """The one of tor's two descriptors that clients fetch now (tor.md section 3.2)."""
    c = view.consensus
    tp, srv = client_fetch_target(c.valid_after, view.time_params, c.srv_current, c.srv_previous)
    return next(t for t in view.descriptor_targets() if (t.time_period, t.srv) == (tp, srv))


async def test_each_hsdir_serves_its_own_descriptor_and_a_client_gets_through(
    tor_network: PrivateTorNetwork, cluster: Cluster
) -> None:
    address = cluster.master.onion_address
    async with await ControlConnection.connect(tor_network.clients[0].control_address) as conn:
        points = await _instance_points(conn, cluster)
        assert sum(map(len, points)) > 20, [len(p) for p in points]
        for _attempt in range(3):
            view = await read_network_view(conn)
            target = _client_target(view)
            blinded = blind_identity(cluster.master, target.time_period, view.period_length)
            store = view.store_hsdirs(blinded.public_key, target)
            fetch = view.target_fetch_hsdirs(blinded.public_key, target)
            # tor's defaults on 10 HSDirs: 8 different store HSDirs, the 6 fetch ones among
            # them, and the fetch ones are exactly those a client computes for the address.
            assert len(store) == 8 and len(fetch) == 6
            assert set(fetch) <= set(store)
            assert fetch == view.fetch_hsdirs(address)

            now = int(time.time())
            assignment = assign_intro_points(
                points,
                [r.fingerprint for r in fetch],
                [r.fingerprint for r in store],
                max_points=20,
                now=now,
                min_remaining_validity=600,
            )
            assert assignment.distinct
            counter = revision_counter(blinded, target.srv_run_start, now)
            texts = {
                relay.fingerprint: build_descriptor(
                    identity_public_key=cluster.master.public_key,
                    blinded=blinded,
                    intro_points=assignment.per_hsdir[relay.fingerprint],
                    revision_counter=counter,
                    now=now,
                    randbytes=secrets.token_bytes,
                )
                for relay in store
            }
            uploads = await upload_per_hsdir(
                conn, address, [(relay, texts[relay.fingerprint]) for relay in store], timeout=120
            )
            fetched = await fetch_per_hsdir(conn, address, view, store, timeout=120)
            moved = _client_target(await read_network_view(conn)) != target
            if moved and not all(f.ok for f in fetched):
                continue  # a new period or SRV moved the ring meanwhile: again, on the new one
            break
        else:
            pytest.fail("the ring moved under three attempts in a row")

    assert [(u.fingerprint, u.ok, u.reason) for u in uploads] == [
        (r.fingerprint, True, None) for r in store
    ]
    served: dict[str, set[bytes]] = {}
    for result in fetched:
        assert result.descriptor is not None, (result.nickname, result.reason)
        assert result.descriptor.revision_counter == counter
        assert result.descriptor.time_period == target.time_period
        served[result.fingerprint] = {p.auth_key for p in result.descriptor.intro_points}
    wanted = {h: {p.auth_key for p in pts} for h, pts in assignment.per_hsdir.items()}
    # Each HSDir serves exactly the set it was given, and the sets really differ.
    assert served == wanted
    assert len({frozenset(s) for s in served.values()}) > 1
    nodes_per_descriptor = {h: {assignment.owner[k] for k in s} for h, s in served.items()}
    assert all(nodes == set(range(INSTANCES)) for nodes in nodes_per_descriptor.values())

    # A fresh client picks one of the 6 fetch HSDirs (hs_pick_hsdir), gets that one's
    # descriptor and reaches an instance through its intro points.
    visitor = await asyncio.to_thread(tor_network.add_client, "distinctvisitor")
    try:
        assert visitor.socks_address is not None
        body = await get_with_retries(visitor.socks_address, address, isolation="distinct")
        assert body.strip() in cluster.names
        async with await ControlConnection.connect(visitor.control_address) as vconn:
            key = f"hs/client/desc/id/{address.removesuffix('.onion')}"
            text = (await vconn.get_info(key))[key]
            vview = await read_network_view(vconn)
        cached = decode_for_view(text, address, vview)
        got = {p.auth_key for p in cached.intro_points}
        assert got in [wanted[r.fingerprint] for r in fetch]
    finally:
        await asyncio.to_thread(tor_network.remove, visitor)


async def test_a_client_keeps_its_higher_revision_and_takes_an_equal_one(
    tor_network: PrivateTorNetwork,
) -> None:
    """The client-side rule distinct descriptors are numbered for (hs_cache.c
    ``cache_store_as_client``): a fetched descriptor with a *lower* revision counter than the
    cached one is thrown away, an *equal* one replaces it. So all HSDirs of one target must
    hold the same round: a client stuck with a dead descriptor must be able to replace it
    from any other HSDir (docs/distinct-descriptors.md, section 3)."""
    master = IdentityKey.generate(secrets.token_bytes)
    address = master.onion_address
    bare = address.removesuffix(".onion")
    randbytes = secrets.token_bytes
    sets = [
        [make_intro_point(randbytes, index=i + 3 * n, now=int(time.time())) for i in range(3)]
        for n in range(3)
    ]
    async with await ControlConnection.connect(tor_network.clients[0].control_address) as conn:
        view = await read_network_view(conn)
        target = _client_target(view)
        blinded = blind_identity(master, target.time_period, view.period_length)
        first, second = view.store_hsdirs(blinded.public_key, target)[:2]
        now = int(time.time())
        low = revision_counter(blinded, target.srv_run_start, now)
        high = low + 1000

        def build(points: list[IntroPoint], counter: int) -> str:
            return build_descriptor(
                identity_public_key=master.public_key,
                blinded=blinded,
                intro_points=points,
                revision_counter=counter,
                now=now,
                randbytes=randbytes,
            )

        async def cached() -> set[bytes]:
            key = f"hs/client/desc/id/{bare}"
            text = (await conn.get_info(key))[key]
            return {p.auth_key for p in decode_for_view(text, address, view).intro_points}

        async def fetch(relay: HSDirRelay) -> set[bytes]:
            (result,) = await fetch_per_hsdir(conn, address, view, [relay], timeout=120)
            assert result.descriptor is not None, result.reason
            return {p.auth_key for p in result.descriptor.intro_points}

        keys = [{p.auth_key for p in points} for points in sets]
        uploads = await upload_per_hsdir(
            conn, address, [(first, build(sets[0], high)), (second, build(sets[1], low))]
        )
        assert all(u.ok for u in uploads), uploads
        assert await fetch(first) == keys[0]
        assert await cached() == keys[0]
        # The lower one arrives (and is reported), but the client keeps its higher one.
        assert await fetch(second) == keys[1]
        assert await cached() == keys[0]
        # An equal counter replaces it.
        (upload,) = await upload_per_hsdir(conn, address, [(second, build(sets[2], high))])
        assert upload.ok, upload
        assert await fetch(second) == keys[2]
        assert await cached() == keys[2]


async def test_a_tor_client_asks_exactly_the_six_fetch_hsdirs(
    tor_network: PrivateTorNetwork,
) -> None:
    """tor's own HSDir choice (``HSFETCH`` without ``SERVER=`` runs ``pick_hsdir_v3``): each
    fetch picks one HSDir not asked for this address in the requery period (5 s on a test
    network) from the union of the replicas' first 3, and a failed fetch is retried at
    another. For an address nobody publishes, every fetch fails, so within a few seconds
    tor asks every HSDir it would ever ask: exactly the 6 fetch HSDirs, never the 2 spares
    of the 8 store HSDirs, never another relay (docs/distinct-descriptors.md, section 1)."""
    fresh = await asyncio.to_thread(tor_network.add_client, "distinctpicker")
    try:
        async with await ControlConnection.connect(fresh.control_address) as conn:
            for _attempt in range(3):
                bare = IdentityKey.generate(secrets.token_bytes).onion_address[:-6]
                view = await read_network_view(conn)
                target = _client_target(view)
                blinded = blind_public_key(
                    decode_onion_address(bare), target.time_period, view.period_length
                )
                fetch = {r.fingerprint for r in view.target_fetch_hsdirs(blinded, target)}
                store = {r.fingerprint for r in view.store_hsdirs(blinded, target)}
                assert len(fetch) == 6 and len(store) == 8 and fetch < store
                asked = await _hsdirs_asked(conn, bare, want=len(fetch))
                if _client_target(await read_network_view(conn)) == target:
                    assert asked == fetch
                    return
                # A new period or SRV moved the ring during the fetches: a new address.
    finally:
        await asyncio.to_thread(tor_network.remove, fresh)
    pytest.fail("the ring moved under three attempts in a row")


async def _hsdirs_asked(conn: ControlConnection, bare: str, *, want: int) -> set[str]:
    """Six quick HSFETCHes without SERVER=; the HSDirs tor asks until ``want`` were seen
    (at most 30 s), and 5 s more to catch any further one."""
    asked: set[str] = set()
    sub = await conn.subscribe("HS_DESC")
    try:
        for _ in range(6):
            await conn.hs_fetch(bare)
        deadline = time.monotonic() + 30
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = HsDescEvent.from_event(await sub.get(remaining))
            except ControlTimeoutError:
                break
            if event.action == "REQUESTED" and event.address == bare:
                assert event.hsdir_fingerprint is not None
                if event.hsdir_fingerprint not in asked and len(asked) + 1 == want:
                    deadline = min(deadline, time.monotonic() + 5)
                asked.add(event.hsdir_fingerprint)
    finally:
        await sub.aclose()
    return asked
