"""Every validation rule: the problem names the key and says what is wrong."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rustbalance.config import ConfigProblems, Endpoint, parse_config
from rustbalance.errors import ConfigError
from tests.config import (
    BASE,
    CLIENT_A,
    CLIENT_B,
    MINIMAL_DOC,
    ONION_A,
    ONION_B,
    document,
    parse,
    problems,
)

BAD_ONION = ONION_A[:10] + ("b" if ONION_A[10] != "b" else "c") + ONION_A[11:]

# (section, key, bad value, text expected in the one problem reported)
INVALID: list[tuple[str, str, Any, str]] = [
    ("node", "id", "", "node.id: must be 1-64 characters"),
    ("node", "id", "a" * 65, "node.id: must be 1-64 characters"),
    ("node", "id", "node a", "node.id: must be 1-64 characters"),
    ("node", "id", "nöde", "node.id: must be 1-64 characters"),
    ("node", "priority", -1, "node.priority: must be 0..4294967295, got -1"),
    ("node", "priority", 2**32, "node.priority: must be 0..4294967295"),
    ("node", "state_dir", "", "node.state_dir: must not be empty"),
    ("node", "status_socket", "/" + "s" * 120, "node.status_socket: path is 121 bytes"),
    ("master", "identity_key_path", "", "master.identity_key_path: must not be empty"),
    ("master", "onion_address", "abc.onion", "master.onion_address: onion address must have 56"),
    (
        "master",
        "onion_address",
        ONION_A[:-6],
        "master.onion_address: must be '<56 characters>.onion'",
    ),
    ("master", "onion_address", BAD_ONION, "master.onion_address: onion address checksum"),
    (
        "master",
        "authorized_clients",
        ["x"],
        "master.authorized_clients[0]: an x25519 public key is 52",
    ),
    (
        "master",
        "authorized_clients",
        ["descriptor:x448:" + CLIENT_A],
        "master.authorized_clients[0]: must be 'descriptor:x25519:",
    ),
    ("master", "authorized_clients", [CLIENT_A[:-1] + "1"], "outside the base32 alphabet"),
    ("master", "authorized_clients", [CLIENT_A[:-1] + "R"], "not canonical base32"),
    (
        "master",
        "authorized_clients",
        [CLIENT_A, "descriptor:x25519:" + CLIENT_A.lower()],
        "master.authorized_clients[1]: the same key is listed twice",
    ),
    ("target", "address", "127.0.0.1", "target.address: '127.0.0.1' must be 'HOST:PORT'"),
    (
        "target",
        "address",
        "127.0.0.1:0",
        "target.address: '127.0.0.1:0': port must be 1-65535, got 0",
    ),
    ("target", "address", "127.0.0.1:65536", "port must be 1-65535, got 65536"),
    ("target", "address", "127.0.0.1:http", "port 'http' is not a number"),
    ("target", "address", "::1:80", "an IPv6 address needs brackets"),
    ("target", "address", "[::g]:80", "is not a valid IPv6 address"),
    ("target", "address", "300.1.1.1:80", "is not a valid IP address or host name"),
    ("target", "address", "bad_host:80", "is not a valid IP address or host name"),
    ("target", "address", f"{BAD_ONION}:80", "checksum does not match"),
    ("target", "address", "expyuzz4wqqyqhjn.onion:80", "onion address must have 56"),
    ("target", "connect_timeout_secs", 0, "target.connect_timeout_secs: must be > 0, got 0"),
    ("target", "idle_timeout_secs", -1.5, "target.idle_timeout_secs: must be > 0, got -1.5"),
    ("target", "idle_timeout_secs", float("inf"), "must be a finite number of seconds"),
    ("target", "idle_timeout_secs", float("nan"), "must be a finite number of seconds"),
    ("target", "idle_timeout_secs", 10**30, "must be at most 31536000"),
    ("target", "session_timeout_secs", -1, "target.session_timeout_secs: must be >= 0 (0 = off)"),
    ("tor", "mode", "foo", "tor.mode: must be 'managed' or 'system', got 'foo'"),
    ("tor", "mode", "Managed", "tor.mode: must be 'managed' or 'system'"),
    ("tor", "data_dir", "", "tor.data_dir: must not be empty"),
    (
        "tor",
        "extra_torrc",
        ["Log notice stdout\nControlPort 1"],
        "tor.extra_torrc[0]: must be a single line",
    ),
    ("tor", "extra_torrc", ["ok", 5], "tor.extra_torrc[1]: must be a string, got integer 5"),
    ("tor", "extra_torrc", "SafeLogging 1", "tor.extra_torrc: must be an array, got string"),
    ("tor", "binary", "", "tor.binary: must not be empty"),
    ("tor", "control", "127.0.0.1:9051", "tor.control: only used in system mode"),
    ("tor", "torrc_include", "/etc/tor/x.conf", "tor.torrc_include: only used in system mode"),
    ("tor", "socks", "127.0.0.1", "tor.socks: '127.0.0.1' must be 'HOST:PORT'"),
    ("tor", "socks", f"{ONION_A}:9050", "tor.socks: onion addresses are not allowed here"),
    ("tor", "num_intro_points", 0, "tor.num_intro_points: must be 1..20, got 0"),
    ("tor", "num_intro_points", 21, "tor.num_intro_points: must be 1..20, got 21"),
    ("tor", "pow_queue_rate", 0, "tor.pow_queue_rate: must be 1..2147483647"),
    ("tor", "pow_queue_burst", 100, "tor.pow_queue_burst: must be >= tor.pow_queue_rate (250)"),
    ("tor", "intro_dos_rate_per_sec", 0, "tor.intro_dos_rate_per_sec: must be 1..2147483647"),
    (
        "tor",
        "intro_dos_burst_per_sec",
        10,
        "tor.intro_dos_burst_per_sec: must be >= tor.intro_dos_rate_per_sec (25)",
    ),
    ("tor", "watchdog_interval_secs", 0, "tor.watchdog_interval_secs: must be > 0"),
    ("tor", "bootstrap_timeout_secs", -3, "tor.bootstrap_timeout_secs: must be > 0"),
    ("proxy", "listen_host", "127.0.0.1:80", "proxy.listen_host: '127.0.0.1:80' is not a valid"),
    ("proxy", "listen_host", "", "proxy.listen_host: '' is not a valid IP address or host name"),
    ("proxy", "listen_port", -1, "proxy.listen_port: must be 0..65535, got -1"),
    ("proxy", "listen_port", 65536, "proxy.listen_port: must be 0..65535"),
    ("proxy", "virtual_port", 0, "proxy.virtual_port: must be 1..65535, got 0"),
    ("proxy", "mode", "https", "proxy.mode: must be 'http' or 'tcp', got 'https'"),
    ("proxy", "max_connections", 0, "proxy.max_connections: must be >= 1, got 0"),
    ("proxy", "drain_timeout_secs", 0, "proxy.drain_timeout_secs: must be > 0"),
    # The front door (issue 15).
    ("proxy", "listen_unix", "/" + "s" * 120, "proxy.listen_unix: path is 121 bytes"),
    ("proxy", "listen_unix", "/run/rb/proxy sock", "proxy.listen_unix: must not contain spaces"),
    ("proxy", "listen_unix", "/run/rb/p#.sock", "proxy.listen_unix: "),
    ("proxy", "listen_unix", "/run/rb\n/p.sock", "proxy.listen_unix: "),
    ("proxy", "request_head_timeout_secs", 0, "proxy.request_head_timeout_secs: must be > 0"),
    ("proxy", "keep_alive_timeout_secs", -1, "proxy.keep_alive_timeout_secs: must be > 0"),
    ("proxy", "request_body_timeout_secs", 0, "proxy.request_body_timeout_secs: must be > 0"),
    ("proxy", "max_head_bytes", 1023, "proxy.max_head_bytes: must be 1024..1048576, got 1023"),
    ("proxy", "max_head_bytes", 1 << 21, "proxy.max_head_bytes: must be 1024..1048576"),
    ("proxy", "max_head_fields", 0, "proxy.max_head_fields: must be 1..10000, got 0"),
    ("proxy", "export_circuit_id", "yes", "proxy.export_circuit_id: must be true or false"),
    ("proxy", "circuit_max_connections", -1, "proxy.circuit_max_connections: must be 0..65535"),
    (
        "proxy",
        "circuit_request_rate",
        -0.5,
        "proxy.circuit_request_rate: must be 0..1000000 (0 = off), got -0.5",
    ),
    ("proxy", "circuit_request_rate", float("inf"), "proxy.circuit_request_rate: must be 0.."),
    ("proxy", "circuit_request_rate", float("nan"), "proxy.circuit_request_rate: must be 0.."),
    ("proxy", "circuit_request_rate", True, "proxy.circuit_request_rate: must be a number"),
    ("proxy", "circuit_request_burst", 0, "proxy.circuit_request_burst: must be 1..1000000"),
    ("proxy", "circuit_cut_secs", 0, "proxy.circuit_cut_secs: must be > 0"),
    ("proxy", "circuit_id_header", "X Tor", "proxy.circuit_id_header: must be an HTTP header"),
    ("proxy", "circuit_id_header", "X-Tor:", "proxy.circuit_id_header: must be an HTTP header"),
    ("tor", "max_streams_per_circuit", 65536, "tor.max_streams_per_circuit: must be 0..65535"),
    ("tor", "max_streams_close_circuit", 1, "tor.max_streams_close_circuit: must be true or"),
    (
        "proxy",
        "listen_port",
        21058,
        "metrics.listen: 127.0.0.1:21058 is also proxy.listen_host:listen_port",
    ),
    ("publish", "refresh_interval_secs", 0, "publish.refresh_interval_secs: must be > 0"),
    ("publish", "max_intro_points", 0, "publish.max_intro_points: must be 1..20, got 0"),
    ("publish", "max_intro_points", 21, "publish.max_intro_points: must be 1..20, got 21"),
    (
        "publish",
        "descriptor_lifetime_mins",
        29,
        "publish.descriptor_lifetime_mins: must be 30..720, got 29",
    ),
    (
        "publish",
        "descriptor_lifetime_mins",
        721,
        "publish.descriptor_lifetime_mins: must be 30..720",
    ),
    (
        "publish",
        "descriptor_lifetime_mins",
        180.0,
        "publish.descriptor_lifetime_mins: must be an integer, got float 180.0",
    ),
    ("publish", "retries", -1, "publish.retries: must be 0..100, got -1"),
    ("publish", "retry_base_secs", 0, "publish.retry_base_secs: must be > 0"),
    (
        "publish",
        "retry_max_secs",
        4,
        "publish.retry_max_secs: must be >= publish.retry_base_secs (5), got 4",
    ),
    ("publish", "first_publish_poll_secs", 0, "publish.first_publish_poll_secs: must be > 0"),
    (
        "publish",
        "first_publish_max_wait_secs",
        4.5,
        "publish.first_publish_max_wait_secs: must be >= publish.first_publish_poll_secs (5)",
    ),
    ("publish", "descriptor_max_age_secs", 0, "publish.descriptor_max_age_secs: must be > 0"),
    ("publish", "upload_timeout_secs", 0, "publish.upload_timeout_secs: must be > 0"),
    ("coordination", "listen", "0.0.0.0", "coordination.listen: '0.0.0.0' must be 'HOST:PORT'"),
    (
        "coordination",
        "peers",
        ["10.0.0.2"],
        "coordination.peers[0]: '10.0.0.2' must be 'HOST:PORT'",
    ),
    ("coordination", "peers", "10.0.0.2:51821", "coordination.peers: must be an array, got string"),
    (
        "coordination",
        "heartbeat_interval_secs",
        0,
        "coordination.heartbeat_interval_secs: must be > 0",
    ),
    (
        "coordination",
        "heartbeat_timeout_secs",
        10,
        "coordination.heartbeat_timeout_secs: must be more than 2 x "
        "coordination.heartbeat_interval_secs (10), got 10",
    ),
    (
        "coordination",
        "takeover_grace_secs",
        4,
        "coordination.takeover_grace_secs: must be >= "
        "coordination.heartbeat_interval_secs (5), got 4",
    ),
    (
        "coordination",
        "clock_skew_tolerance_secs",
        0,
        "coordination.clock_skew_tolerance_secs: must be > 0",
    ),
    (
        "coordination",
        "max_datagram_bytes",
        1023,
        "coordination.max_datagram_bytes: must be 1024..65507, got 1023",
    ),
    (
        "coordination",
        "max_datagram_bytes",
        65508,
        "coordination.max_datagram_bytes: must be 1024..65507",
    ),
    ("metrics", "listen", "127.0.0.1:0", "metrics.listen: '127.0.0.1:0': port must be 1-65535"),
    (
        "health",
        "http_probe_path",
        "health",
        "health.http_probe_path: must start with '/', got 'health'",
    ),
    ("health", "http_probe_path", "/a b", "health.http_probe_path: must not contain spaces"),
    ("health", "http_probe_interval_secs", 0, "health.http_probe_interval_secs: must be > 0"),
    (
        "health",
        "http_probe_timeout_secs",
        61,
        "health.http_probe_timeout_secs: must be <= health.http_probe_interval_secs (60), got 61",
    ),
    (
        "health",
        "probe_expected_status",
        99,
        "health.probe_expected_status: must be 100..599, got 99",
    ),
    ("health", "probe_expected_status", 600, "health.probe_expected_status: must be 100..599"),
    (
        "health",
        "probe_failure_threshold",
        0,
        "health.probe_failure_threshold: must be 1..1000, got 0",
    ),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    INVALID,
    ids=[f"{s}.{k}={v!r}"[:60] for s, k, v, _ in INVALID],
)
def test_invalid_value_is_reported_with_its_key(
    section: str, key: str, value: Any, expected: str
) -> None:
    found = problems(**{section: {key: value}})
    assert len(found) == 1, found
    assert expected in found[0]


# Values at the edges of their range are accepted.
VALID: list[tuple[str, str, Any, str, Any]] = [
    # (section, key, value, attribute, parsed value)
    ("node", "id", "a", "id", "a"),
    ("node", "id", "A-z_0.9" + "x" * 57, "id", "A-z_0.9" + "x" * 57),
    ("node", "priority", 0, "priority", 0),
    ("node", "priority", 2**32 - 1, "priority", 2**32 - 1),
    ("node", "publisher_eligible", False, "publisher_eligible", False),
    ("master", "onion_address", ONION_A.upper(), "onion_address", ONION_A),
    ("target", "address", f"{ONION_B.upper()}:443", "address", Endpoint(host=ONION_B, port=443)),
    ("target", "address", "[::1]:65535", "address", Endpoint(host="::1", port=65535)),
    ("target", "address", "App.Example:1", "address", Endpoint(host="app.example", port=1)),
    ("target", "session_timeout_secs", 0, "session_timeout_secs", 0.0),
    ("target", "connect_timeout_secs", 0.25, "connect_timeout_secs", 0.25),
    ("target", "use_tls", True, "use_tls", True),
    ("tor", "num_intro_points", 20, "num_intro_points", 20),
    (
        "tor",
        "extra_torrc",
        ["DirAuthority a", "TestingTorNetwork 1"],
        "extra_torrc",
        ("DirAuthority a", "TestingTorNetwork 1"),
    ),
    ("tor", "socks", "127.0.0.1:9150", "socks", Endpoint(host="127.0.0.1", port=9150)),
    ("tor", "pow_queue_burst", 250, "pow_queue_burst", 250),
    ("proxy", "listen_port", 0, "listen_port", 0),
    ("proxy", "listen_host", "::1", "listen_host", "::1"),
    ("proxy", "listen_host", "[::1]", "listen_host", "::1"),
    ("proxy", "mode", "tcp", "mode", "tcp"),
    ("publish", "descriptor_lifetime_mins", 30, "descriptor_lifetime_mins", 30),
    ("publish", "descriptor_lifetime_mins", 720, "descriptor_lifetime_mins", 720),
    ("publish", "retries", 0, "retries", 0),
    ("publish", "max_intro_points", 1, "max_intro_points", 1),
    ("coordination", "max_datagram_bytes", 65507, "max_datagram_bytes", 65507),
    ("coordination", "heartbeat_timeout_secs", 10.5, "heartbeat_timeout_secs", 10.5),
    ("coordination", "takeover_grace_secs", 5, "takeover_grace_secs", 5.0),
    ("health", "probe_expected_status", 204, "probe_expected_status", 204),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "attribute", "parsed"),
    VALID,
    ids=[f"{s}.{k}={v!r}"[:60] for s, k, v, _, _ in VALID],
)
def test_valid_value_is_accepted(
    section: str, key: str, value: Any, attribute: str, parsed: Any
) -> None:
    config = parse(**{section: {key: value}})
    assert getattr(getattr(config, section), attribute) == parsed


@pytest.mark.parametrize(
    ("section", "key", "value", "type_name"),
    [
        ("node", "priority", True, "boolean true"),
        ("node", "priority", 1.0, "float 1.0"),
        ("node", "priority", "10", "string '10'"),
        ("node", "id", 7, "integer 7"),
        ("node", "publisher_eligible", 1, "integer 1"),
        ("node", "publisher_eligible", "yes", "string 'yes'"),
        ("target", "connect_timeout_secs", True, "boolean true"),
        ("target", "connect_timeout_secs", "30", "string '30'"),
        ("target", "address", 8000, "integer 8000"),
        ("tor", "num_intro_points", False, "boolean false"),
        ("tor", "mode", ["managed"], "array"),
        ("master", "identity_key_path", 3, "integer 3"),
        ("master", "authorized_clients", CLIENT_A, "string"),
        ("coordination", "listen", {"host": "x"}, "table"),
        ("metrics", "enabled", "true", "string 'true'"),
        ("health", "probe_expected_status", 200.0, "float 200.0"),
    ],
)
def test_wrong_type_is_reported(section: str, key: str, value: Any, type_name: str) -> None:
    (problem,) = problems(**{section: {key: value}})
    assert problem.startswith(f"{section}.{key}: must be ")
    assert f"got {type_name}" in problem


def test_toml_dates_are_a_wrong_type() -> None:
    text = tomli_doc() + "[publish]\nretries = 1979-05-27\n"
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, BASE)
    assert info.value.problems == ("publish.retries: must be an integer, got date",)


def tomli_doc() -> str:
    return tomli_w.dumps(MINIMAL_DOC)


@pytest.mark.parametrize(
    ("section", "key"),
    [("node", "id"), ("master", "identity_key_path"), ("target", "address")],
)
def test_required_key_missing(section: str, key: str) -> None:
    assert problems(**{section: {key: None}}) == (f"{section}.{key}: is required",)


def test_empty_file_reports_every_required_key() -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config("", BASE)
    # The master key's need follows the identity mode, decided after every section.
    assert info.value.problems == (
        "node.id: is required",
        "target.address: is required",
        "master.identity_key_path: is required",
    )


def test_unknown_key_in_any_section_is_an_error_with_a_hint() -> None:
    assert problems(node={"prority": 1}) == (
        "node.prority: unknown key (did you mean 'priority'?)",
    )
    assert problems(health={"zzz": 1}) == ("health.zzz: unknown key",)


@pytest.mark.parametrize(
    "section",
    ["node", "master", "target", "tor", "proxy", "publish", "coordination", "metrics", "health"],
)
def test_every_section_rejects_unknown_keys(section: str) -> None:
    assert problems(**{section: {"bogus_key": 1}}) == (f"{section}.bogus_key: unknown key",)


def test_odd_unknown_key_is_quoted_so_it_stays_on_one_line() -> None:
    text = tomli_doc() + '[metrics]\n"a\\nb c" = 1\n'
    with pytest.raises(ConfigProblems) as info:
        parse_config(text, BASE)
    assert info.value.problems == ("metrics.'a\\nb c': unknown key",)


def test_unknown_section_is_an_error() -> None:
    doc = tomli_doc() + "[wireguards]\ninterface = 'wg-rb'\n[proxi]\n"
    with pytest.raises(ConfigProblems) as info:
        parse_config(doc, BASE)
    assert info.value.problems == (
        "[wireguards]: unknown section (did you mean '[wireguard]'?)",
        "[proxi]: unknown section (did you mean '[proxy]'?)",
    )


def test_top_level_key_that_is_not_a_table() -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config("local_port = 8080\n" + tomli_doc(), BASE)
    assert info.value.problems == ("[local_port]: unknown section",)


def test_section_that_is_not_a_table() -> None:
    doc: dict[str, Any] = {**MINIMAL_DOC, "proxy": 8080}
    with pytest.raises(ConfigProblems) as info:
        parse_config(tomli_w.dumps(doc), BASE)
    assert info.value.problems == ("proxy: must be a table ([proxy] section), got integer 8080",)


def test_all_problems_are_reported_together_one_per_line() -> None:
    text = """
