"""node/coordination.py: the backend is chosen by ``[coordination] backend``, its files are
start-up errors (exit 2), and both adapters show the same status and fencing surface.

No etcd server here: the etcd adapter is checked before it ever reached etcd (its view is
empty, its lease not granted); tests/etcd and tests/node_e2e/test_etcd_cluster.py run it
against a real cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rustbalance.config import parse_config
from rustbalance.config.schema import Config
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.node.coordination import (
    EtcdCoordination,
    EtcdLink,
    UdpCoordination,
    start_coordination,
)
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.startup import EXIT_CONFIG, StartupError
from rustbalance.testnet.etcd_cluster import TestPki
from tests.node.fakes import ManualClock, intro_points

BASE = (
    '[node]\nid = "node-a"\nstate_dir = "state"\n'
    '[master]\nidentity_key_path = "master.key"\n'
    '[target]\naddress = "127.0.0.1:8000"\n[tor]\n'
)


def etcd_config(tmp_path: Path, pki: TestPki, **paths: Path) -> Config:
    client = pki.client("node-a")
    files = {"ca_path": pki.ca_path, "cert_path": client.cert_path, "key_path": client.key_path}
    files.update(paths)
    text = BASE + (
        '[coordination]\nbackend = "etcd"\n[etcd]\n'
        'endpoints = ["127.0.0.1:2379", "127.0.0.2:2379"]\nlease_ttl_secs = 6\n'
        + "".join(f'{key} = "{value}"\n' for key, value in files.items())
    )
    return parse_config(text, tmp_path)


def master_identity(tmp_path: Path) -> NodeIdentity:
    """The master key in the config's ``master.key`` (a holder admits itself: embedded)."""
    key = IdentityKey.generate(os.urandom)
    write_seed_key_file(key, tmp_path / "master.key")
    return NodeIdentity("shared", key.onion_address, key, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


async def test_the_etcd_backend_is_chosen_and_starts_as_a_standby(
    tmp_path: Path, pki: TestPki
) -> None:
    config = etcd_config(tmp_path, pki)
    coordination = start_coordination(config, master_identity(tmp_path), ManualClock())
    assert isinstance(coordination, EtcdCoordination)
    assert coordination.mesh_handle() is None  # joins and the mesh are the embedded's
    facts = coordination.facts()
    # Never revoked: etcd knows a node by its TLS certificate, not by an admission record.
    assert (facts.is_multi, facts.holds_lease, dict(facts.peer_intro_points), facts.revoked) == (
        False,
        False,
        {},
        False,
    )
    status = coordination.status()
    assert status.backend == "etcd"
    assert status.election_role == "standby"
    assert status.publisher is None
    assert status.etcd == EtcdLink(
        endpoint="127.0.0.1:2379", connected=False, registered=False, last_error=None
    )
    assert status.counters["fencing_passed"] == 0
    # Not holding the lease: no, without asking etcd (there is none here to ask).
    assert await coordination.may_publish() is False
    assert coordination.status().counters["fencing_refused"] == 1
    # Our own intro points become our member record (written once a lease exists).
    coordination.report_intro_points(intro_points(2))
    record = coordination.backend.membership.desired_record
    assert record is not None and b'"node_id":"node-a"' in record


def test_the_embedded_backend_is_the_default(tmp_path: Path) -> None:
    identity = master_identity(tmp_path)
    config = parse_config(BASE + '[coordination]\npeers = ["127.0.0.1:9"]\n', tmp_path)
    coordination = start_coordination(config, identity, ManualClock())
    assert isinstance(coordination, UdpCoordination)
    assert coordination.mesh_handle() is coordination.coordinator
    status = coordination.status()
    assert status.backend == "embedded"
    assert status.etcd is None


async def test_the_embedded_backend_never_fences(tmp_path: Path) -> None:
    identity = master_identity(tmp_path)
    config = parse_config(BASE + '[coordination]\npeers = ["127.0.0.1:9"]\n', tmp_path)
    # Its election already decided who publishes; there is no quorum to ask.
    assert await start_coordination(config, identity, ManualClock()).may_publish() is True


@pytest.mark.parametrize("problem", ["missing", "exposed", "symlink", "not pem"])
def test_an_unusable_etcd_file_is_a_config_error_naming_it(
    tmp_path: Path, pki: TestPki, problem: str
) -> None:
    key = tmp_path / "node-key.pem"
    source = pki.client("node-a").key_path
    if problem == "exposed":
        key.write_bytes(source.read_bytes())
        key.chmod(0o644)
    elif problem == "symlink":
        key.symlink_to(source)
    elif problem == "not pem":
        key.write_bytes(b"garbage")
        key.chmod(0o600)
    config = etcd_config(tmp_path, pki, key_path=key)
    with pytest.raises(StartupError) as raised:
        start_coordination(config, master_identity(tmp_path), ManualClock())
    assert raised.value.exit_code == EXIT_CONFIG
    message = str(raised.value)
    assert message.startswith(f"etcd client key {key}: ")
    expected = {
        "missing": "cannot read",
        "exposed": f"mode 0644 lets others read it; run: chmod 600 {key}",
        "symlink": "cannot read",  # never followed
        "not pem": "not a PEM file",
    }[problem]
    assert expected in message
    # The key's bytes never appear in the message.
    assert source.read_text().splitlines()[1] not in message
