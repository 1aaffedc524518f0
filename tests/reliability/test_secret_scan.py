"""The log-secret scanner can fail: planted secrets are found in every form, clean logs pass.

The planted files live in a temporary folder outside the session's temp folders (deleted at the
end of each test), so the session-end scan over the whole run does not see them.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance.crypto.keys import IdentityKey, write_hidden_service_dir, write_seed_key_file
from tests.secret_scan import collect_secrets, find_logs, scan_logs


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rb-secret-scan-") as name:
        yield Path(name)


def _write_secret(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _scan(root: Path) -> list[tuple[str, str, str]]:
    found = scan_logs(find_logs([root]), collect_secrets([root]))
    return sorted((h.log.name, h.kind, h.source.name) for h in found)


def test_clean_logs_pass(outside_dir: Path) -> None:
    key = IdentityKey.generate(secrets.token_bytes)
    write_seed_key_file(key, outside_dir / "master.key")
    _write_secret(outside_dir / "cluster.token", secrets.token_hex(32).encode() + b"\n")
    # A log naming the files, the public address and ordinary words is clean.
    (outside_dir / "node.log").write_text(
        f"loaded {outside_dir / 'master.key'} for {key.onion_address}\nall good\n"
    )
    assert _scan(outside_dir) == []


@pytest.mark.parametrize(
    "form",
    ["hex", "HEX", "base64", "urlsafe-base64", "base32", "base32-lower", "raw"],
)
def test_master_seed_is_found_in_every_encoding(outside_dir: Path, form: str) -> None:
    key = IdentityKey.generate(secrets.token_bytes)
    key_file = outside_dir / "master.key"
    write_seed_key_file(key, key_file)
    seed = key_file.read_bytes()
    assert len(seed) == 32
    leaked = {
        "hex": seed.hex().encode(),
        "HEX": seed.hex().upper().encode(),
        "base64": base64.b64encode(seed),
        "urlsafe-base64": base64.urlsafe_b64encode(seed).rstrip(b"="),
        "base32": base64.b32encode(seed),
        "base32-lower": base64.b32encode(seed).lower().rstrip(b"="),
        "raw": seed,
    }[form]
    (outside_dir / "node.log").write_bytes(b"2026-01-01 INFO x: key is " + leaked + b" ok\n")
    assert _scan(outside_dir) == [("node.log", "key", "master.key")]


def test_token_cookie_and_tor_expanded_key_are_found(outside_dir: Path) -> None:
    token = secrets.token_hex(32)
    _write_secret(outside_dir / "cluster.token", token.encode() + b"\n")
    cookie = _write_secret(outside_dir / "control_auth_cookie", secrets.token_bytes(32))
    key = IdentityKey.generate(secrets.token_bytes)
    write_hidden_service_dir(key, outside_dir / "hs")
    tagged = (outside_dir / "hs" / "hs_ed25519_secret_key").read_bytes()
    assert tagged.startswith(b"== ed25519v1-secret: type0 ==") and len(tagged) == 96
    (outside_dir / "a.log").write_text(f"peer said {token}\n")
    (outside_dir / "tor.log").write_text(f"cookie {cookie.read_bytes().hex().upper()}\n")
    # Half of tor's expanded key (the nonce prefix), base64: still a leak.
    (outside_dir / "hs" / "debug.log").write_bytes(base64.b64encode(tagged[64:]) + b"\n")
    assert _scan(outside_dir) == [
        ("a.log", "token", "cluster.token"),
        ("debug.log", "onion service key", "hs_ed25519_secret_key"),
        ("tor.log", "tor control cookie", "control_auth_cookie"),
    ]


def test_repeated_byte_fixtures_are_not_needles(outside_dir: Path) -> None:
    """A fake cookie of 32 zero bytes or a token of one repeated letter (test fixtures, not
    generated secrets) would match any log with a run of zeros; a random one still matches."""
    _write_secret(outside_dir / "control_auth_cookie", bytes(32))
    _write_secret(outside_dir / "cluster.token", b"t" * 43 + b"\n")
    token = secrets.token_hex(32)
    _write_secret(outside_dir / "join.secret", token.encode())
    (outside_dir / "tor.log").write_text(f"digest {'0' * 64} {'t' * 43} {token}\n")
    assert _scan(outside_dir) == [("tor.log", "join secret", "join.secret")]


def test_generic_0600_file_counts_but_public_files_do_not(outside_dir: Path) -> None:
    # The digit is fixed: the generic rule wants letters and digits, and 24 random urlsafe
    # characters have none in 1.7 % of draws (a flaky test otherwise).
    passphrase = "correct-horse-42-" + secrets.token_urlsafe(18)
    _write_secret(outside_dir / "settings.ini", f"secret_value = {passphrase}\n".encode())
    # tor writes its onion address to "hostname" (0600): public, may be logged.
    _write_secret(outside_dir / "hostname", b"a" * 56 + b".onion\n")
    (outside_dir / "x.log").write_text(f"{'a' * 56}.onion {passphrase}\n")
    assert _scan(outside_dir) == [("x.log", "0600 file", "settings.ini")]


def test_a_planted_secret_fails_a_pytest_session(outside_dir: Path) -> None:
    """End to end: a pytest run whose test writes a key and logs it exits non-zero, and the
    report names the log and the kind but never prints the secret."""
    test_file = outside_dir / "test_leak.py"
    test_file.write_text(
        "import os, secrets\n"
        "def test_leak(tmp_path):\n"
        "    seed = secrets.token_bytes(32)\n"
        "    fd = os.open(tmp_path / 'node.key', os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "    os.write(fd, seed); os.close(fd)\n"
        "    (tmp_path / 'node.log').write_text('seed ' + seed.hex())\n"
        "    (tmp_path / 'seed.txt').write_text(seed.hex())\n"
    )
    root = Path(__file__).resolve().parents[2]
    conftest = outside_dir / "conftest.py"
    conftest.write_text("from tests.conftest import *  # noqa: F403\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(outside_dir),
            "--basetemp",
            str(outside_dir / "basetemp"),
            str(test_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=outside_dir,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "1 passed" in output, output
    assert result.returncode == 1, output
    assert "SECRET IN LOG: key from " in output and "node.key appears in " in output, output
    assert "node.log" in output
    seed_hex = next((outside_dir / "basetemp").rglob("seed.txt")).read_text()
    assert seed_hex not in output and seed_hex.upper() not in output
