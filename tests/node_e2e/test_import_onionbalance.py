"""Migration from Onionbalance, end to end on the private Tor network.

The real ``onionbalance-config`` (PyPI onionbalance 0.2.4, own venv) makes a master key and a
config for two instances; two plain tor onion services become those instances
(``HiddenServiceOnionbalanceInstance 1`` + ``ob_config``, each with its own target). First the
real Onionbalance publishes the master: a client reaches both instances through it. Then
Onionbalance is stopped, ``rustbalance import-onionbalance`` turns its config.yaml into ours,
``rustbalance run`` starts on it, and the client reaches the same two instances through the
same master address (and this node's own target).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from rustbalance.crypto.keys import load_identity_key
from rustbalance.node.status import read_status
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.node import NodeProcess
from tests.cli.onionbalance_tool import fill_instances, generate_config, onionbalance_bin
from tests.node_e2e.cluster_helpers import wait_for
from tests.node_e2e.instance_helpers import master_intro_keys, names_served
from tests.torhelpers import NamedHTTPServer


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start_onionbalance(config_yaml: Path, control_port: int) -> subprocess.Popen[bytes]:
    """The real Onionbalance on a client tor of the network (--is-testnet, as the bench)."""
    with (config_yaml.parent / "onionbalance.log").open("wb") as log:
        return subprocess.Popen(
            [str(onionbalance_bin("onionbalance")), "--is-testnet", "-i", "127.0.0.1",
             "-p", str(control_port), "-c", str(config_yaml), "-v", "info"],
            stdout=log, stderr=subprocess.STDOUT, cwd=config_yaml.parent,
        )  # fmt: skip


def _import(
    config_yaml: Path, etc: Path, state: Path, target_port: int
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "import-onionbalance", str(config_yaml),
         "--config-dir", str(etc), "--tor-mode", "managed", "--state-dir", str(state),
         "--node-id", "ob-host", "--target", f"127.0.0.1:{target_port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.tor
async def test_the_imported_config_serves_the_master_through_onionbalances_instances(
    tor_network: PrivateTorNetwork, tmp_path: Path
) -> None:
    net = tor_network
    client = net.clients[0]
    assert client.socks_address is not None
    ob_dir = tmp_path / "onionbalance"
    config_yaml, (key,) = await asyncio.to_thread(generate_config, ob_dir, 2)
    master = load_identity_key(key).onion_address
    names = {"ob-instance-1", "ob-instance-2"}
    servers = [NamedHTTPServer(name) for name in sorted(names)]
    node_target = NamedHTTPServer("rustbalance-node")
    instances: list[TorInstance] = []
    onionbalance: subprocess.Popen[bytes] | None = None
    node: NodeProcess | None = None
    try:
        for i, server in enumerate(servers, 1):
            instances.append(
                await asyncio.to_thread(
                    net.add_onion_service, f"obinst{i}", {80: server.port},
                    onionbalance_master=master,
                )
            )  # fmt: skip
        addresses = [str(instance.onion_address) for instance in instances]
        fill_instances(config_yaml, addresses)

        # Before: the real Onionbalance serves the master through its instances.
        onionbalance = await asyncio.to_thread(
            _start_onionbalance, config_yaml, client.control_port
        )
        before = await names_served(client.socks_address, master, names, tag="onionbalance")
        _stop(onionbalance)
        onionbalance = None

        # The migration: one command, then our daemon on its output.
        etc = tmp_path / "etc"
        imported = await asyncio.to_thread(
            _import, config_yaml, etc, tmp_path / "state", node_target.port
        )
        assert imported.returncode == 0, imported.stderr
        config_path = etc / "config.toml"
        config = tomllib.loads(config_path.read_text())
        assert config["master"]["onion_address"] == master
        assert config["master"]["backends"] == addresses
        # What a test host needs on top (not part of the import): the private network's
        # torrc lines, and free ports instead of the defaults.
        config["tor"]["extra_torrc"] = net.client_torrc_lines()
        config["proxy"]["listen_port"] = 0
        config["metrics"] = {"enabled": False}
        config["master"]["backend_poll_secs"] = 10
        config_path.write_text(tomli_w.dumps(config))
        node = NodeProcess(config_path, tmp_path / "node.log")
        node.start()
        # RustBalance's descriptor replaces Onionbalance's on the HSDirs: what a client
        # fetches now holds this node's own intro points and both instances'.
        status_socket = tmp_path / "state" / "status.sock"
        wanted: set[bytes] = set()

        def merged() -> bool:
            try:
                doc = read_status(status_socket)
            except Exception:
                return False
            own = set(doc["intro_points"]["own_auth_keys"])
            entries = [doc.get("backends", {}).get(a) for a in addresses]
            if not own or not all(e and e["up"] and e["auth_keys"] for e in entries):
                return False
            wanted.clear()
            wanted.update(bytes.fromhex(k) for k in own)
            for entry in entries:
                assert entry is not None
                wanted.add(bytes.fromhex(entry["auth_keys"][0]))
            return wanted <= {bytes.fromhex(k) for k in doc["intro_points"]["published_auth_keys"]}

        await asyncio.to_thread(wait_for, merged, 300, "both instances merged and published")
        deadline = time.monotonic() + 180
        fetched: set[bytes] = set()
        while time.monotonic() < deadline and not wanted <= fetched:
            # HSFETCH through the client: it also refreshes the client's cached descriptor.
            fetched = await master_intro_keys(client, master)
            if not wanted <= fetched:
                await asyncio.sleep(5)
        assert wanted <= fetched, "the HSDirs do not serve RustBalance's merged descriptor"
        after = await names_served(
            client.socks_address, master, names | {"rustbalance-node"}, tag="rustbalance"
        )
        print(f"\nOnionbalance answered from {before}; RustBalance from {after}")
    finally:
        if onionbalance is not None:
            _stop(onionbalance)
        if node is not None:
            node.stop()
        for instance in instances:
            net.remove(instance)
        for server in [*servers, node_target]:
            server.close()
