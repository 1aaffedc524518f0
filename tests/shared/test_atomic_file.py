"""The one atomic-write helper (:mod:`rustbalance.atomic_file`) and that it is the only one.

Real files in a temporary folder; the full-disk case is a real write limit (RLIMIT_FSIZE) in a
child process. Two tests watch system calls through monkeypatched ``os`` functions that call
the real ones: the order of chmod, write, fsync and rename cannot be seen from outside.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rustbalance import atomic_file
from rustbalance.atomic_file import stage_file, write_file_atomic

SRC = Path(atomic_file.__file__).resolve().parent


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_bytes_or_text_with_exactly_the_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        write_file_atomic(tmp_path / "a", "text é\n", 0o644)
        write_file_atomic(tmp_path / "b", b"\x00\xff")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a").read_text(encoding="utf-8") == "text é\n"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    assert (tmp_path / "b").read_bytes() == b"\x00\xff"
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


def test_replaces_an_existing_file_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "peers.json"
    target.write_text("old")
    inode = target.stat().st_ino
    write_file_atomic(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_ino != inode  # a new file renamed over, not rewritten in place


def test_a_symlink_at_the_target_name_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "hs"
    folder.mkdir()
    os.symlink(victim, folder / "ob_config")
    write_file_atomic(folder / "ob_config", "MasterOnionAddress x.onion\n")
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) != 0 and not (folder / "ob_config").is_symlink()
    assert (folder / "ob_config").read_text() == "MasterOnionAddress x.onion\n"


def test_a_symlink_planted_at_the_temp_name_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first temporary name is made predictable and a symlink planted there: the create
    fails on it (O_EXCL | O_NOFOLLOW) and the next name is used."""
    names = iter(["planted", "fresh"])
    monkeypatch.setattr("rustbalance.atomic_file.secrets.token_hex", lambda _n: next(names))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o640)
    os.symlink(victim, tmp_path / ".torrc.planted.tmp")
    write_file_atomic(tmp_path / "torrc", "SocksPort 0\n")
    assert victim.read_text() == "precious"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640
    assert (tmp_path / "torrc").read_text() == "SocksPort 0\n"
    assert (tmp_path / ".torrc.planted.tmp").is_symlink()  # left alone, not ours
    assert leftovers(tmp_path) == [".torrc.planted.tmp"]


def test_gives_up_after_a_bounded_number_of_taken_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rustbalance.atomic_file.secrets.token_hex", lambda _n: "taken")
    (tmp_path / ".f.taken.tmp").write_text("someone else's")
    with pytest.raises(FileExistsError, match="no free temporary name"):
        write_file_atomic(tmp_path / "f", "x")
    assert not (tmp_path / "f").exists()


def test_mode_is_set_before_the_first_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []
    real_write = os.write

    def watching_write(fd: int, data: bytes | memoryview) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr("rustbalance.atomic_file.os.write", watching_write)
    write_file_atomic(tmp_path / "secret", b"k" * 100_000, 0o640)
    assert modes and set(modes) == {0o640}


def test_file_and_folder_are_fsynced_around_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(*args: object, **kwargs: object) -> None:
        calls.append("rename")
        real_replace(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("rustbalance.atomic_file.os.fsync", fsync)
    monkeypatch.setattr("rustbalance.atomic_file.os.replace", replace)
    write_file_atomic(tmp_path / "f", "x")
    assert calls == ["fsync file", "rename", "fsync dir"]


def test_a_full_disk_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    """A real write error: the child may write at most 64 KiB per file (RLIMIT_FSIZE, with
    SIGXFSZ ignored, so write(2) fails with EFBIG)."""
    target = tmp_path / "state.json"
    target.write_text("old content")
    script = textwrap.dedent(
        f"""
        import errno, resource, signal
        from rustbalance.atomic_file import write_file_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            write_file_atomic({str(target)!r}, b"x" * 1_000_000)
        except OSError as exc:
            raise SystemExit(0 if exc.errno == errno.EFBIG else 3)
        raise SystemExit(4)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "old content"
    assert leftovers(tmp_path) == []


def test_no_overwrite_refuses_an_existing_target_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "master.key"
    write_file_atomic(target, b"seed", overwrite=False)
    assert target.read_bytes() == b"seed"
    with pytest.raises(FileExistsError):
        write_file_atomic(target, b"other", overwrite=False)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(FileExistsError):
        write_file_atomic(tmp_path / "dangling", b"other", overwrite=False)
    assert target.read_bytes() == b"seed"
    assert leftovers(tmp_path) == []


def test_a_missing_folder_is_an_error_that_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_file_atomic(tmp_path / "missing" / "f", "x")
    assert list(tmp_path.iterdir()) == []


def test_staged_files_are_all_or_nothing(tmp_path: Path) -> None:
    first = stage_file(tmp_path / "a", "1", mode=0o600)
    with stage_file(tmp_path / "b", "2", mode=0o600):
        assert len(leftovers(tmp_path)) == 2
        assert not (tmp_path / "a").exists()
    # Leaving the block without a commit discarded ``second``.
    first.discard()
    assert list(tmp_path.iterdir()) == []
    with stage_file(tmp_path / "a", "1", mode=0o600) as staged:
        staged.commit(overwrite=False)
    assert (tmp_path / "a").read_text() == "1"
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="already committed"):
        staged.commit()


def _writers(tree: ast.AST) -> Iterator[str]:
    """Calls that replace or create files by name, as the helper does."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else ""
            if name in {"os.replace", "os.rename", "os.link", "tempfile.mkstemp"}:
                yield name
            if name == "os.open" and "O_CREAT" in ast.unparse(node):
                yield name


def test_the_helper_is_the_only_place_that_writes_files_atomically() -> None:
    """Rename-into-place and O_CREAT live in atomic_file.py only (testnet, which builds test
    networks, may write plainly)."""
    found = {
        str(path.relative_to(SRC)): sorted(set(_writers(ast.parse(path.read_text()))))
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "atomic_file.py" and "testnet" not in path.parts
    }
    assert {path: calls for path, calls in found.items() if calls} == {}
