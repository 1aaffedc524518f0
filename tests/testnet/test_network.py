"""The private Tor network on 127.0.0.1 (rustbalance.testnet) as a user of it sees it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from rustbalance.errors import TorProcessError
from rustbalance.testnet import AUTHORITY_COUNT, PrivateTorNetwork, TorInstance
from rustbalance.testnet.network import Role
from rustbalance.tor.process import pid_is_alive

_attempts = itertools.count()


async def http_get_via_socks(client: TorInstance, onion: str, limit: float = 30.0) -> str:
    """GET / from ``onion`` through the client's SocksPort; the onion name is resolved by tor."""
    assert client.socks_address is not None
    host, port = client.socks_address
    # A new SOCKS user name per attempt gives a fresh circuit (IsolateSOCKSAuth, tor.md §13.9).
    proxy = Proxy(
        ProxyType.SOCKS5, host, port, username=f"u{next(_attempts)}", password="x", rdns=True
    )
    sock = await proxy.connect(dest_host=onion, dest_port=80, timeout=limit)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET / HTTP/1.0\r\nHost: {onion}\r\n\r\n".encode())
        await writer.drain()
        # HTTP/1.0: the server closes after the body, so read to EOF (bounded by ``limit``).
        data = await asyncio.wait_for(reader.read(), timeout=limit)
    finally:
        writer.close()
    return data.decode(errors="replace")


