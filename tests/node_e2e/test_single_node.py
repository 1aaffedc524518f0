"""The single-node daemon end to end on the private Tor network (issue "Node daemon").

One node runs for the module: a Tor client reaches the target through the master address,
``rustbalance status`` shows the node's live state, ``pidof rustbalance`` finds it, the
Phase 1.5 log line is there, and SIGTERM ends it with exit code 0. Start-up errors (bad config,
wrong key) exit 2 with one message, without touching tor. The demo runs end to end too.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.testnet import PrivateTorNetwork, TorInstance
from rustbalance.testnet.node import write_node_config
from rustbalance.tor.process import pid_is_alive
from tests.node_e2e import RunningNode, running_node
from tests.torhelpers import get_with_retries


@pytest.fixture(scope="module")
def node(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    with running_node(tor_network, tmp_path_factory.mktemp("node")) as running:
        running.wait_published()
        yield running


@pytest.mark.tor
async def test_master_address_serves_the_target(
    node: RunningNode, tor_client_factory: Callable[[], TorInstance]
) -> None:
    visitor = await asyncio.to_thread(tor_client_factory)
    assert visitor.socks_address is not None
    body = await get_with_retries(visitor.socks_address, node.address, isolation="single")
    assert body.strip() == "hello from node-a-target"
    assert node.process.started_at is not None
    print(f"master address answered {time.monotonic() - node.process.started_at:.1f} s after start")


@pytest.mark.tor
def test_status_shows_a_publishing_single_node(node: RunningNode) -> None:
    # One request straight to the node's proxy, so the counters below do not depend on which
    # other tests ran first.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.proxy_port}/", timeout=30) as reply:
        assert reply.status == 200
    doc = node.process.status()
    assert doc["node_id"] == "node-a"
    assert doc["mode"] == "single"
    assert doc["role"] == "publisher"
    assert doc["master_onion_address"] == node.address
    assert doc["tor"]["running"] is True
    assert doc["tor"]["restarts"] == 0
    assert doc["intro_points"]["own"] > 0
    assert 0 < doc["intro_points"]["published"] <= doc["intro_points"]["own"]
    publish = doc["last_publish"]
    assert isinstance(publish["current"], float | int)
    assert isinstance(publish["next"], float | int)
    assert publish["current"] <= time.time()
    for period in ("current", "next"):
        result = publish["results"][period]
        assert result["ok"] is True
        assert result["hsdirs_ok"] >= 1
        assert all(h["hsdir"].startswith("$") for h in result["hsdirs"])
    assert doc["peers"] == []
    assert doc["proxy"]["total"] >= 1
    assert doc["ready"] is True


@pytest.mark.tor
def test_pidof_finds_the_daemon(node: RunningNode) -> None:
    found = subprocess.run(["pidof", "rustbalance"], capture_output=True, text=True, check=False)
    assert str(node.process.pid) in found.stdout.split()
    assert Path(f"/proc/{node.process.pid}/comm").read_text().strip() == "rustbalance"


@pytest.mark.tor
def test_first_publish_waits_only_for_intro_points(node: RunningNode) -> None:
    log = node.process.log_text()
    assert "Publish loop waiting for intro points (max 120 seconds)" in log
    assert "Intro points available after" in log
    assert "Status endpoint listening on" in log
    # READY=1 means serving (issue 17): after tor's bootstrap, once tor built its descriptor
    # with intro points, the proxy listening; not after the first upload.
    ready = log.index("Node ready: proxy listening on 127.0.0.1:")
    assert log.index("Proxy listening on") < log.index(" ready after ") < ready  # tor's 100 %
    assert log.index("Own intro points changed") < ready
    assert re.search(
        r"Node ready: proxy listening on 127\.0\.0\.1:\d+, tor bootstrapped, \d+ intro points", log
    )
    # The status socket is private to the daemon's user.
    sock = node.work_dir / "state" / "status.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    hs_dir = node.work_dir / "tor" / "hidden_service"
    assert hs_dir.stat().st_mode & 0o777 == 0o700
    assert (hs_dir / "ob_config").read_text() == f"MasterOnionAddress {node.address}\n"
    assert (hs_dir / "hostname").read_text().strip() == node.address


@pytest.mark.tor
def test_sigterm_stops_cleanly(node: RunningNode) -> None:
    tor_pid = node.tor_pid()
    assert tor_pid is not None and pid_is_alive(tor_pid)
    started = time.monotonic()
    code = node.process.stop()
    took = time.monotonic() - started
    assert code == 0, node.process.log_text()[-3000:]
    log = node.process.log_text()
    assert "Received SIGTERM" in log
    assert "Shutdown complete" in log
    assert not pid_is_alive(tor_pid)
    assert not (node.work_dir / "state" / "status.sock").exists()
    print(f"SIGTERM to exit: {took:.1f} s")


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$")


def _scrape(port: int) -> dict[str, float]:
    """``GET /metrics``: sample (name with labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m is not None:
            samples[m.group(1)] = float(m.group(2))
    return samples


@pytest.mark.tor
def test_metrics_endpoint_and_health_probe(tor_network: PrivateTorNetwork, tmp_path: Path) -> None:
    """``[metrics]`` on a free port and ``[health]`` probing every 2 s: /metrics shows the
    publisher, tor, its intro points and a healthy target; status shows the probe's state."""
    port = _free_tcp_port()
    overrides: dict[str, dict[str, object]] = {
        "metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "health": {
            "http_probe_enabled": True,
            "http_probe_interval_secs": 2,
            "http_probe_timeout_secs": 1,
        },
    }
    with running_node(tor_network, tmp_path / "metrics-node", overrides=overrides) as node:
        node.wait_line(r"Metrics served on http://127\.0\.0\.1:\d+/metrics", 30)
        node.wait_published(timeout=75)
        deadline = time.monotonic() + 15
        while True:
            samples = _scrape(port)
            doc = node.process.status()
            published = samples.get('rustbalance_publishes_total{period="current",result="ok"}')
            if published and doc["target"]["probes"] >= 1:
                break
            assert time.monotonic() < deadline, (samples, doc.get("target"))
            time.sleep(0.5)
        assert samples["rustbalance_is_publisher"] == 1
        assert samples["rustbalance_tor_up"] == 1
        assert samples['rustbalance_intro_points{source="own"}'] > 0
        assert samples['rustbalance_intro_points{source="merged"}'] > 0
        assert samples["rustbalance_target_up"] == 1
        assert samples["rustbalance_tor_restarts_total"] == 0
        assert samples['rustbalance_hsdir_uploads_total{result="ok"}'] >= 1
        assert 0 <= samples["rustbalance_descriptor_age_seconds"] < 120
        # What RustBalanceDescriptorStale reads (issue 18): the time of the last accepted
        # upload of each descriptor, 0 only before the first one.
        for period in ("current", "next"):
            published_at = samples[
                f'rustbalance_last_publish_timestamp_seconds{{period="{period}"}}'
            ]
            assert time.time() - 120 < published_at <= time.time(), (period, published_at)
        # A single node has no peers and no backends: no series at all (nothing to alert on).
        assert not [name for name in samples if name.startswith("rustbalance_peer_up")]
        assert "rustbalance_proxy_connections_total" in samples
        assert doc["target"]["healthy"] is True
        assert doc["target"]["last_probe"] == "status 200"
    assert "Target health probe: GET / every 2 s (first in 2 s)" in node.process.log_text()