[node]
id = "bad id"
priority = true
[master]
identity_key_path = "k"
[target]
address = "nowhere"
[tor]
mode = "foo"
[proxy]
mode = "udp"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, BASE)
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "node.id",
        "node.priority",
        "target.address",
        "tor.mode",
        "proxy.mode",
    ]


def test_invalid_tor_mode_does_not_also_blame_mode_specific_keys() -> None:
    found = problems(tor={"mode": "sytem", "control": "127.0.0.1:9051"})
    assert found == ("tor.mode: must be 'managed' or 'system', got 'sytem'",)


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigProblems) as info:
        parse_config("[node\nid = 1", BASE)
    (problem,) = info.value.problems
    assert problem.startswith("TOML syntax error: ")
    assert "line 1" in problem


# --- relative paths ---------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_folder() -> None:
    config = parse_config(
        tomli_doc_with(
            node={"state_dir": "state", "status_socket": "run/s.sock"},
            master={"identity_key_path": "keys/master.key"},
            tor={
                "data_dir": "../tor",
                "mode": "system",
                "control": "unix:ctl/sock",
                "torrc_include": "torrc.d/rb.conf",
                "hidden_service_dir": "hs",
            },
            coordination={"peers": ["10.0.0.2:1"]},
        ),
        "/srv/rb",
    )
    assert config.node.state_dir == Path("/srv/rb/state")
    assert config.node.status_socket == Path("/srv/rb/run/s.sock")
    assert config.master.identity_key_path == Path("/srv/rb/keys/master.key")
    assert config.tor.data_dir == Path("/srv/rb/../tor")
    assert config.tor.control == Path("/srv/rb/ctl/sock")
    assert config.tor.torrc_include == Path("/srv/rb/torrc.d/rb.conf")
    assert config.tor.hidden_service_dir == Path("/srv/rb/hs")
    assert config.node.node_key_path == Path("/srv/rb/state/keys/node.key")


