"""A stream protocol whose bytes can be diverted to callbacks (asyncio shell).

Streams (``StreamReader``/``StreamWriter``) cost a future, a task wake-up and a coroutine
switch per read. http mode's session instead runs in the protocol callbacks themselves
(see :mod:`.http`): while a :class:`Sink` is attached, received bytes, EOF, connection loss
and write flow control go to the sink; without one the protocol is a plain
``asyncio.StreamReaderProtocol``, so tcp mode, the relay after a protocol switch, the PROXY
line reader and the TLS/SOCKS code keep using streams on the very same connection.
Switching is instant in both directions: no byte is left behind in between (what the reader
buffered before the switch is handed over with :func:`take_buffered`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Sink(Protocol):
    """Where a diverted protocol's events go (all called from the event loop)."""

    def on_data(self, data: bytes) -> None: ...

    def on_eof(self) -> None:
        """The peer half-closed (FIN)."""

    def on_lost(self, error: BaseException | None) -> None:
        """The connection is gone (closed by either side, or broken: ``error``)."""

    def on_write_paused(self, paused: bool) -> None:
        """The transport's write buffer went over (True) or back under (False) its limit."""


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class SinkProtocol(asyncio.StreamReaderProtocol):
    """``StreamReaderProtocol`` plus :attr:`sink`.

    EOF and connection loss always reach the stream reader too (``at_eof()`` stays true to
    the socket, whatever mode saw it); data goes to exactly one of the sink or the reader.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        client_connected_cb: ClientConnected | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(reader, client_connected_cb, loop)
        self.sink: Sink | None = None
        self.ended = False  # EOF or connection loss seen

    @property
    def write_paused(self) -> bool:
        """The transport's write buffer is over its limit (FlowControlMixin's flag)."""
        return bool(getattr(self, "_paused", False))

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            super().data_received(data)
        else:
            sink.on_data(data)

    def eof_received(self) -> bool:
        self.ended = True
        keep_open = bool(super().eof_received())
        if self.sink is not None:
            self.sink.on_eof()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        super().connection_lost(exc)
        if self.sink is not None:
            self.sink.on_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.sink is not None:
            self.sink.on_write_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.sink is not None:
            self.sink.on_write_paused(False)


def sink_protocol_of(writer: asyncio.StreamWriter) -> SinkProtocol | None:
    protocol: Any = writer.transport.get_protocol()
    return protocol if isinstance(protocol, SinkProtocol) else None


def take_buffered(reader: asyncio.StreamReader) -> bytes:
    """Empty the reader's buffer (bytes it holds but nobody read yet) and return them; a
    transport the reader paused because the buffer was full reads again."""
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        raise RuntimeError("unexpected StreamReader internals")
    data = bytes(buffer)
    buffer.clear()
    resume = getattr(reader, "_maybe_resume_transport", None)
    if callable(resume):
        resume()
    return data


def make_protocol_factory(
    limit: int, client_connected_cb: ClientConnected | None = None
) -> Callable[[], SinkProtocol]:
    """For ``loop.create_server`` / ``create_connection``: what ``asyncio.start_server`` and
    ``open_connection`` build, with :class:`SinkProtocol` as the protocol."""

    def factory() -> SinkProtocol:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return SinkProtocol(reader, client_connected_cb, loop=loop)

    return factory


async def open_stream(
    limit: int, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with a :class:`SinkProtocol` (same keyword arguments)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = SinkProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back in front of what the reader holds (bytes read ahead of a boundary,
    like tor's PROXY line, that belong to what comes next)."""
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        raise RuntimeError("unexpected StreamReader internals")
    buffer[:0] = data
