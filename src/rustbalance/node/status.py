"""The node's status model and its local, read-only status endpoint (system.md W16).

The daemon owns the data: it passes a callable that returns the live status document
(node/snapshot.py renders it, and documents its keys). The server answers every connection on
a unix socket (file 0600, its folder 0700 when we create it) with one JSON document and
closes; nothing is read from the client, so it cannot change anything. :func:`read_status` is
the client used by ``rustbalance status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rustbalance.errors import RustBalanceError

log = logging.getLogger(__name__)

DEFAULT_STATUS_SOCKET = "/var/lib/rustbalance/status.sock"
# A status document is small; a cap keeps a confused peer from exhausting memory.
MAX_STATUS_BYTES = 4 * 1024 * 1024

StatusProvider = Callable[[], Mapping[str, Any]]


class StatusError(RustBalanceError):
    """The status endpoint could not be served or read; the message says why in one line."""


def _prepare_socket_path(path: Path) -> None:
    """Create the folder (0700) if missing; remove a stale socket; refuse a live one."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StatusError(f"status socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left over from a daemon that died: nobody listens
    else:
        raise StatusError(f"another daemon already serves status on {path}")
    finally:
        probe.close()


def _bind_private(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a strict umask so the socket is never reachable by others, not even briefly.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StatusError(f"cannot bind status socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


class StatusServer:
    """Serve ``provider()`` as JSON on a unix socket; use as an async context manager."""

    def __init__(
        self, socket_path: str | os.PathLike[str], provider: StatusProvider, *, timeout: float = 5.0
    ) -> None:
        self.path = Path(socket_path)
        self._provider = provider
        self._timeout = timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        _prepare_socket_path(self.path)
        sock = _bind_private(self.path)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)
        log.info("Status endpoint listening on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled; a supervised task."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _document(self) -> bytes:
        try:
            doc: Any = dict(self._provider())
        except Exception as exc:
            log.warning("Building the status document failed: %s", exc)
            doc = {"error": f"status unavailable: {exc}"}
        try:
            text = json.dumps(doc, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            log.warning("Status document is not JSON-serialisable: %s", exc)
            text = json.dumps({"error": f"status unavailable: {exc}"})
        return text.encode() + b"\n"

    async def _handle(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._document())
            await asyncio.wait_for(writer.drain(), self._timeout)
        except (OSError, TimeoutError) as exc:
            log.debug("Status client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._timeout)


def read_status(socket_path: str | os.PathLike[str], timeout: float = 5.0) -> dict[str, Any]:
    """Fetch one status document; raise StatusError with a one-line reason on any problem."""
    path = str(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise StatusError(f"no daemon running (status socket {path} does not exist)") from None
        except ConnectionRefusedError:
            raise StatusError(f"no daemon running (nothing listens on {path})") from None
        except PermissionError:
            raise StatusError(
                f"permission denied on {path} (run as the daemon's user or root)"
            ) from None
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_STATUS_BYTES:
                raise StatusError("daemon sent an oversized status document")
            chunks.append(chunk)
    except TimeoutError:
        raise StatusError(f"daemon did not answer within {timeout:g}s on {path}") from None
    except StatusError:
        raise
    except OSError as exc:
        raise StatusError(f"cannot read status from {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    raw = b"".join(chunks)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatusError(f"daemon sent invalid status JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StatusError("daemon sent invalid status JSON: not an object")
    if "error" in doc and "node_id" not in doc:
        raise StatusError(f"daemon reported: {doc['error']}")
    return doc
