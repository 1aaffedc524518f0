"""The minimal config runs a node, and every key has its documented default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rustbalance.config import Config, Endpoint, parse_config

MINIMAL = """\
[node]
id = "node-a"
[master]
identity_key_path = "/etc/rustbalance/master.key"
[target]
address = "127.0.0.1:8000"        # or "<56 chars>.onion:80"
[tor]
mode = "managed"                  # default; "system" attaches to a tor run by systemd
data_dir = "/var/lib/rustbalance/tor"
extra_torrc = []                  # extra torrc lines, e.g. a private network's DirAuthority lines
"""

BASE = Path("/etc/rustbalance")


def minimal() -> Config:
    return parse_config(MINIMAL, BASE)


def test_minimal_config_parses_with_required_values() -> None:
    config = minimal()
    assert config.node.id == "node-a"
    assert config.master.identity_key_path == Path("/etc/rustbalance/master.key")
    assert config.target.address == Endpoint(host="127.0.0.1", port=8000)
    assert str(config.target.address) == "127.0.0.1:8000"
    assert not config.target.is_onion
    assert config.tor.mode == "managed"
    assert config.tor.data_dir == Path("/var/lib/rustbalance/tor")
    assert config.tor.extra_torrc == ()


def test_only_id_key_and_target_are_required() -> None:
    text = """
