"""Writing a file so that readers see the old content or the new, never a mix or nothing.

The one way this project replaces a file (keys, tor's onion-service files, the torrc and its
fragment, the members file, node keys, WireGuard state, the configs of ``init``/``join``):

1. a temporary file is created next to the target with ``O_CREAT | O_EXCL | O_NOFOLLOW``, under
   a random name, relative to the target's folder opened once: a symlink (or anything else)
   planted under that name makes the create fail instead of writing through it;
2. its mode is set before the first byte is written (a secret is never readable by others,
   not even for a moment), then the data is written and fsynced;
3. it is renamed onto the target (atomic in POSIX; a symlink at the target's name is
   replaced, never followed) - or, for ``overwrite=False``, hard-linked to it, which fails if
   the target exists - and the folder is fsynced, so the rename survives a power cut;
4. on any error (full disk, a signal) the temporary file is removed and the error raised.

Blocking I/O of a few small files; asyncio callers accept that, as they do for logging.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from types import TracebackType

__all__ = ["StagedFile", "stage_file", "write_file_atomic"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Names are 48 random bits: a collision (or a planted name) only costs another try.
_ATTEMPTS = 8


class StagedFile:
    """A complete, fsynced temporary file next to ``path``, waiting to replace it.

    :meth:`commit` puts it in place; :meth:`discard` (or leaving the ``with`` block without
    a commit) removes it. Several staged files let a caller write all or nothing.
    """

    def __init__(self, path: Path, dir_fd: int, temp_name: str) -> None:
        self.path = path
        self._dir_fd: int | None = dir_fd
        self._temp_name = temp_name

    def commit(self, *, overwrite: bool = True) -> None:
        """Rename the file onto :attr:`path`; with ``overwrite=False`` raise FileExistsError
        (and discard it) if something already has that name."""
        dir_fd = self._open_dir_fd()
        try:
            if overwrite:
                os.replace(self._temp_name, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                # link(2) never replaces: a target created meanwhile is an error, not lost.
                os.link(
                    self._temp_name,
                    self.path.name,
                    src_dir_fd=dir_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
                os.unlink(self._temp_name, dir_fd=dir_fd)
            # The rename is durable only once the folder's entry is on disk.
            os.fsync(dir_fd)
        except BaseException:
            self.discard()
            raise
        self._close()

    def discard(self) -> None:
        """Remove the temporary file (nothing happens to :attr:`path`)."""
        if self._dir_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._temp_name, dir_fd=self._dir_fd)
        self._close()

    def _open_dir_fd(self) -> int:
        if self._dir_fd is None:
            raise ValueError(f"{self.path}: already committed or discarded")
        return self._dir_fd

    def _close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()


def stage_file(
    path: str | os.PathLike[str],
    data: bytes | str,
    *,
    mode: int,
    owner: tuple[int, int] | None = None,
) -> StagedFile:
    """Write ``data`` (str as UTF-8) to a new temporary file next to ``path`` with ``mode``
    (and ``owner``, uid and gid, when given: root writing for a service user).

    Raises OSError (the temporary file removed) if the folder is missing or not writable,
    the disk is full, or no free temporary name was found.
    """
    target = Path(path)
    content = data.encode("utf-8") if isinstance(data, str) else data
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        temp_name, fd = _create_temp(target.name, dir_fd)
        try:
            try:
                # Exactly ``mode`` (umask may have narrowed the create), and the owner, before
                # any data: the file is never the writer's while it holds some.
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name, dir_fd=dir_fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return StagedFile(target, dir_fd, temp_name)


def _create_temp(name: str, dir_fd: int) -> tuple[str, int]:
    for _ in range(_ATTEMPTS):
        temp_name = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0600 until fchmod: umask can only narrow it.
            return temp_name, os.open(temp_name, _CREATE, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {name} after {_ATTEMPTS} tries")


def write_file_atomic(
    path: str | os.PathLike[str],
    data: bytes | str,
    mode: int = 0o600,
    *,
    overwrite: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).

    ``overwrite=False`` refuses (FileExistsError) to replace an existing file or symlink;
    ``owner`` (uid, gid) is set before the data is written. Raises OSError; nothing but
    ``path`` itself is left changed.
    """
    stage_file(path, data, mode=mode, owner=owner).commit(overwrite=overwrite)
