"""Raw byte relay between two streams (asyncio): tcp mode and HTTP after a 101."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

Counter = Callable[[int], None]


def _write_eof(writer: asyncio.StreamWriter) -> None:
    # Half-close: pass the peer's FIN on (TCP shutdown(SHUT_WR)). A TLS stream cannot
    # half-close; there the other direction simply runs on until it ends too.
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


async def pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    *,
    read_size: int,
    count: Counter,
    initial: bytes = b"",
) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``.

    Large reads keep the per-byte overhead low; drain() after every write gives
    backpressure, so a slow reader never makes us buffer more than the transport's
    high-water mark.
    """
    if initial:
        count(len(initial))
        dst.write(initial)
        await dst.drain()
    while True:  # ends at EOF or on error; the session watchdog bounds the waiting
        data = await src.read(read_size)
        if not data:
            break
        count(len(data))
        dst.write(data)
        await dst.drain()
    _write_eof(dst)


async def relay_both(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target_reader: asyncio.StreamReader,
    target_writer: asyncio.StreamWriter,
    *,
    read_size: int,
    count_up: Counter,
    count_down: Counter,
    initial_up: bytes = b"",
    initial_down: bytes = b"",
) -> None:
    """Relay both ways until both directions have ended; the first error ends both."""
    up = asyncio.create_task(
        pump(client_reader, target_writer, read_size=read_size, count=count_up, initial=initial_up)
    )
    down = asyncio.create_task(
        pump(
            target_reader,
            client_writer,
            read_size=read_size,
            count=count_down,
            initial=initial_down,
        )
    )
    tasks = {up, down}
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raise the first error
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- zero-copy relay (Linux splice) -----------------------------------------------------------
#
# In tcp mode to a plain-TCP target the bytes need not pass through Python at all: each
# direction moves them socket -> pipe -> socket with splice(2), so they stay in the kernel
# and one readiness callback moves up to _SPLICE_CHUNK bytes. The asyncio transports stay the
# owners of the sockets (they close them); the relay pauses them (reading paused, nothing
# buffered for writing: the transport has no registration left), takes what they already
# read, and registers its own readiness callbacks on the same descriptors through the
# selector loop's internal _add_reader/_add_writer -- the public add_reader refuses a
# descriptor a transport owns, and a dup() would double the descriptors per connection.
# Loops without those calls (another event loop implementation) use the stream relay.

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SPLICE_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
# Callbacks moved per readiness event before yielding to other connections (fairness).
_BURST = 8


def splice_supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "splice")


class _Sock(Protocol):
    def fileno(self) -> int: ...
    def shutdown(self, how: int, /) -> None: ...


@dataclass(frozen=True)
class _Watch:
    add_reader: Callable[[int, Callable[[], None]], object]
    remove_reader: Callable[[int], object]
    add_writer: Callable[[int, Callable[[], None]], object]
    remove_writer: Callable[[int], object]


def _watch(loop: asyncio.AbstractEventLoop) -> _Watch | None:
    calls: list[Callable[..., object]] = []
    for name in ("_add_reader", "_remove_reader", "_add_writer", "_remove_writer"):
        call = getattr(loop, name, None)
        if not callable(call):
            return None
        calls.append(call)
    return _Watch(calls[0], calls[1], calls[2], calls[3])


def can_splice(*writers: asyncio.StreamWriter) -> bool:
    """True when every stream is a plain (non-TLS) socket whose buffered input we can take."""
    if not splice_supported() or _watch(asyncio.get_running_loop()) is None:
        return False
    for writer in writers:
        transport = writer.transport
        if writer.get_extra_info("sslcontext") is not None or writer.get_extra_info("ssl_object"):
            return False
        if not isinstance(transport, asyncio.ReadTransport) or transport.is_closing():
            return False
        if writer.get_extra_info("socket") is None:
            return False
        if transport.get_write_buffer_size() != 0:
            return False
    return True


def _new_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size; 64 KiB is fine too
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    return read_end, write_end


# Empty pipes waiting for the next burst of any connection: a connection holds a pipe only
# while bytes move, so idle connections cost no descriptors beyond their two sockets.
_PIPE_POOL: list[tuple[int, int]] = []
_PIPE_POOL_MAX = 64


def _take_pipe() -> tuple[int, int]:
    return _PIPE_POOL.pop() if _PIPE_POOL else _new_pipe()


def _give_pipe(pipe: tuple[int, int], empty: bool) -> None:
    if empty and len(_PIPE_POOL) < _PIPE_POOL_MAX:
        _PIPE_POOL.append(pipe)
        return
    for fd in pipe:
        os.close(fd)


def release_pipes() -> None:
    """Close the pooled pipes (tests counting descriptors; a process shutting down)."""
    while _PIPE_POOL:
        _give_pipe(_PIPE_POOL.pop(), empty=False)