# --------------------------------------------------------------------------- start-up errors


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rustbalance.cli.main", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(tmp_path: Path, key: IdentityKey, **overrides: dict[str, object]) -> Path:
    key_file = tmp_path / "master.key"
    if not key_file.exists():
        write_seed_key_file(key, key_file)
    return write_node_config(
        tmp_path / "config.toml",
        node_id="node-x",
        key_file=key_file,
        master_address=key.onion_address,
        target="127.0.0.1:9",
        work_dir=tmp_path,
        overrides=overrides,
    )


def test_invalid_config_exits_2_with_one_message(tmp_path: Path) -> None:
    master = IdentityKey.generate(secrets.token_bytes)
    config = _config(tmp_path, master, node={"prio": 3})
    result = _run(config)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    assert "node.prio: unknown key" in lines[0]
    assert not (tmp_path / "tor").exists()  # nothing was started


def test_wrong_master_key_exits_2(tmp_path: Path) -> None:
    master = IdentityKey.generate(secrets.token_bytes)
    other = IdentityKey.generate(secrets.token_bytes)
    config = _config(tmp_path, master, master={"onion_address": other.onion_address})
    result = _run(config)
    assert result.returncode == 2
    assert "wrong key file?" in result.stderr
    assert master.onion_address in result.stderr


def test_readable_master_key_is_refused(tmp_path: Path) -> None:
    master = IdentityKey.generate(secrets.token_bytes)
    config = _config(tmp_path, master)
    os.chmod(tmp_path / "master.key", 0o644)
    result = _run(config)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr


def test_malformed_master_key_exits_2(tmp_path: Path) -> None:
    master = IdentityKey.generate(secrets.token_bytes)
    config = _config(tmp_path, master)
    (tmp_path / "master.key").write_bytes(b"not a key")
    result = _run(config)
    assert result.returncode == 2
    assert "master key" in result.stderr


# --------------------------------------------------------------------------- the demo


@pytest.mark.tor
def test_demo_runs_two_rounds() -> None:
    """``make demo`` non-interactively: its own network, node and visitor; exit 0 after two
    answered fetches."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rustbalance.demo", "--rounds", "2", "--interval", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(": HTTP 200 in") >= 2
    assert "node stopped (exit code 0)" in result.stdout
    print(f"demo took {time.monotonic() - started:.1f} s")