[node]
id = "n"
[master]
identity_key_path = "k"
[target]
address = "localhost:1"
"""
    config = parse_config(text, "/srv")
    assert config.tor.mode == "managed"
    assert config.tor.data_dir == Path("/var/lib/rustbalance/tor")
    assert config.master.identity_key_path == Path("/srv/k")


def test_node_defaults() -> None:
    node = minimal().node
    assert node.priority == 10
    assert node.publisher_eligible is True
    assert node.state_dir == Path("/var/lib/rustbalance")
    assert node.status_socket == Path("/var/lib/rustbalance/status.sock")


def test_status_socket_follows_state_dir() -> None:
    config = parse_config(MINIMAL.replace('id = "node-a"', 'id = "a"\nstate_dir = "/x"'), BASE)
    assert config.node.status_socket == Path("/x/status.sock")


def test_master_defaults() -> None:
    master = minimal().master
    assert master.onion_address is None
    assert master.authorized_clients == ()


def test_target_defaults() -> None:
    target = minimal().target
    assert target.use_tls is False
    assert target.connect_timeout_secs == 30
    assert target.idle_timeout_secs == 300
    assert target.session_timeout_secs == 0


def test_tor_managed_defaults() -> None:
    tor = minimal().tor
    assert tor.binary == "tor"
    assert tor.control is None
    assert tor.socks is None
    assert tor.hidden_service_dir == Path("/var/lib/rustbalance/tor/hidden_service")
    assert tor.torrc_include is None
    assert tor.num_intro_points == 3
    assert tor.pow_enabled is False
    assert tor.pow_queue_rate == 250
    assert tor.pow_queue_burst == 2500
    assert tor.intro_dos_enabled is False
    assert tor.intro_dos_rate_per_sec == 25
    assert tor.intro_dos_burst_per_sec == 200
    assert tor.watchdog_interval_secs == 15
    assert tor.bootstrap_timeout_secs == 120


def test_managed_hidden_service_dir_follows_data_dir() -> None:
    config = parse_config(MINIMAL.replace("/var/lib/rustbalance/tor", "/d"), BASE)
    assert config.tor.hidden_service_dir == Path("/d/hidden_service")


def test_tor_system_defaults() -> None:
    tor = parse_config(MINIMAL.replace('"managed"', '"system"'), BASE).tor
    assert tor.mode == "system"
    assert tor.control == Endpoint(host="127.0.0.1", port=9051)
    assert tor.socks == Endpoint(host="127.0.0.1", port=9050)
    assert tor.hidden_service_dir == Path("/var/lib/tor/rustbalance_node_hs")
    assert tor.torrc_include == Path("/etc/tor/torrc.d/rustbalance.conf")


def test_proxy_defaults() -> None:
    proxy = minimal().proxy
    assert proxy.listen_host == "127.0.0.1"
    assert proxy.listen_port == 8080
    assert proxy.virtual_port == 80
    assert proxy.mode == "http"
    assert proxy.max_connections == 1024
    assert proxy.drain_timeout_secs == 3
    # The front door (issue 15): defaults an onion operator can keep.
    assert proxy.request_head_timeout_secs == 10
    assert proxy.keep_alive_timeout_secs == 30
    assert proxy.request_body_timeout_secs == 30
    assert (proxy.max_head_bytes, proxy.max_head_fields) == (16384, 100)
    assert proxy.export_circuit_id is True
    assert (proxy.circuit_max_connections, proxy.circuit_request_burst) == (32, 200)
    assert proxy.circuit_request_rate == 20.0 and proxy.circuit_cut_secs == 60
    assert proxy.circuit_id_header == ""


def test_the_proxy_listens_on_a_unix_socket_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: no TCP port to collide with; under systemd the unit's RuntimeDirectory=
    (``$RUNTIME_DIRECTORY``), elsewhere the state folder."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert minimal().proxy.listen_unix == Path("/var/lib/rustbalance/proxy.sock")
    state = MINIMAL.replace("[master]", 'state_dir = "/srv/rb"\n[master]')
    assert parse_config(state, BASE).proxy.listen_unix == Path("/srv/rb/proxy.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/rustbalance")
    assert minimal().proxy.listen_unix == Path("/run/rustbalance/proxy.sock")


@pytest.mark.parametrize("tcp", ["listen_port = 18080", "listen_port = 0", 'listen_host = "::1"'])
def test_a_tcp_listener_in_the_file_replaces_the_socket(
    tcp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/rustbalance")
    assert parse_config(MINIMAL + f"[proxy]\n{tcp}\n", BASE).proxy.listen_unix is None


def test_publish_defaults() -> None:
    publish = minimal().publish
    assert publish.refresh_interval_secs == 600
    assert publish.max_intro_points == 20
    assert publish.descriptor_lifetime_mins == 180
    assert publish.retries == 3
    assert publish.retry_base_secs == 5
    assert publish.retry_max_secs == 30
    assert publish.first_publish_poll_secs == 5
    assert publish.first_publish_max_wait_secs == 120
    assert publish.descriptor_max_age_secs == 900
    assert publish.upload_timeout_secs == 60


def test_coordination_defaults_make_a_single_node() -> None:
    config = minimal()
    coordination = config.coordination
    assert coordination.listen == Endpoint(host="127.0.0.1", port=51821)
    assert coordination.peers == ()
    assert coordination.heartbeat_interval_secs == 5
    assert coordination.heartbeat_timeout_secs == 15
    assert coordination.takeover_grace_secs == 15
    assert coordination.clock_skew_tolerance_secs == 5
    assert coordination.max_datagram_bytes == 65000
    assert coordination.is_multi_node is False
    assert config.is_multi_node is False


def test_metrics_defaults() -> None:
    metrics = minimal().metrics
    assert metrics.enabled is True
    assert metrics.listen == Endpoint(host="127.0.0.1", port=21058)


def test_the_metrics_port_collides_with_no_common_exporter_or_default() -> None:
    """Issue 17: 9100 was node_exporter's. Prometheus' default port allocations (wiki) give
    9100-9999 to exporters, a range allocated in full since 2023; its docs ask internal
    applications to stay outside it. Below Linux's ephemeral range (32768-60999), where an
    outgoing connection could hold the port at start, and not a service of /etc/services."""
    config = minimal()
    port = config.metrics.listen.port
    assert not 9090 <= port <= 9999  # Prometheus, Pushgateway, Alertmanager, the exporters
    assert 1024 < port < 32768
    others = {
        config.proxy.listen_port,
        config.coordination.listen.port,
        config.wireguard.listen_port,
        9050,  # tor's SocksPort and ControlPort (tor@default)
        9051,
    }
    assert port not in others
    services = Path("/etc/services").read_text()
    assert not re.search(rf"\s{port}/(tcp|udp)\b", services)


def test_health_defaults() -> None:
    health = minimal().health
    assert health.http_probe_enabled is False
    assert health.http_probe_path == "/"
    assert health.http_probe_interval_secs == 60
    assert health.http_probe_timeout_secs == 5
    assert health.probe_expected_status == 200
    assert health.probe_failure_threshold == 3


def test_durations_are_floats_whether_written_as_int_or_float() -> None:
    config = parse_config(MINIMAL + "[publish]\nretry_base_secs = 2.5\nretry_max_secs = 7\n", BASE)
    assert config.publish.retry_base_secs == 2.5
    assert isinstance(config.publish.retry_max_secs, float)
    assert config.publish.retry_max_secs == 7.0


def test_summary_names_node_mode_tor_and_target() -> None:
    assert minimal().summary() == "node node-a, single-node, tor managed, target 127.0.0.1:8000"


def test_config_is_frozen() -> None:
    config = minimal()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.priority = 1  # type: ignore[misc]
    assert config.node.priority == 10
