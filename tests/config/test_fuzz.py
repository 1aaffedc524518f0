"""Fuzzing: whatever the file holds, the parser returns a Config or raises ConfigError."""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.config import Config, ConfigProblems, parse_config
from rustbalance.config.schema import (
    CoordinationConfig,
    HealthConfig,
    MetricsConfig,
    NodeConfig,
    ProxyConfig,
    PublishConfig,
    TargetConfig,
    TorConfig,
)
from rustbalance.errors import ConfigError
from tests.budget import budget
from tests.config import BASE, ONION_A, document

SCHEMA = {
    "node": NodeConfig,
    "target": TargetConfig,
    "tor": TorConfig,
    "proxy": ProxyConfig,
    "publish": PublishConfig,
    "coordination": CoordinationConfig,
    "metrics": MetricsConfig,
    "health": HealthConfig,
}
# TOML key names that are not dataclass field names one-to-one.
KEYS: list[tuple[str, str]] = [
    (section, f.name) for section, cls in SCHEMA.items() for f in dataclasses.fields(cls)
] + [
    ("master", "identity_key_path"),
    ("master", "onion_address"),
    ("master", "authorized_clients"),
]

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.sampled_from(
        [
            "managed",
            "system",
            "http",
            "tcp",
            "127.0.0.1:9051",
            "[::1]:0",
            "unix:",
            "unix:/x",
            "/",
            f"{ONION_A}:80",
            ONION_A,
            "descriptor:x25519:" + "A" * 52,
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=3),
    ),
    max_leaves=8,
)


def parse_or_config_error(text: str) -> Config | None:
    try:
        return parse_config(text, BASE)
    except ConfigError as exc:
        # Every problem is one non-empty line: the CLI prints them one per line.
        assert str(exc)
        if isinstance(exc, ConfigProblems):
            assert exc.problems
            assert all(p and "\n" not in p and "\r" not in p for p in exc.problems)
        return None


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=300))
def test_random_text_raises_only_config_error(text: str) -> None:
    parse_or_config_error(text)


toml_lines = st.one_of(
    st.sampled_from(
        [
            "[node]",
            "[master]",
            "[target]",
            "[tor]",
            "[proxy]",
            "[publish]",
            "[coordination]",
            "[metrics]",
            "[health]",
            "[[node]]",
            "[node.sub]",
            "[x]",
            "",
            "#",
        ]
    ),
    st.builds(
        lambda key, value: f"{key} = {value}",
        st.sampled_from([k for _, k in KEYS] + ["x", '"a b"', "a.b"]),
        st.sampled_from(
            [
                "1",
                "-1",
                "0",
                "1.5",
                "nan",
                "inf",
                "true",
                '"s"',
                "'127.0.0.1:1'",
                "[]",
                '["a", 1]',
                "{}",
                "{a = 1}",
                "1979-05-27",
                "[[[[[[]]]]]]",
                '"""x\ny"""',
                "9" * 40,
                "0x1F",
                "",
            ]
        ),
    ),
)


@settings(max_examples=budget(300), deadline=None)
@given(st.lists(toml_lines, max_size=25))
def test_toml_ish_text_raises_only_config_error(lines: list[str]) -> None:
    parse_or_config_error("\n".join(lines))


@settings(max_examples=budget(400), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), toml_values), min_size=1, max_size=6))
def test_random_values_for_known_keys_raise_only_config_error(
    assignments: list[tuple[tuple[str, str], Any]],
) -> None:
    sections: dict[str, dict[str, Any]] = {}
    for (section, key), value in assignments:
        sections.setdefault(section, {})[key] = value
    try:
        text = tomli_w.dumps(document(**sections))
    except (TypeError, ValueError):
        return  # not representable in TOML (e.g. an out-of-range datetime offset)
    parse_or_config_error(text)


@settings(max_examples=budget(200), deadline=None)
@given(st.sampled_from([*sorted(SCHEMA), "master"]), st.text(min_size=1, max_size=20), toml_values)
def test_unknown_keys_are_reported_on_one_line(section: str, key: str, value: Any) -> None:
    known = {k for s, k in KEYS if s == section}
    try:
        base = document()
        text = tomli_w.dumps({**base, section: {**base.get(section, {}), key: value}})
    except (TypeError, ValueError):
        return
    if key in known:
        parse_or_config_error(text)
        return
    assert parse_or_config_error(text) is None


def test_deeply_nested_arrays_are_a_config_error() -> None:
    text = "[node]\nid = " + "[" * 5000 + "]" * 5000
    assert parse_or_config_error(text) is None


@settings(max_examples=budget(200), deadline=None)
@given(
    node_id=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    priority=st.integers(0, 2**32 - 1),
    interval=st.floats(0.001, 1000, allow_nan=False),
    factor=st.floats(2.001, 100),
    port=st.integers(1, 65535),
)
def test_valid_values_come_back_unchanged(
    node_id: str, priority: int, interval: float, factor: float, port: int
) -> None:
    timeout = interval * factor
    doc = document(
        node={"id": node_id, "priority": priority},
        target={"address": f"[2001:db8::1]:{port}"},
        coordination={
            "heartbeat_interval_secs": interval,
            "heartbeat_timeout_secs": timeout,
            "takeover_grace_secs": interval,
        },
    )
    config = parse_config(tomli_w.dumps(doc), BASE)
    assert config.node.id == node_id
    assert config.node.priority == priority
    assert config.target.address.port == port
    assert str(config.target.address) == f"[2001:db8::1]:{port}"
    assert math.isclose(config.coordination.heartbeat_timeout_secs, timeout)


@settings(max_examples=budget(200), deadline=None)
@given(st.datetimes(timezones=st.just(datetime.UTC)) | st.dates() | st.times())
def test_dates_are_never_accepted_as_durations(value: object) -> None:
    text = tomli_w.dumps(document(publish={"upload_timeout_secs": value}))
    assert parse_or_config_error(text) is None