def test_absolute_paths_are_kept() -> None:
    config = parse(master={"identity_key_path": "/k/master.key"})
    assert config.master.identity_key_path == Path("/k/master.key")


def test_relative_base_dir_is_made_absolute() -> None:
    config = parse_config(tomli_doc_with(master={"identity_key_path": "m.key"}), "conf")
    assert config.master.identity_key_path == Path.cwd() / "conf" / "m.key"


def test_a_socket_set_in_the_file_wins_over_a_tcp_listener() -> None:
    config = parse(proxy={"listen_unix": "/run/rb/proxy.sock", "listen_port": 18080})
    assert config.proxy.listen_unix == Path("/run/rb/proxy.sock")


def test_a_derived_socket_path_that_is_too_long_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/" + "r" * 100)
    found = problems()
    assert found == (
        "proxy.listen_unix: path is 112 bytes; unix socket paths are limited to 107 (set a "
        "shorter proxy.listen_unix, or listen_port for TCP)",
    )


def tomli_doc_with(**sections: dict[str, Any]) -> str:
    return tomli_w.dumps(document(**sections))


# --- tor modes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("control", "expected"),
    [
        ("127.0.0.1:9151", Endpoint(host="127.0.0.1", port=9151)),
        ("[::1]:9051", Endpoint(host="::1", port=9051)),
        ("localhost:9051", Endpoint(host="localhost", port=9051)),
        ("/run/tor/control", Path("/run/tor/control")),
        ("unix:/run/tor/control", Path("/run/tor/control")),
    ],
)
def test_system_mode_control_endpoint_or_socket(control: str, expected: object) -> None:
    config = parse(tor={"mode": "system", "control": control})
    assert config.tor.control == expected