class _SpliceDirection:
    """One direction, ``src`` -> pipe -> ``dst``; calls ``on_end`` once (None or the error)."""

    def __init__(
        self,
        watch: _Watch,
        src: _Sock,
        dst: _Sock,
        count: Counter,
        on_end: Callable[[_SpliceDirection, BaseException | None], None],
    ) -> None:
        self._watch = watch
        self._src = src
        self._dst = dst
        self._count = count
        self._on_end = on_end
        self._pipe: tuple[int, int] | None = None  # from the pool while bytes move
        self._pending = 0  # bytes in the pipe, not yet written to dst
        self._reading = False
        self._writing = False
        self.ended = False

    def start(self) -> None:
        self._want_read()

    def close(self) -> None:
        """Unregister and free the pipe (idempotent); the sockets belong to the caller."""
        self._stop_read()
        self._stop_write()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            _give_pipe(pipe, empty=self._pending == 0)

    def _want_read(self) -> None:
        if not self._reading:
            self._watch.add_reader(self._src.fileno(), self._on_readable)
            self._reading = True

    def _stop_read(self) -> None:
        if self._reading:
            self._watch.remove_reader(self._src.fileno())
            self._reading = False

    def _want_write(self) -> None:
        if not self._writing:
            self._watch.add_writer(self._dst.fileno(), self._on_writable)
            self._writing = True

    def _stop_write(self) -> None:
        if self._writing:
            self._watch.remove_writer(self._dst.fileno())
            self._writing = False

    def _end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.close()
        if error is None:
            # Half-close: pass the FIN on; the other direction runs on.
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
        self._on_end(self, error)

    def _on_readable(self) -> None:
        try:
            self._pump()
        except OSError as exc:
            self._end(exc)

    def _on_writable(self) -> None:
        try:
            if self._flush():
                self._stop_write()
                self._pump()
        except OSError as exc:
            self._end(exc)

    def _flush(self) -> bool:
        """Write the pipe out to dst; True once it is empty."""
        assert self._pipe is not None
        while self._pending:
            try:
                n = os.splice(self._pipe[0], self._dst.fileno(), self._pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            self._pending -= n
        return True

    def _pump(self) -> None:
        if self._pipe is None:
            self._pipe = _take_pipe()
        for _ in range(_BURST):  # bounded; level-triggered readiness calls us again
            try:
                n = os.splice(self._src.fileno(), self._pipe[1], _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:  # the pipe is empty here, so: no input yet
                _give_pipe(self._pipe, empty=True)  # idle: the pipe goes back to the pool
                self._pipe = None
                break
            if n == 0:
                self._end(None)
                return
            self._count(n)
            self._pending = n
            if not self._flush():  # dst is full: stop reading until it drains (backpressure)
                self._stop_read()
                self._want_write()
                return
        self._want_read()


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        raise RuntimeError("unexpected StreamReader internals")
    data = bytes(buffer)
    buffer.clear()
    return data


def _detach(writer: asyncio.StreamWriter) -> _Sock:
    """Stop the transport reading; return its socket (the transport still owns it)."""
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)  # checked by can_splice
    transport.pause_reading()
    sock: _Sock = writer.get_extra_info("socket")
    return sock


async def splice_both(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target_reader: asyncio.StreamReader,
    target_writer: asyncio.StreamWriter,
    *,
    count_up: Counter,
    count_down: Counter,
) -> None:
    """:func:`relay_both` with splice(2): same half-close, counting and error semantics.

    Call only when :func:`can_splice` says so for both writers. Cancelling it (the idle
    watchdog) stops the relay; closing the transports afterwards closes the sockets.
    """
    loop = asyncio.get_running_loop()
    watch = _watch(loop)
    assert watch is not None  # checked by can_splice
    client = _detach(client_writer)
    target = _detach(target_writer)
    directions: list[_SpliceDirection] = []
    try:
        # What the transports read before they were paused goes first.
        for reader, dst, count in (
            (client_reader, target, count_up),
            (target_reader, client, count_down),
        ):
            if exc := reader.exception():
                raise exc
            early = _take_buffered(reader)
            if early:
                count(len(early))
                await _send_all(loop, watch, dst, early)
        finished: asyncio.Future[None] = loop.create_future()

        def on_end(_direction: _SpliceDirection, error: BaseException | None) -> None:
            if finished.done():
                return
            if error is not None:
                finished.set_exception(error)
            elif all(d.ended for d in directions):
                finished.set_result(None)

        for reader, src, dst, count in (
            (client_reader, client, target, count_up),
            (target_reader, target, client, count_down),
        ):
            direction = _SpliceDirection(watch, src, dst, count, on_end)
            directions.append(direction)
            if reader.at_eof():  # EOF arrived before the pause: pass it on now
                direction.ended = True
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
        if all(d.ended for d in directions):
            return
        for direction in directions:
            if not direction.ended:
                direction.start()
        await finished
    finally:
        for direction in directions:
            direction.close()


async def _send_all(
    loop: asyncio.AbstractEventLoop, watch: _Watch, sock: _Sock, data: bytes
) -> None:
    """Write ``data`` to a non-blocking socket (the bytes a transport read before the pause)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(sock.fileno(), view) :]
            continue
        except BlockingIOError:
            pass
        writable: asyncio.Future[None] = loop.create_future()

        def ready(future: asyncio.Future[None] = writable) -> None:
            if not future.done():
                future.set_result(None)

        watch.add_writer(sock.fileno(), ready)
        try:
            await writable
        finally:
            watch.remove_writer(sock.fileno())


# -- zero-copy body (Linux splice), for http mode ------------------------------------------------
#
# A large response body whose length is known (Content-Length) needs no parsing: once its head
# went to the client, exactly that many bytes move target -> pipe -> client with splice(2),
# as tcp mode does. The transports stay the owners of the sockets: the target's is paused for
# the duration (the loop reads none of these bytes), the client's keeps reading (pipelined
# requests) and must have nothing buffered for writing when the first spliced byte goes out
# (``ready``: the splice waits for the client to be writable until then), so the byte order
# on the client connection is kept. Readiness comes from the loop's public add_reader/add_writer
# on dup()ed descriptors -- they work on any loop (uvloop refuses a transport's own
# descriptor) and cost two descriptors only while a large body moves.

BODY_SPLICE_MIN = 256 * 1024  # smaller bodies: a copy is cheaper than the set-up


class BodyEnd(Enum):
    DONE = "done"  # every byte went to the client
    TARGET_ENDED = "target ended"  # EOF (or an error) from the target before the last byte
    CLIENT_GONE = "client gone"  # writing to the client failed


def transport_fd(transport: asyncio.BaseTransport) -> int | None:
    """The socket descriptor of a plain (non-TLS) socket transport; None otherwise."""
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    fd = sock.fileno()
    return fd if isinstance(fd, int) and fd >= 0 else None


class BodySplice:
    """Move exactly ``length`` bytes from ``src_fd`` to ``dst_fd`` with splice(2) (callbacks
    only). ``on_end(kind, error)`` is called once, unless :meth:`cancel` came first."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src_fd: int,
        dst_fd: int,
        length: int,
        count: Counter,
        on_end: Callable[[BodyEnd, BaseException | None], None],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._loop = loop
        self._ready = ready
        self._remaining = length
        self._count = count
        self._on_end = on_end
        # dup() gives descriptors of our own to register (inheritable=False: O_CLOEXEC).
        self._src = os.dup(src_fd)
        try:
            self._dst = os.dup(dst_fd)
        except OSError:
            os.close(self._src)
            raise
        try:
            self._pipe: tuple[int, int] | None = _take_pipe()
        except OSError:  # out of descriptors: give the dups back, the caller copies
            os.close(self._src)
            os.close(self._dst)
            raise
        self._pending = 0  # bytes in the pipe, not yet written to the client
        self._reading = False
        self._writing = False
        self.ended = False

    def start(self) -> None:
        if self._ready():
            self._pump()
        else:  # the client's transport still writes what it buffered: wait for it
            self._loop.add_writer(self._dst, self._await_ready)
            self._writing = True

    def _await_ready(self) -> None:
        # Writable, but the transport may flush its buffer in this very loop turn: ask again
        # on the next writability (a full socket is not writable, so this does not spin).
        if not self.ended and self._ready():
            self._loop.remove_writer(self._dst)
            self._writing = False
            self._pump()

    def cancel(self) -> None:
        """Stop without calling ``on_end`` (idempotent); the sockets stay open."""
        self.ended = True
        self._close()

    def _close(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._src)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._dst)
            self._writing = False
        if self._src >= 0:
            os.close(self._src)
            os.close(self._dst)
            self._src = self._dst = -1
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            _give_pipe(pipe, empty=self._pending == 0)

    def _end(self, kind: BodyEnd, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        self._close()
        self._on_end(kind, error)

    def _want(self, reading: bool) -> None:
        """Wait for the target to be readable (True) or the client writable (False)."""
        if reading and not self._reading:
            self._loop.add_reader(self._src, self._pump)
            self._reading = True
        elif not reading and self._reading:
            self._loop.remove_reader(self._src)
            self._reading = False
        if not reading and not self._writing:
            self._loop.add_writer(self._dst, self._pump)
            self._writing = True
        elif reading and self._writing:
            self._loop.remove_writer(self._dst)
            self._writing = False

    def _pump(self) -> None:
        if self.ended:
            return
        pipe = self._pipe
        assert pipe is not None
        for _ in range(_BURST):  # bounded; level-triggered readiness calls us again
            while self._pending:
                try:
                    n = os.splice(pipe[0], self._dst, self._pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self._want(reading=False)  # the client is behind: backpressure
                    return
                except OSError as exc:
                    self._end(BodyEnd.CLIENT_GONE, exc)
                    return
                self._pending -= n
            if self._remaining == 0:
                self._end(BodyEnd.DONE, None)
                return
            try:
                n = os.splice(
                    self._src, pipe[1], min(self._remaining, _SPLICE_CHUNK), flags=_SPLICE_FLAGS
                )
            except BlockingIOError:
                break
            except OSError as exc:
                self._end(BodyEnd.TARGET_ENDED, exc)
                return
            if n == 0:
                self._end(BodyEnd.TARGET_ENDED, None)
                return
            self._remaining -= n
            self._pending = n
            self._count(n)
        self._want(reading=self._pending == 0)
