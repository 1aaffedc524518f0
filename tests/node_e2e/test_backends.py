"""Plain tor backends (``master.backends``), end to end on the private Tor network.

A plain tor onion service, run as an Onionbalance instance of the master address
(``HiddenServiceOnionbalanceInstance 1`` + ``ob_config``, no RustBalance on it), is listed in
one RustBalance node's ``master.backends``. The node HSFETCHes the backend's descriptor, merges
its intro points into the master descriptor and publishes it: a client fetching the master
descriptor from the HSDirs finds the backend's intro points there, and over isolated circuits
a client reaches both the node's target and the backend's through the master address. Then
the backend's tor is killed (SIGTERM by PID): the HSDirs keep serving its descriptor, but the
node's reachability check fails, the backend drops out and the node republishes without its
intro points, while the master keeps answering.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from rustbalance.crypto.keys import IdentityKey
from rustbalance.node.status import read_status
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from tests.node_e2e import running_node
from tests.node_e2e.cluster_helpers import wait_for
from tests.node_e2e.instance_helpers import master_intro_keys, names_served
from tests.torhelpers import NamedHTTPServer

POLL_SECS = 10


def _status(work_dir: Path) -> dict[str, Any] | None:
    try:
        return read_status(work_dir / "state" / "status.sock")
    except Exception:
        return None


@pytest.mark.tor
async def test_plain_backend_is_merged_then_dropped_when_its_tor_dies(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    net = tor_network
    master = IdentityKey.generate(secrets.token_bytes)
    server = NamedHTTPServer("backend-target")
    backend: TorInstance | None = None
    try:
        backend = await asyncio.to_thread(
            net.add_onion_service,
            "rbplainbackend",
            {80: server.port},
            onionbalance_master=master.onion_address,
        )
        address = backend.onion_address
        assert address is not None
        overrides: dict[str, dict[str, object]] = {
            "master": {
                "backends": [address],
                "backend_poll_secs": POLL_SECS,
                "backend_max_age_secs": 120,
            },
            "publish": {"upload_timeout_secs": 15},
        }
        with running_node(net, tmp_path / "node", master=master, overrides=overrides) as node:
            work = node.work_dir
            backend_keys: set[str] = set()

            def merged() -> bool:
                doc = _status(work)
                if doc is None:
                    return False
                entry = doc.get("backends", {}).get(address)
                published = set(doc["intro_points"]["published_auth_keys"])
                own = set(doc["intro_points"]["own_auth_keys"])
                if not entry or not entry["up"] or not own:
                    return False
                # One point per intro relay (descriptor/merge.py): the node's and the backend's
                # points share the few relays of the test network, so each has some published.
                backend_keys.clear()
                backend_keys.update(set(entry["auth_keys"]) & published)
                return (
                    bool(backend_keys)
                    and bool(own & published)
                    and published <= own | set(entry["auth_keys"])
                )

            took = await asyncio.to_thread(
                wait_for, merged, 240, "the backend's intro points in a published descriptor"
            )
            # Shared mode with backends: tor's own master descriptor would lack them.
            assert "PublishHidServDescriptors 0" in (work / "tor" / "torrc").read_text()

            # What a client gets from the HSDirs holds the backend's intro points.
            client = net.clients[0]
            wanted = {bytes.fromhex(k) for k in backend_keys}
            deadline = time.monotonic() + 90
            fetched: set[bytes] = set()
            while time.monotonic() < deadline and not wanted <= fetched:
                fetched = await master_intro_keys(client, master.onion_address)
                if not wanted <= fetched:
                    await asyncio.sleep(3)
            assert wanted <= fetched, "the master descriptor on the HSDirs lacks the backend"

            # Through the master address, isolated circuits reach the node and the backend.
            assert client.socks_address is not None
            seen = await names_served(
                client.socks_address,
                master.onion_address,
                {"node-a-target", "backend-target"},
                tag="backends-up",
            )
            print(f"\nbackend merged {took:.0f} s after start; answers {seen}")

            # Kill the backend's tor. HSDirs still serve its descriptor; the reachability
            # check notices, and the node republishes without the backend's intro points.
            killed_at = time.time()
            await asyncio.to_thread(net.remove, backend)
            backend = None
            await asyncio.to_thread(
                node.wait_line, rf"Backend {address} is down", 240, after=killed_at
            )

            def dropped() -> bool:
                doc = _status(work)
                if doc is None:
                    return False
                published = set(doc["intro_points"]["published_auth_keys"])
                return bool(published) and not published & {k.hex() for k in wanted}

            await asyncio.to_thread(wait_for, dropped, 120, "a descriptor without the backend")
            drop_secs = time.time() - killed_at
            deadline = time.monotonic() + 90
            fetched = wanted
            while time.monotonic() < deadline and (not fetched or fetched & wanted):
                fetched = await master_intro_keys(client, master.onion_address)
                if not fetched or fetched & wanted:
                    await asyncio.sleep(3)
            assert fetched and not fetched & wanted, "HSDirs still serve the backend's points"
            assert node.lines(rf"Backend {address} is down", after=killed_at)
            # Logged once per state change, not on every poll.
            assert len(node.lines(r"Backend .* is down")) == 1
            # The master keeps answering (from the node) without the backend.
            await names_served(
                client.socks_address, master.onion_address, {"node-a-target"}, tag="backends-down"
            )
            print(f"backend dropped from the published descriptor {drop_secs:.0f} s after kill")
    finally:
        if backend is not None:
            net.remove(backend)
        server.close()
