"""rustbalance.secure_dir: folders opened component by component, symlinks followed only
where nobody else can change them (no root needed: "others can write" is a mode here; the
foreign-owner cases, which need a second uid, are in tests/node/test_symlink_traps.py)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from rustbalance.errors import UnsafePathError
from rustbalance.secure_dir import (
    MAX_SYMLINKS,
    ensure_dir,
    ensured_dir,
    open_dir,
    opened_dir,
    writable_by_others,
)


def same_folder(fd: int, path: Path) -> bool:
    a, b = os.fstat(fd), path.stat()
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_a_plain_path_opens_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with opened_dir(tmp_path / "a" / "b") as fd:
        assert same_folder(fd, tmp_path / "a" / "b")


def test_a_symlink_in_a_private_folder_is_followed(tmp_path: Path) -> None:
    """An operator's link (in a folder only root and we can change) is fine."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "abs").symlink_to(tmp_path / "real")
    for name in ("link", "abs"):
        with opened_dir(tmp_path / name) as fd:
            assert same_folder(fd, tmp_path / "real")


def test_a_symlink_in_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (tmp_path / "elsewhere").mkdir()
    (shared / "planted").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match=r"planted is a symbolic link in .*shared"):
        open_dir(shared / "planted" / "deeper")
    # The same link is fine once nobody else can change the folder.
    shared.chmod(0o755)
    with opened_dir(shared / "planted") as fd:
        assert same_folder(fd, tmp_path / "elsewhere")


def test_dot_dot_and_dots_walk_like_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "up").symlink_to("b/..")
    with opened_dir(f"{tmp_path}/a/./b/../b") as fd:
        assert same_folder(fd, tmp_path / "a" / "b")
    with opened_dir(tmp_path / "a" / "up" / "b") as fd:
        assert same_folder(fd, tmp_path / "a" / "b")


def test_a_symlink_loop_ends_after_the_kernels_bound(tmp_path: Path) -> None:
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(OSError) as raised:
        open_dir(tmp_path / "x")
    assert raised.value.errno == errno.ELOOP
    assert MAX_SYMLINKS == 40


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        open_dir(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        open_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="absolute"):
        open_dir("relative/path")


def test_missing_folders_are_created_with_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper"
    with ensured_dir(target, mode=0o700) as fd:
        assert same_folder(fd, target)
    for folder in (tmp_path / "new", target):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # An existing folder gets the mode too, on its descriptor.
    target.chmod(0o755)
    os.close(ensure_dir(target, mode=0o700))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_writable_by_others_reads_owner_and_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    assert not writable_by_others(tmp_path.stat())
    tmp_path.chmod(0o775)
    assert writable_by_others(tmp_path.stat())
    tmp_path.chmod(0o700)
