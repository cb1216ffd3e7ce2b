"""Guest output: the ring buffer, the capped file, pacing, and a socket fed like QEMU feeds it.

A plain unix socket client stands in for QEMU's ``-chardev socket,server=off``:
it connects to the listener the shim opened, writes, and hangs up.
"""
from __future__ import annotations

import asyncio
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.vm.guestlog import (NOTICE_RESERVE_BYTES, READ_CHUNK_BYTES, CappedFile, GuestLog,
                              ReadPacer, RingBuffer, printable)
from tests.conftest import open_files

pytestmark = pytest.mark.timeout(30)
STEP_S = 5.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay short; pytest's tmp_path can get long."""
    path = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _flood(total: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    chunks, left = [], total
    while left:
        n = min(left, rng.randint(1, 50_000))
        chunks.append(rng.randbytes(n))
        left -= n
    return chunks


def test_ring_keeps_the_newest_bytes() -> None:
    ring = RingBuffer(capacity=1000)
    chunks = _flood(300_000)
    for chunk in chunks:
        ring.write(chunk)
        assert len(ring.getvalue()) <= 1000
    assert ring.getvalue() == b"".join(chunks)[-1000:]
    assert ring.total == 300_000


def test_capped_file_never_exceeds_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    f = CappedFile(path, "console", cap=64 * 1024)
    chunks = _flood(3 * 1024 * 1024)
    for chunk in chunks:
        f.write(chunk)
        assert path.stat().st_size <= 64 * 1024
    f.close()
    data = path.read_bytes()
    assert len(data) <= 64 * 1024
    kept = 64 * 1024 - NOTICE_RESERVE_BYTES
    assert data[:kept] == b"".join(chunks)[:kept]
    notices = data[kept:].decode()
    assert "further output is dropped" in notices
    assert f"dropped {3 * 1024 * 1024 - kept} bytes of console output" in notices
    assert len(notices.strip().splitlines()) == 2, "one line when dropping starts, one at close"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_file_says_output_is_dropped_while_it_grows(tmp_path: Path) -> None:
    """Before close: an operator tailing the file sees why it stopped growing."""
    f = CappedFile(tmp_path / "console.log", "console", cap=1024)
    f.write(b"x" * 5000)
    assert b"further output is dropped" in (tmp_path / "console.log").read_bytes()
    f.close()


def test_capped_file_below_the_cap_is_the_output_alone(tmp_path: Path) -> None:
    f = CappedFile(tmp_path / "guest.log", "agent", cap=4096)
    f.write(b"hello\n")
    f.close()
    f.close()  # idempotent
    assert (tmp_path / "guest.log").read_bytes() == b"hello\n"


def test_reads_are_free_up_to_the_burst_then_paced() -> None:
    pacer = ReadPacer(interval_s=0.01, burst=3)
    assert [pacer.delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pacer.delay(0.0) == pytest.approx(0.01)
    assert pacer.delay(0.01) == pytest.approx(0.01), "a flood: one read per interval"
    assert pacer.delay(10.0) == 0.0  # idle for a while: the burst is back, no more
    assert pacer.credit == pytest.approx(2.0)


def test_tails_escape_control_characters() -> None:
    assert printable("a\x1b[2Jb\rc\0") == "a\\x1b[2Jb\\rc\\x00"
    assert printable("x\ny", keep_newlines=True) == "x\ny"
    assert printable("x\ny") == "x\\ny"


async def test_early_output_is_not_lost(short_dir: Path) -> None:
    """Written and hung up before the shim ever accepted: the backlog keeps it."""
    stream = GuestLog("console", short_dir / "con.sock", short_dir / "console.log")
    stream.open()
    with socket.socket(socket.AF_UNIX) as qemu:
        qemu.connect(str(short_dir / "con.sock"))  # no await yet: nobody has accepted
        qemu.sendall(b"SeaBIOS\r\nLinux version 6.1\r\n\x1b[0mKernel panic - not syncing\r\n")
    await asyncio.wait_for(stream.drain(), STEP_S)
    assert stream.tail(2) == "Linux version 6.1 | \\x1b[0mKernel panic - not syncing"
    assert stream.text() == "SeaBIOS\nLinux version 6.1\n\\x1b[0mKernel panic - not syncing\n"
    assert not (short_dir / "con.sock").exists(), "the listener goes once QEMU is connected"
    await stream.close()
    assert (short_dir / "console.log").read_bytes().startswith(b"SeaBIOS\r\n")


async def test_flood_is_bounded_and_the_tail_is_the_newest(short_dir: Path) -> None:
    baseline = open_files()
    stream = GuestLog("guestlog", short_dir / "log.sock", short_dir / "guest.log",
                      ring=RingBuffer(capacity=8192), file_cap=32 * 1024,
                      pacer=ReadPacer(interval_s=0))
    stream.open()
    chunks = [f"line {i:07d} ".encode() * 20 + b"\n" for i in range(20_000)]  # ~4 MiB
    reader, writer = await asyncio.open_unix_connection(str(short_dir / "log.sock"))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(stream.drain(timeout_s=STEP_S), STEP_S)
    everything = b"".join(chunks)
    assert stream.ring.total == len(everything)
    assert stream.ring.getvalue() == everything[-8192:]
    assert stream.tail(1) == chunks[-1].decode().strip()
    await stream.close()
    size = (short_dir / "guest.log").stat().st_size
    assert size <= 32 * 1024
    assert stream.dropped == len(everything) - (32 * 1024 - NOTICE_RESERVE_BYTES)
    assert b"dropped" in (short_dir / "guest.log").read_bytes()[-200:]
    assert open_files() - baseline == set()


async def test_a_flooding_guest_is_paced_not_read_flat_out(short_dir: Path) -> None:
    """One read per interval however QEMU writes; the rest waits in the socket."""
    stream = GuestLog("console", short_dir / "con.sock", short_dir / "console.log",
                      pacer=ReadPacer(interval_s=0.05, burst=3))
    stream.open()
    qemu = socket.socket(socket.AF_UNIX)
    qemu.connect(str(short_dir / "con.sock"))
    qemu.setblocking(False)
    sent, writes, blocked = 0, 0, 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 0.5:
        try:
            sent += qemu.send(b"x" * 7)  # like the UART: tiny writes
            writes += 1
        except BlockingIOError:
            blocked += 1
            await asyncio.sleep(0.001)  # full: QEMU would wait for the socket
            continue
        if writes % 100 == 0:
            await asyncio.sleep(0)  # let the reader run whenever it wants to
    elapsed = loop.time() - started
    assert stream.reads <= 3 + elapsed / 0.05 + 1 and stream.paced > 0
    assert stream.ring.total <= stream.reads * READ_CHUNK_BYTES
    assert blocked, "the writer found the socket full: backpressure on QEMU"
    qemu.close()
    await asyncio.wait_for(stream.drain(), STEP_S)
    assert stream.ring.total == sent, "after QEMU hung up, drain reads what was left, unpaced"
    await stream.close()


async def test_close_before_qemu_ever_connected(short_dir: Path) -> None:
    baseline = open_files()
    stream = GuestLog("console", short_dir / "con.sock", short_dir / "console.log")
    stream.open()
    await asyncio.wait_for(stream.drain(), 0.5)  # nothing pending: returns at once
    await stream.close()
    await stream.close()
    assert not (short_dir / "con.sock").exists()
    assert open_files() - baseline == set()
    assert stream.tail() == ""


async def test_unusable_socket_path_is_an_error(short_dir: Path) -> None:
    from shim.vm.guestlog import GuestLogError

    stream = GuestLog("console", short_dir / "missing" / "con.sock", short_dir / "console.log")
    with pytest.raises(GuestLogError, match="cannot set up the console log"):
        stream.open()


async def test_close_while_someone_drains(short_dir: Path) -> None:
    """stop() closing the stream must not raise CancelledError in a concurrent drain."""
    stream = GuestLog("console", short_dir / "con.sock", short_dir / "console.log")
    stream.open()
    qemu = socket.socket(socket.AF_UNIX)
    qemu.connect(str(short_dir / "con.sock"))  # connected, and never hangs up
    await asyncio.sleep(0.05)
    drainer = asyncio.create_task(stream.drain(timeout_s=STEP_S))
    await asyncio.sleep(0.05)
    await stream.close()
    await asyncio.wait_for(drainer, STEP_S)  # returns normally
    qemu.close()
