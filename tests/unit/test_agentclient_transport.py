"""The shim's vsock splice, with a unix socket standing in for the guest's vsock port."""
from __future__ import annotations

import asyncio
from pathlib import Path

from shim.agentclient.transport import VsockBridge


async def test_bridge_splices_both_ways_and_cleans_up(tmp_path: Path) -> None:
    guest_path = tmp_path / "guest.sock"
    seen: list[tuple[int, int]] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    guest = await asyncio.start_unix_server(echo, path=str(guest_path))

    async def dial(cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        seen.append((cid, port))
        return await asyncio.open_unix_connection(str(guest_path))

    bridge = VsockBridge(tmp_path / "agent.sock", cid=42, dial=dial)
    await bridge.start()
    for _ in range(2):  # a second connection gets its own guest connection
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "agent.sock"))
        writer.write(b"hello")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"HELLO"
        writer.close()
    assert seen == [(42, 1024), (42, 1024)]
    await bridge.stop()
    guest.close()
    await guest.wait_closed()
    assert not (tmp_path / "agent.sock").exists()


async def test_unreachable_guest_closes_the_client(tmp_path: Path) -> None:
    async def refuse(cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise ConnectionRefusedError("no listener")

    bridge = VsockBridge(tmp_path / "agent.sock", cid=3, dial=refuse)
    await bridge.start()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "agent.sock"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await bridge.stop()
