"""A VM's memory as the sandbox reports it: guest RAM in memfds counted once, and
counted even where no process has touched it (a restored guest's copied RAM)."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from shim.util.procstats import (memfd_bytes, mergeable_rss_bytes, private_rss_bytes,
                                 vm_memory_bytes)

MIB = 1 << 20

# Holds the memfd it inherits (written with write(), never mapped: like the RAM the
# shim copies into a restored VM's memfd), and 4 MiB of its own heap, until stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    heap = bytearray(b"x" * (4 << 20))
    print("ready", flush=True)
    sys.stdin.read()
""")


def _holder(fd: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, pass_fds=(fd,))
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_guest_ram_is_counted_once_and_untouched_pages_count() -> None:
    ram = os.memfd_create("husk-guest-ram")
    try:
        os.ftruncate(ram, 64 * MIB)
        os.write(ram, b"\1" * (16 * MIB))  # 16 MiB allocated, the rest holes
        qemu, virtiofsd = _holder(ram), _holder(ram)  # both map the same guest RAM
        try:
            assert 16 * MIB <= memfd_bytes(qemu.pid, set()) < 17 * MIB
            # Each holder's own RSS has its 4 MiB heap and not the untouched memfd.
            own = private_rss_bytes(qemu.pid)
            assert 4 * MIB < own < 40 * MIB
            total = vm_memory_bytes([qemu.pid, virtiofsd.pid])
            others = private_rss_bytes(qemu.pid) + private_rss_bytes(virtiofsd.pid)
            assert others + 16 * MIB <= total < others + 17 * MIB, \
                "guest RAM counted twice or not at all"
        finally:
            for proc in (qemu, virtiofsd):
                proc.communicate("", timeout=30)
    finally:
        os.close(ram)


def test_a_process_gone_counts_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert vm_memory_bytes([proc.pid]) == 0


def test_mergeable_rss_counts_only_touched_pages_marked_for_ksm() -> None:
    """QEMU's private guest RAM is what it madvises MADV_MERGEABLE."""
    before = mergeable_rss_bytes(os.getpid())
    area = mmap.mmap(-1, 8 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            area.madvise(mmap.MADV_MERGEABLE)
        except OSError:
            pytest.skip("the host kernel has no KSM")
        area[:4 * MIB] = b"x" * (4 * MIB)  # half of it touched
        held = mergeable_rss_bytes(os.getpid()) - before
        assert 4 * MIB <= held < 8 * MIB
    finally:
        area.close()
    assert mergeable_rss_bytes(-1) == 0
