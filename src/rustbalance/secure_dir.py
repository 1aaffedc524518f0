"""Opening a folder without being led somewhere else by what another user planted.

Where another user can write (tor's ``/var/lib/tor`` in system mode, a shared ``/tmp``), any
name may be a symlink, and a path is only a request: between a check and a use the name can
be swapped. So a folder is opened once, component by component from ``/``, each with
``O_NOFOLLOW|O_DIRECTORY`` relative to the one before (``openat``); the caller then works
relative to the descriptor it got (files through :mod:`rustbalance.atomic_file` with
``dir_fd=``, ``fchown``/``fchmod`` on its own descriptors), never by path again.

A symlink met on the way is followed only where nobody but root and this process's user can
change the folder that holds it (owned by either, not writable by group or others): an
operator's ``/var/lib/rustbalance -> /srv/rb`` works, a link planted by the tor user in its own
folder does not (:class:`~rustbalance.errors.UnsafePathError`). Like the kernel, at most
:data:`MAX_SYMLINKS` links are followed.

Blocking I/O of a few system calls; asyncio callers accept that, as for the atomic writer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from rustbalance.errors import UnsafePathError

__all__ = [
    "MAX_SYMLINKS",
    "ensure_dir",
    "ensured_dir",
    "open_dir",
    "opened_dir",
    "writable_by_others",
]

# Linux's MAXSYMLINKS (namei.c): the same bound for a walk done by hand.
MAX_SYMLINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def writable_by_others(info: os.stat_result) -> bool:
    """True if someone besides root and this process's user may add, remove or rename
    entries of the folder described by ``info``."""
    foreign_owner = info.st_uid not in (0, os.geteuid())
    return foreign_owner or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def open_dir(path: str | os.PathLike[str], *, create_mode: int | None = None) -> int:
    """A descriptor of the folder ``path`` (absolute), walked as the module doc says.

    With ``create_mode``, missing folders are created with that mode (``mkdirat``, like
    ``mkdir -p``; the umask may narrow it, so callers ``fchmod`` what they need). Raises
    :class:`UnsafePathError` for a symlink in a folder others can write, OSError otherwise
    (``ENOENT``, ``ENOTDIR``, ``ELOOP`` after :data:`MAX_SYMLINKS`...). The caller closes it.
    """
    target = PurePosixPath(os.fspath(path))
    if not target.is_absolute():
        raise ValueError(f"{target}: not an absolute path")
    todo = list(target.parts[1:])
    walked = PurePosixPath("/")
    fd = os.open("/", _DIR_FLAGS)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            try:
                child = _open_child(name, fd, create_mode)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(info.st_mode):
                    raise
                if writable_by_others(os.fstat(fd)):
                    raise UnsafePathError(
                        f"{walked / name} is a symbolic link in {walked}, which another user "
                        "can change: refusing to follow it"
                    ) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(target)) from None
                link = PurePosixPath(os.readlink(name, dir_fd=fd))
                if link.is_absolute():
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                    walked = PurePosixPath("/")
                    todo = [*link.parts[1:], *todo]
                else:
                    todo = [*link.parts, *todo]
                continue
            os.close(fd)
            fd = child
            walked = PurePosixPath(os.path.normpath(walked / name))
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_child(name: str, fd: int, create_mode: int | None) -> int:
    """Open the folder ``name`` in ``fd`` without following a symlink; with ``create_mode``,
    create it first if missing (``mkdir -p``: each one relative to its opened parent)."""
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError:
        if create_mode is None:
            raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, create_mode, dir_fd=fd)
    return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)


@contextlib.contextmanager
def opened_dir(path: str | os.PathLike[str], *, create_mode: int | None = None) -> Iterator[int]:
    """:func:`open_dir` as a context manager that closes the descriptor."""
    fd = open_dir(path, create_mode=create_mode)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_dir(
    path: str | os.PathLike[str],
    *,
    mode: int = 0o700,
    owner: tuple[int, int] | None = None,
) -> int:
    """Open (creating if missing) the folder ``path`` and give it ``mode`` and, if given,
    ``owner`` (uid, gid), on its descriptor. Only a folder this process's user or ``owner``
    owns is accepted (:class:`UnsafePathError` names the owner otherwise). Returns the
    descriptor; the caller closes it."""
    fd = open_dir(path, create_mode=mode)
    try:
        info = os.fstat(fd)
        allowed = {os.geteuid(), *((owner[0],) if owner is not None else ())}
        if info.st_uid not in allowed:
            raise UnsafePathError(
                f"{Path(path)} is owned by uid {info.st_uid}, not by uid "
                + " or ".join(str(uid) for uid in sorted(allowed))
            )
        if owner is not None and (info.st_uid, info.st_gid) != owner:
            os.fchown(fd, *owner)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def ensured_dir(
    path: str | os.PathLike[str], *, mode: int = 0o700, owner: tuple[int, int] | None = None
) -> Iterator[int]:
    """:func:`ensure_dir` as a context manager that closes the descriptor."""
    fd = ensure_dir(path, mode=mode, owner=owner)
    try:
        yield fd
    finally:
        os.close(fd)
