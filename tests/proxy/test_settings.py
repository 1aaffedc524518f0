"""Target parsing, settings validation and timeout wording."""

from __future__ import annotations

import pytest

from rustbalance.proxy import ProxyError, ProxySettings, Target, format_seconds, parse_target
from rustbalance.proxy.upstream import timeout_message

from .helpers import MASTER, TARGET_ONION


def test_onion_target_with_port() -> None:
    target = parse_target(f"{TARGET_ONION.upper()}:8080")
    assert target == Target(host=TARGET_ONION, port=8080, is_onion=True, use_tls=False)
    assert target.authority == f"{TARGET_ONION}:8080"


def test_https_url_turns_tls_on_with_default_port() -> None:
    target = parse_target(f"https://{TARGET_ONION}/")
    assert (target.port, target.use_tls, target.authority) == (443, True, TARGET_ONION)


def test_plain_host_and_ipv6() -> None:
    assert parse_target("example.com") == Target("example.com", 80, False, False)
    assert parse_target("[::1]:9000") == Target("::1", 9000, False, False)
    assert parse_target("[::1]:9000").authority == "[::1]:9000"
    assert parse_target("127.0.0.1:80", use_tls=True).authority == "127.0.0.1:80"


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":80",
        "host:0",
        "host:65536",
        "host:http",
        "abc.onion:80",
        "a b:1",
        "[::1",
        "::1:80",
        "user@host:80",
        "host/path:80",
        "-bad-.com:80",
    ],
)
def test_bad_targets_are_refused_with_a_project_error(text: str) -> None:
    with pytest.raises(ProxyError):
        parse_target(text)


def test_seconds_read_like_tor_logs() -> None:
    assert [format_seconds(v) for v in (30.0, 30, 0.5, 2.25)] == ["30", "30", "0.5", "2.25"]


def test_timeout_message_names_socks_only_for_onion_targets() -> None:
    onion = ProxySettings(target=parse_target(TARGET_ONION))
    direct = ProxySettings(target=parse_target("127.0.0.1:8080"), connect_timeout=0.5)
    assert timeout_message(onion) == "SOCKS5 connect timed out after 30 seconds"
    assert timeout_message(direct) == "Connect to target timed out after 0.5 seconds"


def test_defaults_and_master_normalisation() -> None:
    settings = ProxySettings(target=parse_target(TARGET_ONION), master_onion=MASTER[:-6].upper())
    assert settings.master_onion == MASTER
    assert (settings.listen_host, settings.listen_port, settings.mode) == ("127.0.0.1", 0, "http")
    assert (settings.connect_timeout, settings.idle_timeout) == (30.0, 300.0)
    assert settings.max_session_seconds is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "udp"},
        {"connect_timeout": 0},
        {"idle_timeout": -1},
        {"max_session_seconds": 0},
        {"max_connections": 0},
        {"listen_port": 70000},
        {"master_onion": "example.com"},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ProxyError):
        ProxySettings(target=parse_target("127.0.0.1:80"), **kwargs)  # type: ignore[arg-type]