@pytest.mark.parametrize("control", ["9051", "control.sock", "unix:", "host:99999"])
def test_system_mode_bad_control(control: str) -> None:
    (problem,) = problems(tor={"mode": "system", "control": control})
    assert problem.startswith("tor.control: ")


def test_managed_mode_with_fixed_socks_port() -> None:
    config = parse(tor={"socks": "127.0.0.1:19050"})
    assert config.tor.socks == Endpoint(host="127.0.0.1", port=19050)


# --- master ---------------------------------------------------------------------------------


def test_authorized_clients_accept_both_forms_and_decode_to_raw_keys() -> None:
    config = parse(
        master={"authorized_clients": ["descriptor:x25519:" + CLIENT_A, CLIENT_B.lower()]}
    )
    assert config.master.authorized_clients == (
        base64.b32decode(CLIENT_A + "===="),
        base64.b32decode(CLIENT_B + "===="),
    )
    assert all(len(key) == 32 for key in config.master.authorized_clients)


def test_onion_target_is_marked_as_onion() -> None:
    config = parse(target={"address": f"{ONION_B}:80"})
    assert config.target.is_onion
    assert str(config.target.address) == f"{ONION_B}:80"


# --- coordination ---------------------------------------------------------------------------


def test_multi_node_with_seed_peers() -> None:
    config = parse(coordination={"peers": ["10.0.0.2:51821", "[fd00::3]:51821"]})
    assert config.is_multi_node
    assert config.coordination.is_multi_node
    assert config.coordination.peers == (
        Endpoint(host="10.0.0.2", port=51821),
        Endpoint(host="fd00::3", port=51821),
    )
    assert "multi-node (2 peers)" in config.summary()


