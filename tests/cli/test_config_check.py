"""`rustbalance config check` checks the key files the config names, like `nginx -t`, and
that a cluster node is admitted with its node key (issue 16).

Real files with real modes; every file is read by the daemon's own loader, so a config that
passes the check gets past the daemon's start-up checks of the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rustbalance.cli.main import main
from rustbalance.cluster.authority import Revocation
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.identity import NodeKey, write_node_key
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wireguard import generate_private_key
from rustbalance.config.identity_mode import SHARED_CLUSTER_PROBLEM
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.node.startup import StartupError, load_node
from rustbalance.testnet.etcd_cluster import TestPki
from tests.trust import OTHER_MASTER, admit_keyless_node, now_ms, record, signed

EXIT_CONFIG = 2  # cli/main.py: a configuration problem


class Node:
    """A config folder as `rustbalance init` leaves it: every secret file 0600."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = IdentityKey.generate(os.urandom)
        self.master = root / "master.key"
        write_seed_key_file(self.key, self.master)
        self.node_key = NodeKey.generate()
        self.node_key_path = root / "node.key"
        write_node_key(self.node_key_path, self.node_key)
        self.wg_key = self.secret("wireguard.key", generate_private_key() + "\n")
        self.state = root / "state"
        self.doc: dict[str, dict[str, Any]] = {
            "node": {
                "id": "node-a",
                "state_dir": str(self.state),
                "node_key_path": str(self.node_key_path),
            },
            "master": {
                "identity_key_path": str(self.master),
                "onion_address": self.key.onion_address,
            },
            "target": {"address": "127.0.0.1:8000"},
            "tor": {"mode": "managed", "data_dir": str(root / "state" / "tor")},
            "coordination": {"listen": "10.99.0.1:51821"},
            "wireguard": {
                "enabled": True,
                "private_key_path": str(self.wg_key),
                "address": "10.99.0.1/24",
                "endpoint": "203.0.113.5:51820",
            },
            "join": {"enabled": True},
        }

    def secret(self, name: str, text: str) -> Path:
        path = self.root / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return path

    def keyless(self) -> None:
        """A node that joined without the master key: an instance that never publishes, in a
        cluster (its seed peer), with the master address only."""
        self.doc["master"] = {"onion_address": self.key.onion_address}
        self.doc["node"].update(identity_mode="instance", publisher_eligible=False)
        self.doc["coordination"]["peers"] = ["10.99.0.2:51821"]
        del self.doc["join"]

    def check(self) -> int:
        config = self.root / "config.toml"
        config.write_text(tomli_w.dumps(self.doc))
        return main(["config", "check", str(config)])


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_complete_node_passes(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert node.check() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("config.toml: ok")
    assert not node.state.exists()  # nothing signed into a members file, nothing created


def test_a_missing_master_key_is_named(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.master.unlink()
    assert node.check() == EXIT_CONFIG
    lines = errors(capsys)
    config = node.root / "config.toml"
    assert lines == [
        f"{config}: master key {node.master}: cannot read: No such file or directory",
        f"{config}: 1 problem",
    ]


@pytest.mark.parametrize(
    ("attribute", "loader"), [("master", "master key"), ("node_key_path", "node key")]
)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=lambda mode: f"{mode:04o}")
def test_a_key_file_others_can_read_is_refused(
    node: Node, capsys: pytest.CaptureFixture[str], attribute: str, loader: str, mode: int
) -> None:
    path: Path = getattr(node, attribute)
    path.chmod(mode)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert f"{loader} {path}: mode {mode:04o} lets others read it; run: chmod 600 {path}" in (
        problem
    )


def test_a_master_key_holder_without_a_node_key_is_fine(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon makes it at its first start and admits itself; the check creates nothing.
    node.node_key_path.unlink()
    assert node.check() == 0, errors(capsys)
    assert not node.node_key_path.exists()


def test_a_node_without_the_master_key_must_be_admitted(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.keyless()
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert (
        f"node node-a is not admitted to the cluster with its node key {node.node_key.fingerprint}"
        in problem
    )
    assert "rustbalance join" in problem
    # As `rustbalance join` leaves it: a new node key and its master-signed record.
    node.node_key_path.unlink()
    admit_keyless_node(
        node.key,
        "node-a",
        key_path=node.node_key_path,
        state_dir=node.state,
        coordination="10.99.0.1:51821",
        priority=20,
    )
    assert node.check() == 0, errors(capsys)
    node.node_key_path.unlink()
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert f"{node.node_key_path} does not exist: node node-a is not admitted" in problem


def test_a_revoked_node_key_is_named(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    membership = Membership(node.key.public_key)
    at = now_ms()
    gone = Revocation("node-a", node.node_key.public, at, "node-b")
    membership.apply(signed(gone, node.key), at)
    node.state.mkdir(mode=0o700)
    (node.state / MEMBERS_FILE_NAME).write_text(membership.to_json())
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert "node node-a: cannot admit itself" in problem and "was revoked" in problem


def test_a_readable_wireguard_key_is_refused(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.wg_key.chmod(0o644)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert "wireguard.private_key_path:" in problem and "must not be readable by others" in problem


def test_a_missing_wireguard_or_instance_key_is_fine(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # The daemon creates both when they are missing; the check must not (nor complain).
    node.wg_key.unlink()
    node.doc["node"]["identity_mode"] = "instance"
    node.doc["node"]["instance_key_path"] = str(node.root / "keys" / "instance.key")
    assert node.check() == 0, errors(capsys)
    assert not node.wg_key.exists()
    assert not (node.root / "keys").exists()


def test_an_exposed_instance_key_is_refused(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    instance = node.root / "instance.key"
    write_seed_key_file(IdentityKey.generate(os.urandom), instance)
    instance.chmod(0o644)
    node.doc["node"]["identity_mode"] = "instance"
    node.doc["node"]["instance_key_path"] = str(instance)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert problem.endswith(
        f"node.instance_key_path: instance key {instance}: mode 0644 "
        f"lets others read it; run: chmod 600 {instance}"
    )


def test_the_wrong_master_key_and_a_corrupt_one_are_named(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    other = IdentityKey.generate(os.urandom)
    node.master.unlink()
    write_seed_key_file(other, node.master)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert f"is for {other.onion_address}, but master.onion_address is" in problem
    node.master.write_bytes(b"\x00" * 31)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert "master key" in problem


def test_every_problem_is_reported_at_once(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.node_key_path.chmod(0o644)
    node.wg_key.write_text("not base64\n")
    instance = node.root / "instance.key"
    instance.write_bytes(b"\x00" * 7)
    instance.chmod(0o600)
    node.doc["node"]["identity_mode"] = "instance"
    node.doc["node"]["instance_key_path"] = str(instance)
    assert node.check() == EXIT_CONFIG
    lines = errors(capsys)
    assert len(lines) == 3 + 1, lines
    assert lines[-1].endswith(": 3 problems")


def test_a_symlinked_node_key_is_refused(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    # The daemon opens keys with O_NOFOLLOW; the check must say so before it starts.
    real = node.root / "elsewhere.key"
    node.node_key_path.rename(real)
    node.node_key_path.symlink_to(real)
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert f"node key {node.node_key_path}: cannot read" in problem


# -- the etcd backend's TLS files (issue 20) ----------------------------------------------------


@pytest.fixture(scope="module")
def etcd_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    pki = TestPki(tmp_path_factory.mktemp("etcd-pki"))
    pki.client("node-a")
    pki.client("node-b")
    return pki


def etcd_node(node: Node, pki: TestPki) -> dict[str, Path]:
    """The node with the etcd backend: its CA, certificate and key copied into its folder."""
    who = pki.client("node-a")
    files = {
        "ca_path": node.root / "etcd-ca.pem",
        "cert_path": node.root / "etcd-node-a.pem",
        "key_path": node.root / "etcd-node-a-key.pem",
    }
    files["ca_path"].write_bytes(pki.ca_path.read_bytes())
    files["cert_path"].write_bytes(who.cert_path.read_bytes())
    node.secret(files["key_path"].name, who.key_path.read_text())
    node.doc["coordination"] = {"backend": "etcd"}
    node.doc["join"] = {"enabled": False}
    node.doc["etcd"] = {"endpoints": ["127.0.0.1:2379"], **{k: str(v) for k, v in files.items()}}
    return files


def test_an_etcd_node_with_usable_files_passes(
    node: Node, etcd_pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    etcd_node(node, etcd_pki)
    assert node.check() == 0, errors(capsys)
    assert "multi-node (etcd, 1 endpoint)" in capsys.readouterr().out


def test_every_unusable_etcd_file_is_named(
    node: Node, etcd_pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    files = etcd_node(node, etcd_pki)
    files["ca_path"].unlink()
    files["cert_path"].write_text("not a certificate\n")
    files["key_path"].chmod(0o644)
    assert node.check() == EXIT_CONFIG
    lines = errors(capsys)
    config = node.root / "config.toml"
    key = files["key_path"]
    assert lines == [
        f"{config}: etcd CA {files['ca_path']}: cannot read: No such file or directory",
        f"{config}: etcd client certificate {files['cert_path']}: not a PEM file",
        f"{config}: etcd client key {key}: mode 0644 lets others read it; run: chmod 600 {key}",
        f"{config}: 3 problems",
    ]


def test_an_etcd_key_of_another_certificate_is_refused(
    node: Node, etcd_pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    files = etcd_node(node, etcd_pki)
    other = etcd_pki.client("node-b")
    files["key_path"].write_bytes(other.key_path.read_bytes())
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert problem.endswith(
        f"etcd client key {files['key_path']}: does not belong to the certificate "
        f"{files['cert_path']} (CN node-a)"
    )
    assert other.key_path.read_text().splitlines()[1] not in problem


def test_shared_mode_in_a_cluster_is_refused_in_one_line(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14: ``shared`` with 2+ nodes loses every intro point at tor's descriptor
    rotation; `config check` says so in one line that names the fix (exit 2), as `run` does."""
    node.doc["node"]["identity_mode"] = "shared"
    assert node.check() == EXIT_CONFIG
    lines = errors(capsys)
    config = node.root / "config.toml"
    assert lines == [f"{config}: {SHARED_CLUSTER_PROBLEM}", f"{config}: 1 problem"]
    # Left out, the same node runs instance mode (its key is generated at start).
    del node.doc["node"]["identity_mode"]
    assert node.check() == 0, errors(capsys)


def _saved_members(node: Node) -> Node:
    """A config without peers, [join] or [wireguard], whose earlier run admitted another
    member (the members file: master-signed records)."""
    node.doc.pop("join")
    node.doc.pop("wireguard")
    node.doc["coordination"] = {"listen": "127.0.0.1:51821"}
    node.state.mkdir(mode=0o700)
    membership = Membership(node.key.public_key)
    at = now_ms()
    membership.apply(signed(record("node-b", coordination="127.0.0.1:51899"), node.key), at)
    (node.state / MEMBERS_FILE_NAME).write_text(membership.to_json())
    return node


def test_members_saved_by_an_earlier_run_make_a_cluster(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node = _saved_members(node)
    assert node.check() == 0, errors(capsys)  # left out: instance, as in any cluster
    capsys.readouterr()
    node.doc["node"]["identity_mode"] = "shared"
    assert node.check() == EXIT_CONFIG
    (problem, _summary) = errors(capsys)
    assert problem.endswith(
        f"{SHARED_CLUSTER_PROBLEM} (members admitted in an earlier run make it a cluster)"
    )
    (node.state / MEMBERS_FILE_NAME).unlink()  # alone after all: shared is fine
    assert node.check() == 0, errors(capsys)


def test_a_record_of_another_master_makes_no_cluster(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only records the master signed count: a members file of another master is ignored."""
    node = _saved_members(node)
    other = Membership(OTHER_MASTER.public_key)
    other.apply(signed(record("node-b"), OTHER_MASTER), now_ms())
    (node.state / MEMBERS_FILE_NAME).write_text(other.to_json())
    node.doc["node"]["identity_mode"] = "shared"
    assert node.check() == 0, errors(capsys)


def test_the_daemon_takes_instance_mode_from_saved_members_and_refuses_shared(
    node: Node,
) -> None:
    node = _saved_members(node)
    path = node.root / "config.toml"
    path.write_text(tomli_w.dumps(node.doc))
    config, identity = load_node(path)
    assert config.identity_mode == identity.mode == "instance"
    assert identity.service_key != node.key  # tor hosts the node's own key
    node.doc["node"]["identity_mode"] = "shared"
    path.write_text(tomli_w.dumps(node.doc))
    with pytest.raises(StartupError) as info:
        load_node(path)
    assert info.value.exit_code == EXIT_CONFIG
    assert SHARED_CLUSTER_PROBLEM in str(info.value) and "\n" not in str(info.value)
