"""The offline commands, driven through rustbalance.cli.main.main([...])."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import pytest
from stem.descriptor.hidden_service import HiddenServiceDescriptorV3

from rustbalance.cli.main import main
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.descriptor.client_auth import x25519_public
from rustbalance.descriptor.parser import decode_descriptor

# The instance descriptors are built at helpers.NOW; the CLI is pointed there with --now.
from tests.descriptor.helpers import (
    NOW,
    PERIOD_LENGTH,
    TIME_PERIOD,
    blinded_for,
    make_descriptor,
    make_key,
)


def test_keygen_writes_a_private_seed_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "master.key"
    assert main(["keygen", "--out", str(out)]) == 0
    address = capsys.readouterr().out.strip()
    assert address.endswith(".onion") and len(address) == 62
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert IdentityKey.from_seed(out.read_bytes()).onion_address == address
    before = out.read_bytes()
    assert main(["keygen", "--out", str(out)]) == 2  # a usage problem (cli/main.py)
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before

    assert main(["debug", "show-onion", "--key", str(out)]) == 0
    assert capsys.readouterr().out == address + "\n"


def _write_instance(tmp_path: Path, seed: int, n_points: int) -> tuple[str, Path]:
    key = make_key(seed)
    text, _ = make_descriptor(key, n_points, seed=seed, flow_control="1-2 31")
    path = tmp_path / f"instance{seed}.desc"
    path.write_text(text)
    return key.onion_address, path


def test_decode_descriptor_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address, path = _write_instance(tmp_path, 11, 3)
    assert (
        main(["debug", "decode-descriptor", "--address", address, "--now", str(NOW), str(path)])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["revision_counter"] == 42
    assert data["lifetime_minutes"] == 180
    assert data["flow_control"] == "1-2 31"
    assert data["pow_params"] is None
    assert data["time_period"] == TIME_PERIOD
    assert len(data["intro_points"]) == 3
    first = data["intro_points"][0]
    assert first["link_specifiers"][0] == {"type": "ipv4", "address": "127.0.0.1", "port": 5000}
    assert len(base64.b64decode(first["auth_key"])) == 32


def test_decode_descriptor_from_stdin_and_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, path = _write_instance(tmp_path, 12, 1)
    other = make_key(99).onion_address
    assert (
        main(["debug", "decode-descriptor", "--address", other, "--now", str(NOW), str(path)]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blinded key" in err

    class FakeStdin:
        buffer = io.BytesIO(path.read_bytes().replace(b"\n", b"\r\n"))

    monkeypatch.setattr("sys.stdin", FakeStdin)
    assert main(["debug", "decode-descriptor", "--address", address, "--now", str(NOW), "-"]) == 0
    assert json.loads(capsys.readouterr().out)["revision_counter"] == 42

    garbage = tmp_path / "garbage"
    garbage.write_text("hs-descriptor 3\ngarbage\n")
    assert main(["debug", "decode-descriptor", "--address", address, str(garbage)]) == 1
    assert capsys.readouterr().err.startswith("rustbalance: error: ")


def test_build_descriptor_merges_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    master = make_key(1)
    key_file = tmp_path / "master.key"
    write_seed_key_file(master, key_file)
    instances = [_write_instance(tmp_path, seed, 15) for seed in (21, 22)]
    argv = ["debug", "build-descriptor", "--key", str(key_file), "--now", str(NOW)]
    for address, path in instances:
        argv += ["--instance", f"{address}={path}"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    decoded = decode_descriptor(
        text, master.onion_address, now=NOW, period_length=PERIOD_LENGTH, time_periods=[TIME_PERIOD]
    )
    assert len(decoded.intro_points) == 20  # 15 + 15 capped at 20, fair share 10 + 10
    assert decoded.flow_control == "1-2 31"
    assert decoded.blinded_key == blinded_for(master).public_key
    # stem (independent decoder) agrees.
    stem_inner = HiddenServiceDescriptorV3(text.encode(), validate=True).decrypt(
        master.onion_address
    )
    assert len(stem_inner.introduction_points) == 20


def test_build_descriptor_next_period_and_client_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    master = make_key(2)
    key_file = tmp_path / "master.key"
    write_seed_key_file(master, key_file)
    address, path = _write_instance(tmp_path, 23, 2)
    client_secret = os.urandom(32)
    auth = tmp_path / "alice.auth"
    pub = base64.b32encode(x25519_public(client_secret)).decode().rstrip("=")
    auth.write_text(f"descriptor:x25519:{pub}\n")
    argv = [
        "debug",
        "build-descriptor",
        "--key",
        str(key_file),
        "--now",
        str(NOW),
        "--period",
        "next",
        "--client-auth",
        str(auth),
        "--instance",
        f"{address}={path}",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    decoded = decode_descriptor(
        text,
        master.onion_address,
        now=NOW,
        period_length=PERIOD_LENGTH,
        time_periods=[TIME_PERIOD + 1],
        client_auth_key=client_secret,
    )
    assert decoded.client_auth and len(decoded.intro_points) == 2
    # The CLI decodes it too, given tor's .auth_private format.
    private = tmp_path / "alice.auth_private"
    secret_b32 = base64.b32encode(client_secret).decode().rstrip("=")
    private.write_text(f"{master.onion_address[:-6]}:descriptor:x25519:{secret_b32}\n")
    desc_file = tmp_path / "master.desc"
    desc_file.write_text(text)
    argv = [
        "debug",
        "decode-descriptor",
        "--address",
        master.onion_address,
        "--now",
        str(NOW + 24 * 3600),
        "--client-auth-key",
        str(private),
        str(desc_file),
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["client_authorization"] is True


def test_build_descriptor_rejects_a_bad_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "master.key"
    write_seed_key_file(make_key(3), key_file)
    _, path = _write_instance(tmp_path, 24, 1)
    wrong = make_key(25).onion_address
    argv = ["debug", "build-descriptor", "--key", str(key_file), "--now", str(NOW)]
    assert main([*argv, "--instance", f"{wrong}={path}"]) == 1
    assert f"instance {wrong}" in capsys.readouterr().err
    assert main([*argv, "--instance", "no-equals-sign"]) == 2  # a usage problem
    assert "ADDR=DESCRIPTOR_FILE" in capsys.readouterr().err


def _client_auth_descriptor(tmp_path: Path, client_secret: bytes) -> tuple[str, Path]:
    """A master descriptor readable with ``client_secret`` (built by the CLI)."""
    master = make_key(4)
    key_file = tmp_path / "master.key"
    write_seed_key_file(master, key_file)
    address, path = _write_instance(tmp_path, 26, 2)
    auth = tmp_path / "alice.auth"
    pub = base64.b32encode(x25519_public(client_secret)).decode().rstrip("=")
    auth.write_text(f"descriptor:x25519:{pub}\n")
    argv = ["debug", "build-descriptor", "--key", str(key_file), "--now", str(NOW)]
    argv += ["--client-auth", str(auth), "--instance", f"{address}={path}"]
    desc = tmp_path / "master.desc"
    with pytest.MonkeyPatch.context() as patch:
        out = io.StringIO()
        patch.setattr("sys.stdout", out)
        assert main(argv) == 0
    desc.write_text(out.getvalue())
    return master.onion_address, desc


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # arti crates/tor-keymgr/testdata/bob.auth_private: auth type "notdescriptor".
        ("{addr}:notdescriptor:x25519:{key}", "auth type must be 'descriptor'"),
        # A fifth field in front: tor and arti both need exactly 4.
        ("extra:{addr}:descriptor:x25519:{key}", "4 fields"),
        # No address: 3 fields.
        ("descriptor:x25519:{key}", "4 fields"),
        # tor src/test/test_hs_client.c test_parse_auth_file_content: all-zeroes key.
        ("{addr}:descriptor:x25519:" + "a" * 52, "all zero"),
    ],
    ids=["wrong-auth-type", "five-fields", "three-fields", "all-zero-key"],
)
def test_decode_descriptor_refuses_auth_private_files_tor_and_arti_reject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    """Each of these held a key that decrypts the descriptor (or the zero key), and the old
    reader took whatever followed the first ``descriptor:x25519:``; tor's
    ``parse_auth_file_content`` (hs_client.c) and arti's ``parse_client_keypair``
    (tor-keymgr ctor/client.rs) refuse them, so must we, with the reason."""
    client_secret = bytes(range(1, 33))
    master, desc = _client_auth_descriptor(tmp_path, client_secret)
    key = base64.b32encode(client_secret).decode().rstrip("=").lower()
    bad = tmp_path / "alice.auth_private"
    bad.write_text(line.format(addr=master.removesuffix(".onion"), key=key) + "\n")
    argv = ["debug", "decode-descriptor", "--address", master, "--now", str(NOW)]
    argv += ["--client-auth-key", str(bad), str(desc)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"client auth key file {bad}" in err and reason in err
    assert key not in err.lower()
    # The same key in tor's format decrypts it.
    good = tmp_path / "good.auth_private"
    good.write_text(f"{master.removesuffix('.onion')}:descriptor:x25519:{key}\n")
    argv[-2] = str(good)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["client_authorization"] is True
    # A valid file for another service is named as such.
    other = make_key(5).onion_address
    good.write_text(f"{other.removesuffix('.onion')}:descriptor:x25519:{key}\n")
    assert main(argv) == 2
    assert f"is for {other}, not {master}" in capsys.readouterr().err
