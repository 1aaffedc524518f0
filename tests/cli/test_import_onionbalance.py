"""``rustbalance import-onionbalance``: configs made by the real ``onionbalance-config``
(PyPI onionbalance 0.2.4, in its own venv) become a RustBalance config for the same master,
the instances as ``[master] backends``; what cannot be translated is refused with the reason
and nothing is written. The end-to-end run on the private Tor network is in
tests/node_e2e/test_import_onionbalance.py."""

from __future__ import annotations

import os
import secrets
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cli.import_onionbalance import parse_onionbalance_config
from rustbalance.cli.init_cmd import CliError
from rustbalance.cli.main import main
from rustbalance.config import load_config
from rustbalance.crypto.keys import IdentityKey, load_identity_key
from tests.cli.onionbalance_tool import fill_instances, generate_config


def _addresses(n: int) -> list[str]:
    return [IdentityKey.generate(secrets.token_bytes).onion_address for _ in range(n)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run of the real onionbalance-config (2 instances), copied by each test."""
    config, (key,) = generate_config(tmp_path_factory.mktemp("ob"))
    return config, key


@pytest.fixture
def ob(generated: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    config, key = generated
    folder = tmp_path / "onionbalance"
    folder.mkdir()
    (folder / "config.yaml").write_text(config.read_text())
    copy = folder / key.name
    copy.write_bytes(key.read_bytes())
    os.chmod(copy, stat.S_IMODE(key.stat().st_mode))
    return folder / "config.yaml", copy


def _import(config: Path, out: Path, *extra: str) -> int:
    argv = ["import-onionbalance", str(config), "--config-dir", str(out)]
    argv += ["--target", "127.0.0.1:8000", "--node-id", "ob-host", "--tor-mode", "managed"]
    argv += ["--state-dir", str(out / "state"), *extra]
    return main(argv)


def test_a_config_made_by_onionbalance_config_is_imported(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, key = ob
    # onionbalance-config writes the key 0600 and names it after the master address.
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    master = load_identity_key(key).onion_address
    assert key.name == master.removesuffix(".onion") + ".key"
    instances = _addresses(2)
    fill_instances(config, [instances[0], instances[1].removesuffix(".onion")])
    out = tmp_path / "etc"
    assert _import(config, out) == 0
    printed = capsys.readouterr().out
    assert master in printed and "node1" in printed and "stop onionbalance" in printed

    copied = out / "master.key"
    assert copied.read_bytes() == key.read_bytes()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["master"] == {
        "identity_key_path": str(copied),
        "onion_address": master,
        "backends": instances,
    }
    # The daemon's own loader takes it, and the key it names is the same master.
    loaded = load_config(str(out / "config.toml"))
    assert loaded.master.backends
    assert load_identity_key(copied).onion_address == master
    assert main(["config", "check", str(out / "config.toml")]) == 0


def test_a_stricter_key_mode_is_kept(ob: tuple[Path, Path], tmp_path: Path) -> None:
    config, key = ob
    fill_instances(config, _addresses(2))
    os.chmod(key, 0o400)
    assert _import(config, tmp_path / "etc") == 0
    assert stat.S_IMODE((tmp_path / "etc" / "master.key").stat().st_mode) == 0o400


def _refused(
    config: Path, out: Path, capsys: pytest.CaptureFixture[str], reason: str, *extra: str
) -> None:
    assert _import(config, out, *extra) == 2
    err = capsys.readouterr().err
    assert reason in err, err
    assert err.count("\n") == 1  # one line
    assert not (out / "config.toml").exists() and not (out / "master.key").exists()


def test_the_placeholders_are_refused(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = ob
    _refused(config, tmp_path / "etc", capsys, "services[0].instances[0]: 'address' is still")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t, a: t.replace(a[0], "expyuzz4wqqyqhjn"), "v2 onion address"),
        (lambda t, a: "REFRESH_INTERVAL: 600\n" + t, "cannot translate top-level key(s) "
         "REFRESH_INTERVAL"),
        (lambda t, a: t.replace("name: node2", "name: node2\n    weight: 3"),
         "services[0].instances[1]: cannot translate key(s) weight"),
        (lambda t, a: t.replace(a[1], a[0]), "is listed twice"),
        (lambda t, a: t.replace(a[0], a[0][:5] + ("a" if a[0][5] != "a" else "b") + a[0][6:]),
         "checksum"),
        (lambda t, a: "services: []\n", "'services' must list at least one service"),
        (lambda t, a: "services:\n- key: x.key\n  instances: []\n", "at least one instance"),
        (lambda t, a: "services: [ {key: 1", "not valid YAML at line 1"),
        (lambda t, a: "- just\n- a list\n", "expected a mapping with 'services'"),
    ],
    ids=["v2", "v2-setting", "unknown-key", "duplicate", "checksum", "no-services",
         "no-instances", "not-yaml", "not-a-mapping"],
)  # fmt: skip
def test_what_cannot_be_translated_is_refused_with_the_reason(
    ob: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: object,
    reason: str,
) -> None:
    config, _ = ob
    addresses = _addresses(2)
    fill_instances(config, addresses)
    config.write_text(edit(config.read_text(), addresses))  # type: ignore[operator]
    _refused(config, tmp_path / "etc", capsys, reason)


def test_the_master_as_an_instance_is_refused(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, key = ob
    fill_instances(config, [load_identity_key(key).onion_address, _addresses(1)[0]])
    _refused(config, tmp_path / "etc", capsys, "is also listed as an instance")


def test_a_key_others_can_read_is_refused(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, key = ob
    fill_instances(config, _addresses(2))
    os.chmod(key, 0o644)
    _refused(config, tmp_path / "etc", capsys, "has mode 0644: others may read it")


def test_an_encrypted_key_is_refused(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PEM key encrypted with a passphrase (onionbalance-config 0.2.4 writes v3 keys
    unencrypted even with -p, but Onionbalance's own loader takes no passphrase either: an
    operator may have encrypted it at rest), re-encrypted here with cryptography."""
    config, key = ob
    fill_instances(config, _addresses(2))
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse battery"),
        )
    )
    _refused(config, tmp_path / "etc", capsys, "is encrypted with a passphrase")


def test_several_services_need_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onionbalance-config -s 2: two masters; one node imports the one it is told."""
    config, keys = generate_config(tmp_path / "ob", 1, "-s", "2")
    fill_instances(config, _addresses(2))
    assert len(keys) == 2
    _refused(config, tmp_path / "etc", capsys, "the config has 2 services")
    second = load_identity_key(keys[1]).onion_address
    assert _import(config, tmp_path / "etc", "--service", second) == 0
    assert (
        tomllib.loads((tmp_path / "etc" / "config.toml").read_text())["master"]["onion_address"]
        == second
    )


def test_nothing_is_overwritten(
    ob: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = ob
    fill_instances(config, _addresses(2))
    out = tmp_path / "etc"
    out.mkdir(mode=0o700)
    (out / "config.toml").write_text("# mine\n")
    assert _import(config, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "config.toml").read_text() == "# mine\n"
    assert not (out / "master.key").exists()


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=60),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["services", "key", "instances", "address",
                                               "name", "x"]), inner, max_size=4),
            max_leaves=12,
        ).map(lambda value: __import__("yaml").safe_dump({"services": value})),
    )
)  # fmt: skip
def test_any_text_gives_services_or_a_clear_error(text: str) -> None:
    try:
        services = parse_onionbalance_config(text)
    except CliError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert services and all(s.instances for s in services)
