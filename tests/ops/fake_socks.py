"""A SOCKS5 server standing in for tor's SOCKS port: any CONNECT goes to one local port.

It checks what a tor client must send (RFC 1928 CONNECT by *name*, so the onion is resolved by
tor, and RFC 1929 user/password, tor's stream isolation) and records the requests. Used in
process by tests/ops/test_join_network.py and as a process inside a network namespace by
tests/ops/test_trust_mesh_netns.py (``python -m tests.ops.fake_socks HOST PORT FORWARD_PORT``,
until SIGTERM), where it lets the real ``rustbalance join`` reach a node's proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import sys

__all__ = ["FakeSocks"]


class FakeSocks:
    """A SOCKS5 server (RFC 1928 + RFC 1929 user/password) that relays to one local port."""

    def __init__(self, forward_port: int) -> None:
        self.forward_port = forward_port
        self.requests: list[tuple[str, int, bytes, bytes]] = []
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ver, n = await reader.readexactly(2)
            methods = await reader.readexactly(n)
            assert ver == 5 and 2 in methods
            writer.write(b"\x05\x02")
            _, ulen = await reader.readexactly(2)
            user = await reader.readexactly(ulen)
            (plen,) = await reader.readexactly(1)
            password = await reader.readexactly(plen)
            writer.write(b"\x01\x00")
            ver, cmd, _, atyp = await reader.readexactly(4)
            assert (ver, cmd, atyp) == (5, 1, 3)  # CONNECT by name: tor resolves the onion
            (hlen,) = await reader.readexactly(1)
            host = (await reader.readexactly(hlen)).decode()
            (port,) = struct.unpack(">H", await reader.readexactly(2))
            self.requests.append((host, port, user, password))
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.forward_port)
            writer.write(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(OSError):
                    dst.write_eof()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            up_writer.close()
        finally:
            writer.close()


async def _serve_forever(host: str, port: int, forward_port: int) -> None:
    socks = FakeSocks(forward_port)
    await socks.start(host, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 600)  # bounded: gone after 10 minutes anyway
    await socks.close()


if __name__ == "__main__":
    asyncio.run(_serve_forever(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
