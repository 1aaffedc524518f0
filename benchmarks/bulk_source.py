"""A bulk TCP source for the proxy benchmarks, run as its own process.

``python -m benchmarks.bulk_source KIND TOTAL [http]`` listens on a free port of 127.0.0.1,
prints it, and sends TOTAL bytes down every connection it accepts (one at a time), then closes
it. With ``http`` it first reads the request head and sends the bytes as the body of an
HTTP/1.1 200 response with a Content-Length (for http mode).
It runs apart from the downloading client so the two ends of the load generator do not
share a GIL. Two kinds of data:

* ``memory``: one 1 MiB buffer sent over and over. It stays in the CPU cache, so this is
  the cheapest source there is; it favours a proxy that copies (its copies are cache-hot).
* ``file``: a 64 MiB file sent with ``sendfile(2)``, the way a static web server sends a
  file from the page cache; the bytes the proxy moves are not cache-hot.

It stops when its standard input closes (the benchmark ends it by PID as well).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading

_FILE_BYTES = 64 * 1024 * 1024
_BLOCK = 1024 * 1024


def _send_memory(conn: socket.socket, total: int) -> None:
    block = os.urandom(_BLOCK)
    sent = 0
    while sent < total:
        conn.sendall(block)
        sent += len(block)


def _send_file(conn: socket.socket, total: int, fd: int) -> None:
    sent = 0
    while sent < total:  # each turn sends the whole file (bounded by total)
        offset = 0
        while offset < _FILE_BYTES and sent < total:
            n = os.sendfile(conn.fileno(), fd, offset, min(_FILE_BYTES - offset, total - sent))
            offset += n
            sent += n


def _http_head(conn: socket.socket, total: int) -> None:
    """Read the request head (bounded) and send a 200 response head for ``total`` bytes."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk or len(head) > 65536:
            raise ConnectionError("no request head")
        head += chunk
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {total}\r\nConnection: close\r\n\r\n".encode()
    )


def main(argv: list[str]) -> int:
    kind, total = argv[0], int(argv[1])
    http = argv[2:] == ["http"]
    if kind not in ("memory", "file"):
        print(f"unknown source kind {kind!r}: memory or file", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        fd = -1
        if kind == "file":
            data = stack.enter_context(tempfile.TemporaryFile())
            data.write(os.urandom(_FILE_BYTES))
            data.flush()
            fd = data.fileno()
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        print(listener.getsockname()[1], flush=True)
        # Ends the process when the benchmark closes our stdin.
        threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
        while True:  # until stdin closes
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                if http:
                    _http_head(conn, total)
                if kind == "memory":
                    _send_memory(conn, total)
                else:
                    _send_file(conn, total, fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