def test_duplicate_peers_are_errors() -> None:
    found = problems(
        coordination={
            "listen": "10.0.0.1:51821",
            "peers": ["10.0.0.2:51821", "10.0.0.2:51821", "10.0.0.3:51821"],
        }
    )
    assert found == ("coordination.peers[1]: 10.0.0.2:51821 is listed twice",)


def test_one_member_list_serves_every_node() -> None:
    """Issue 17: ``peers`` may list the node's own address (its ``listen`` or ``advertise``),
    which is left out, so the same member list goes into every node's config."""
    members = ["10.0.0.1:51821", "10.0.0.2:51821", "10.0.0.3:51821"]
    for own in members:
        config = parse(coordination={"listen": own, "peers": members})
        assert config.coordination.peers == tuple(
            Endpoint(host=m.split(":")[0], port=51821) for m in members if m != own
        )
        assert config.is_multi_node
        assert "multi-node (2 peers)" in config.summary()
    behind_nat = parse(
        coordination={
            "listen": "0.0.0.0:51821",
            "advertise": "10.0.0.2:51821",
            "peers": members,
        }
    )
    assert [str(p) for p in behind_nat.coordination.peers] == [members[0], members[2]]


def test_a_member_list_of_only_this_node_is_a_single_node() -> None:
    config = parse(coordination={"listen": "10.0.0.1:51821", "peers": ["10.0.0.1:51821"]})
    assert config.coordination.peers == ()
    assert not config.is_multi_node


