"""QMP bounds: events are counted and dropped, an oversized message fails the command.

A small in-process QMP server stands in for QEMU: the greeting, then one
reply per command (echoing its id), with whatever it is told to send first.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from shim.vm import qmp as qmp_module
from shim.vm.qmp import OTHER_EVENTS, QMP_MAX_MESSAGE_BYTES, Qmp, QmpError

pytestmark = pytest.mark.timeout(60)
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}


@dataclass
class FakeQemu:
    """Stands in for the process Qmp.connect watches."""

    returncode: int | None = None


@dataclass
class FakeQmpServer:
    path: Path
    # Raw lines sent before the reply to the next command other than qmp_capabilities.
    before_reply: list[bytes] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._session, path=str(self.path))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        try:
            async for request in _requests(reader):
                if request["execute"] != "qmp_capabilities":
                    for raw in self.before_reply:
                        writer.write(raw)
                        await writer.drain()
                    self.before_reply = []
                reply: dict[str, Any] = {"return": {}}
                if "id" in request:
                    reply["id"] = request["id"]
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Commands as QEMU parses them: a stream of JSON objects, newlines optional."""
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                request, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break
            buffer = buffer.lstrip()[end:]
            yield request


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def server(short_dir: Path) -> AsyncIterator[FakeQmpServer]:
    srv = FakeQmpServer(short_dir / "qmp.sock")
    await srv.start()
    yield srv
    await srv.stop()


async def _connected(server: FakeQmpServer) -> Qmp:
    client = Qmp("test")
    await client.connect(server.path, FakeQemu(), 5.0)  # type: ignore[arg-type]
    return client


def _event(name: str, i: int) -> bytes:
    return json.dumps({"event": name, "data": {"n": i},
                       "timestamp": {"seconds": i, "microseconds": 0}}).encode() + b"\n"


async def test_events_are_counted_not_queued(server: FakeQmpServer) -> None:
    server.before_reply = [_event("RTC_CHANGE", i) for i in range(50_000)]
    server.before_reply += [_event("VSERPORT_CHANGE", 0), _event("\x1b[2J", 0)]
    client = await _connected(server)
    assert await client.execute("query-status", timeout_s=30) == {}
    assert client.events_dropped == 50_002
    counts = client._client.event_counts
    assert counts["RTC_CHANGE"] == 50_000 and counts["VSERPORT_CHANGE"] == 1
    assert counts[OTHER_EVENTS] == 1, "a name that is not printable is not kept"
    # qemu.qmp's own default listener (queue and history) never saw any of them.
    assert client._client.events.empty() and client._client.events.history == ()
    await client.close()


async def test_distinct_event_names_are_bounded(server: FakeQmpServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmp_module, "EVENT_NAMES_MAX", 4)
    server.before_reply = [_event(f"EVENT_{i}", i) for i in range(100)]
    client = await _connected(server)
    await client.execute("query-status")
    counts = client._client.event_counts
    assert len(counts) == 5 and counts[OTHER_EVENTS] == 96
    await client.close()


async def test_an_oversized_message_fails_the_command(server: FakeQmpServer) -> None:
    huge = {"return": {}, "junk": "x" * (2 * QMP_MAX_MESSAGE_BYTES)}
    server.before_reply = [json.dumps(huge).encode() + b"\n"]
    client = await _connected(server)
    with pytest.raises(QmpError):
        await client.execute("query-status")
    await client.close()
