"""Config validation of the identity modes (``node.identity_mode``) and ``master.backends``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config import BASE, ONION_A, ONION_B, parse, problems

NO_KEY = {"identity_key_path": None}


def test_a_lone_node_defaults_to_shared_mode_without_backends() -> None:
    config = parse()
    assert config.node.identity_mode is None  # left out: the default for a lone node
    assert config.identity_mode == "shared"
    assert config.node.instance_key_path == Path("/var/lib/rustbalance/keys/instance.key")
    assert config.master.backends == ()
    assert config.master.backend_poll_secs == 60.0
    assert config.master.backend_max_age_secs == 900.0


def test_instance_key_path_follows_state_dir_and_is_relative_to_the_config() -> None:
    config = parse(node={"identity_mode": "instance", "state_dir": "/srv/rb"})
    assert config.node.instance_key_path == Path("/srv/rb/keys/instance.key")
    config = parse(node={"identity_mode": "instance", "instance_key_path": "keys/me.key"})
    assert config.node.instance_key_path == BASE / "keys" / "me.key"


def test_unknown_identity_mode_is_named() -> None:
    assert problems(node={"identity_mode": "solo"}) == (
        "node.identity_mode: must be 'shared' or 'instance', got 'solo'",
    )


def test_shared_mode_requires_the_master_key() -> None:
    assert problems(master=NO_KEY) == ("master.identity_key_path: is required",)


def test_eligible_instance_requires_the_master_key() -> None:
    found = problems(node={"identity_mode": "instance"}, master=NO_KEY)
    assert found == ("master.identity_key_path: is required (this instance is publisher-eligible)",)


def test_non_eligible_instance_needs_no_key_but_the_master_address() -> None:
    node = {"identity_mode": "instance", "publisher_eligible": False}
    config = parse(node=node, master={"identity_key_path": None, "onion_address": ONION_A})
    assert config.master.identity_key_path is None
    assert config.master.onion_address == ONION_A
    found = problems(node=node, master=NO_KEY)
    assert len(found) == 1
    assert found[0].startswith("master.onion_address: is required without master.identity_key_path")


def test_backends_are_normalised_v3_addresses() -> None:
    config = parse(master={"backends": [ONION_B.upper().replace(".ONION", ".onion")]})
    assert config.master.backends == (ONION_B,)


@pytest.mark.parametrize(
    ("backends", "expected"),
    [
        ("x", "master.backends: must be an array, got string 'x'"),
        ([3], "master.backends[0]: must be a string, got integer 3"),
        (["example.com"], "master.backends[0]: must be '<56 characters>.onion', got 'example.com'"),
        ([ONION_B, ONION_B], f"master.backends[1]: {ONION_B} is listed twice"),
        ([ONION_A], f"master.backends[0]: {ONION_A} is the master address itself"),
    ],
)
def test_bad_backends_are_named(backends: object, expected: str) -> None:
    assert problems(master={"onion_address": ONION_A, "backends": backends}) == (expected,)


def test_backend_with_bad_checksum_is_named() -> None:
    bad = ONION_B[:10] + ("a" if ONION_B[10] != "a" else "b") + ONION_B[11:]
    (found,) = problems(master={"backends": [bad]})
    assert found.startswith("master.backends[0]: ")
    assert "checksum" in found


def test_backend_max_age_must_exceed_the_poll_interval() -> None:
    assert problems(master={"backend_poll_secs": 60, "backend_max_age_secs": 60}) == (
        "master.backend_max_age_secs: must be more than master.backend_poll_secs (60), got 60",
    )
    assert problems(master={"backend_poll_secs": 0}) == (
        "master.backend_poll_secs: must be > 0, got 0",
    )