def test_heartbeat_timeout_must_exceed_twice_interval() -> None:
    assert parse(coordination={"heartbeat_interval_secs": 2, "heartbeat_timeout_secs": 4.01})
    found = problems(coordination={"heartbeat_interval_secs": 2, "heartbeat_timeout_secs": 4})
    assert found[0].startswith("coordination.heartbeat_timeout_secs: must be more than 2 x")


def test_cross_checks_skip_keys_that_already_failed() -> None:
    # A bad interval is reported once, not again as a timeout or grace problem.
    assert problems(coordination={"heartbeat_interval_secs": "5"}) == (
        "coordination.heartbeat_interval_secs: must be a number of seconds, got string '5'",
    )


def test_metrics_port_may_equal_proxy_port_when_metrics_disabled() -> None:
    config = parse(proxy={"listen_port": 9100}, metrics={"enabled": False})
    assert config.proxy.listen_port == 9100


def test_exceptions_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        parse_config("x = ", BASE)
    assert issubclass(ConfigProblems, ConfigError)


def test_a_relation_also_holds_against_the_other_keys_default() -> None:
    # Only the interval is set: the default timeout must still be checked against it.
    assert problems(health={"http_probe_interval_secs": 1}) == (
        "health.http_probe_timeout_secs: must be <= health.http_probe_interval_secs (1), got 5",
    )
    assert problems(coordination={"heartbeat_interval_secs": 10}) == (
        "coordination.heartbeat_timeout_secs: must be more than 2 x "
        "coordination.heartbeat_interval_secs (20), got 15",
    )
