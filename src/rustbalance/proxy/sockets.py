"""Stream and socket helpers of the proxy's front door (asyncio shell): tor's PROXY line read
off a stream, the unix socket listener, closing a connection with a lingering close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path

from .protocol import unread
from .settings import ProxyError
from .wire import MAX_LINE, NoProxyLine, ProxyLine, read_proxy_line

# How long a closing connection reads and drops what its client still sends (close_writer).
LINGER = 0.5


NO_CIRCUIT = ProxyLine("local", None)  # a stream that did not come through tor


def buffered(reader: asyncio.StreamReader) -> bool:
    """Whether the reader holds bytes already (a read would not wait)."""
    return bool(getattr(reader, "_buffer", b""))


async def read_tor_proxy_line(reader: asyncio.StreamReader) -> ProxyLine | None:
    """tor's PROXY line from the start of the stream (None if it closed first); the bytes
    read after it go back to the reader. Never buffers more than the longest line. A stream
    that does not start with ``PROXY `` did not come through tor (tor always writes the line
    first): it is served without a circuit. Raises :class:`ProxyLineError` for a broken line."""
    buf = bytearray()
    while True:  # each turn reads at least one byte, at most MAX_LINE in all
        data = await reader.read(MAX_LINE - len(buf))
        if not data:
            return None
        buf += data
        try:
            found = read_proxy_line(buf)
        except NoProxyLine:
            unread(reader, bytes(buf))
            return NO_CIRCUIT
        if found is not None:
            line, used = found
            if used < len(buf):
                unread(reader, bytes(buf[used:]))
            return line


def bind_unix(path: Path, mode: int) -> socket.socket:
    """A unix socket bound at ``path`` with ``mode`` (0660 or tighter). A stale socket there is
    replaced; anything else, or a folder others may write to, is refused (another user could
    swap the path for a symlink)."""
    parent = path.parent
    try:
        folder = os.stat(parent)
    except OSError as exc:
        raise ProxyError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    if folder.st_mode & 0o022:
        raise ProxyError(
            f"cannot listen on unix:{path}: {parent} is writable by others (use a folder only "
            "this user and its group can change)"
        )
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ProxyError(f"cannot listen on unix:{path}: it exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Created owner-only (a stricter umask, never a looser one), then opened to ``mode``.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    return sock


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def close_writer(
    writer: asyncio.StreamWriter,
    *,
    graceful: bool,
    reader: asyncio.StreamReader | None = None,
) -> None:
    """Close a stream; a graceful close flushes what is buffered, but never waits long
    (a peer that stopped reading must not pin the socket). With ``reader``, it lingers
    (RFC 9112 §9.6): our side is half-closed first and what the client still sends is read
    and dropped for a moment, so the kernel does not answer it with a reset that would
    destroy our last response (a 408 to a client still trickling its head)."""
    if not graceful:
        writer.transport.abort()
        return
    if reader is not None and writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError, RuntimeError, TimeoutError, ConnectionError):
            writer.write_eof()
            async with asyncio.timeout(LINGER):
                await writer.drain()
                while await reader.read(65536):  # ends at EOF or at the linger timeout
                    pass
    writer.close()
    try:
        async with asyncio.timeout(5.0):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