async def fetch_with_retry(client: TorInstance, onion: str, deadline_s: float) -> str:
    """Retry (bounded) while the descriptor is not yet on the HSDirs; return the response."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return await http_get_via_socks(client, onion)
        except (ProxyError, ProxyTimeoutError, OSError, TimeoutError) as exc:
            last_error = exc
            await asyncio.sleep(1.0)
    raise AssertionError(f"{onion} not reachable within {deadline_s:.0f} s: {last_error!r}")


@pytest.mark.tor
def test_network_comes_up_within_budget(tor_network: PrivateTorNetwork) -> None:
    assert tor_network.ready_seconds is not None and tor_network.ready_seconds < 120
    for inst in tor_network.instances.values():
        assert inst.is_running(), f"{inst.name} is not running"
    for client in tor_network.clients:
        assert client.bootstrap_progress() == 100
        assert client.control_cookie_path.stat().st_size == 32


@pytest.mark.tor
def test_consensus_has_every_relay_as_hsdir_and_the_params(
    tor_network: PrivateTorNetwork,
) -> None:
    summary = tor_network.consensus_summary()
    assert summary is not None
    assert summary.relay_count == AUTHORITY_COUNT + tor_network.n_relays
    assert summary.hsdir_count == AUTHORITY_COUNT + tor_network.n_relays
    # tor's defaults on 10 HSDirs: 2 x 4 store positions are a strict subset of the ring.
    assert summary.hsdir_count >= 10
    assert summary.params["hsdir_n_replicas"] == 2
    assert summary.params["hsdir_spread_store"] == 4
    assert summary.params["hsdir_spread_fetch"] == 3


@pytest.mark.tor
def test_client_torrc_lines_name_the_three_authorities(tor_network: PrivateTorNetwork) -> None:
    lines = tor_network.client_torrc_lines()
    assert "TestingTorNetwork 1" in lines
    dir_auths = [line for line in lines if line.startswith("DirAuthority ")]
    assert len(dir_auths) == AUTHORITY_COUNT
    for auth in tor_network.authorities:
        assert any(f" 127.0.0.1:{auth.dir_port} " in line for line in dir_auths)


@pytest.mark.tor
async def test_onion_service_is_reachable_from_a_client(
    tor_network: PrivateTorNetwork, named_http_server: Callable[[str], int]
) -> None:
    port = named_http_server("web1")
    service = await asyncio.to_thread(tor_network.add_onion_service, "web1", {80: port})
    try:
        onion = service.onion_address
        assert onion is not None and onion.endswith(".onion")
        response = await fetch_with_retry(tor_network.clients[0], onion, deadline_s=120)
        assert response.startswith(("HTTP/1.0 200", "HTTP/1.1 200"))  # keep-alive app: 1.1
        assert "hello from web1" in response
    finally:
        pid = service.pid
        await asyncio.to_thread(tor_network.remove, service)
    assert pid is not None and not pid_is_alive(pid)


@pytest.mark.tor
def test_onionbalance_instance_registers_its_master(
    tor_network: PrivateTorNetwork, named_http_server: Callable[[str], int]
) -> None:
    master = "a" * 52 + "aaad.onion"  # syntactically a v3 address; tor only registers it
    backend = tor_network.add_onion_service(
        "obinst1", {80: named_http_server("obinst1")}, onionbalance_master=master
    )
    try:
        assert backend.hidden_service_dir is not None
        ob_config = (backend.hidden_service_dir / "ob_config").read_text()
        assert ob_config == f"MasterOnionAddress {master}\n"
        line = backend.wait_for_log(r"OnionBalance: MasterOnionAddress .* registered", 10)
        assert master[:56] in line
    finally:
        tor_network.remove(backend)


@pytest.mark.tor
def test_extra_client_gets_its_own_ports_and_cookie(
    tor_network: PrivateTorNetwork, tor_client_factory: Callable[[], TorInstance]
) -> None:
    client = tor_client_factory()
    assert client.bootstrap_progress() == 100
    assert client.socks_port not in {c.socks_port for c in tor_network.clients if c is not client}
    assert client.control_cookie_path.stat().st_size == 32
    assert client.is_running()


@pytest.mark.tor
def test_bad_torrc_line_fails_at_once_with_tor_s_message(tor_network: PrivateTorNetwork) -> None:
    started = time.monotonic()
    with pytest.raises(TorProcessError, match="NoSuchTorOption"):
        tor_network.add_onion_service("badsvc", {80: 1}, extra_lines=["NoSuchTorOption 1"])
    assert time.monotonic() - started < 30


@pytest.mark.tor
def test_stop_ends_every_started_process(tmp_path: Path) -> None:
    net = PrivateTorNetwork(tmp_path / "net", n_relays=2)
    try:
        net.start(wait=False)
        pids = net.pids()
        assert len(pids) == AUTHORITY_COUNT + 2 + 1
        assert all(pid_is_alive(pid) for pid in pids.values())
    finally:
        net.stop()
    assert not [name for name, pid in pids.items() if pid_is_alive(pid)]
    for inst in net.instances.values():
        assert inst.log_path.exists()


@pytest.mark.tor
def test_start_timeout_names_the_stuck_step_and_stops_everything(tmp_path: Path) -> None:
    net = PrivateTorNetwork(tmp_path / "net", n_relays=2)
    with pytest.raises(TorProcessError, match=r"stuck at the authorities' consensus.*tor\.log"):
        net.start(timeout=3)
    pids = net.pids()
    assert pids
    assert not [name for name, pid in pids.items() if pid_is_alive(pid)]


def test_fewer_than_two_relays_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TorProcessError, match="n_relays must be >= 2"):
        PrivateTorNetwork(tmp_path, n_relays=1)


def test_collect_logs_copies_log_and_torrc_but_no_keys(tmp_path: Path) -> None:
    net = PrivateTorNetwork(tmp_path / "net", n_relays=2)
    net.start(wait=False)
    try:
        dest = net.collect_logs(tmp_path / "logs")
    finally:
        net.stop()
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert "auth0/tor.log" in copied and "auth0/torrc" in copied
    assert not [p for p in copied if "key" in p or "cookie" in p]


def test_a_reused_name_starts_from_a_fresh_folder(tmp_path: Path) -> None:
    """A tor added under a removed tor's name gets a fresh folder; the old one moves aside.

    Without this, a second Onionbalance instance named like an earlier one read the earlier
    tor's log: its wait for "MasterOnionAddress … registered" matched the old master's line.
    No tor runs: only the folder bookkeeping of ``add_*``/``remove`` is exercised.
    """
    net = PrivateTorNetwork(tmp_path / "net")
    net.nodes_dir.mkdir(parents=True)
    first = net._new_instance("obinst1", Role.ONION_SERVICE)
    first.log_path.write_text("[notice] OnionBalance: MasterOnionAddress old.onion registered\n")
    net.remove(first)
    second = net._new_instance("obinst1", Role.ONION_SERVICE)
    assert second.data_dir == first.data_dir
    assert not second.log_path.exists()
    assert "old.onion" in (net.nodes_dir / "obinst1.1" / first.log_path.name).read_text()
    net.remove(second)
    net._new_instance("obinst1", Role.ONION_SERVICE)
    assert (net.nodes_dir / "obinst1.2").is_dir()
