"""Which key goes where in the node identity modes (node/identity.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import tomli_w

from rustbalance.config import parse_config
from rustbalance.config.schema import Config
from rustbalance.crypto.keys import IdentityKey, load_identity_key
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.node.identity import (
    load_or_create_instance_key,
    master_key_needed,
    resolve_identity,
)
from tests.config import ONION_B, document
from tests.descriptor.helpers import make_key

MASTER = make_key(1)
INSTANCE = make_key(2)


def _config(node: dict[str, object], master: dict[str, object] | None = None) -> Config:
    return parse_config(tomli_w.dumps(document(node=node, master=master or {})), "/etc/rb")


def test_shared_mode_hosts_the_master_key() -> None:
    config = _config({})
    assert master_key_needed(config)
    identity = resolve_identity(config, MASTER, None)
    assert identity.service_key is MASTER
    assert identity.service_address == identity.master_address == MASTER.onion_address
    assert identity.native_publishes_master


def test_instance_mode_hosts_its_own_key() -> None:
    config = _config({"identity_mode": "instance"})
    identity = resolve_identity(config, MASTER, INSTANCE)
    assert identity.service_address == INSTANCE.onion_address
    assert identity.master_address == MASTER.onion_address
    assert identity.master_public_key == MASTER.public_key
    assert not identity.native_publishes_master


def test_non_eligible_instance_needs_only_the_master_address() -> None:
    config = _config(
        {"identity_mode": "instance", "publisher_eligible": False},
        {"identity_key_path": None, "onion_address": MASTER.onion_address},
    )
    assert not master_key_needed(config)
    identity = resolve_identity(config, None, INSTANCE)
    assert identity.master_key is None
    assert identity.master_address == MASTER.onion_address


@pytest.mark.parametrize(
    ("node", "master", "keys", "message"),
    [
        ({}, {}, (None, None), "master key is required in shared mode"),
        (
            {"identity_mode": "instance"},
            {},
            (None, INSTANCE),
            "required on a publisher-eligible instance",
        ),
        ({"identity_mode": "instance"}, {}, (MASTER, MASTER), "the instance key is the master"),
        (
            {},
            {"onion_address": ONION_B},
            (MASTER, None),
            "but the master key is for",
        ),
        (
            {"identity_mode": "instance"},
            {"backends": [INSTANCE.onion_address]},
            (MASTER, INSTANCE),
            "this node's own instance address",
        ),
    ],
)
def test_wrong_keys_are_named(
    node: dict[str, object],
    master: dict[str, object],
    keys: tuple[IdentityKey | None, IdentityKey | None],
    message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_identity(_config(node, master), *keys)


def test_instance_key_is_generated_0600_in_a_0700_folder_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "instance.key"
    key, created = load_or_create_instance_key(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_identity_key(path).onion_address == key.onion_address
    again, created_again = load_or_create_instance_key(path)
    assert not created_again and again.onion_address == key.onion_address


def test_readable_instance_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "instance.key"
    load_or_create_instance_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(InvalidKeyError, match="lets others read it; run: chmod 600"):
        load_or_create_instance_key(path)


def _write_node_config(tmp_path: Path, node: dict[str, object], master: dict[str, object]) -> Path:
    doc = document(node={"state_dir": str(tmp_path / "state"), **node}, master=master)
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def test_daemon_loads_a_non_eligible_instance_without_any_master_key(tmp_path: Path) -> None:
    from rustbalance.node.startup import load_node

    path = _write_node_config(
        tmp_path,
        {"identity_mode": "instance", "publisher_eligible": False},
        {"identity_key_path": None, "onion_address": MASTER.onion_address},
    )
    _config, identity = load_node(path)
    assert identity.master_key is None
    assert identity.master_address == MASTER.onion_address
    key_file = tmp_path / "state" / "keys" / "instance.key"
    assert load_identity_key(key_file).onion_address == identity.service_address


def test_daemon_refuses_a_readable_instance_key_with_exit_2(tmp_path: Path) -> None:
    from rustbalance.node.startup import StartupError, load_node

    key_file = tmp_path / "instance.key"
    load_or_create_instance_key(key_file)
    os.chmod(key_file, 0o640)
    path = _write_node_config(
        tmp_path,
        {
            "identity_mode": "instance",
            "publisher_eligible": False,
            "instance_key_path": str(key_file),
        },
        {"identity_key_path": None, "onion_address": MASTER.onion_address},
    )
    with pytest.raises(
        StartupError, match=r"node\.instance_key_path: instance key .* chmod 600"
    ) as info:
        load_node(path)
    assert info.value.exit_code == 2


def test_daemon_refuses_a_corrupt_instance_key_with_exit_2(tmp_path: Path) -> None:
    from rustbalance.node.startup import StartupError, load_node

    key_file = tmp_path / "instance.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    path = _write_node_config(
        tmp_path,
        {
            "identity_mode": "instance",
            "publisher_eligible": False,
            "instance_key_path": str(key_file),
        },
        {"identity_key_path": None, "onion_address": MASTER.onion_address},
    )
    with pytest.raises(StartupError, match=r"node\.instance_key_path") as info:
        load_node(path)
    assert info.value.exit_code == 2
