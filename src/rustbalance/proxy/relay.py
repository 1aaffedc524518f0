"""Raw byte relay between two streams (asyncio): tcp mode and HTTP after a 101."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

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
