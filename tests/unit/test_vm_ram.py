"""Guest RAM in a memfd, and copying it without filling its holes."""
from __future__ import annotations

import os
from pathlib import Path

from shim.vm.ram import COPY_CHUNK, PAGE_SIZE, allocated_bytes, copy_sparse, new_guest_ram, qemu_mem_path

MIB = 1 << 20


def test_a_copy_writes_only_data_and_keeps_offsets(tmp_path: Path) -> None:
    size = 64 * MIB
    src = new_guest_ram(size)
    dst = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert allocated_bytes(src) == 0  # all holes
        os.pwrite(src, b"kernel" * 1000, 0)
        os.pwrite(src, b"\xff" * COPY_CHUNK, 40 * MIB)
        os.pwrite(src, bytes(3 * COPY_CHUNK), 10 * MIB)  # touched, but zero: stays a hole
        os.ftruncate(dst, size)
        written = copy_sparse(src, dst, size)
        # The two pages of "kernel" and the 0xff chunk; the zero chunks skipped.
        assert written == 2 * 4096 + COPY_CHUNK
        assert os.pread(dst, 6000, 0) == b"kernel" * 1000
        assert os.pread(dst, COPY_CHUNK, 40 * MIB) == b"\xff" * COPY_CHUNK
        assert os.pread(dst, COPY_CHUNK, 10 * MIB) == bytes(COPY_CHUNK)
        assert allocated_bytes(dst) <= written + 64 * 1024
        assert os.fstat(dst).st_size == size
    finally:
        os.close(src)
        os.close(dst)


def test_zero_pages_among_data_stay_holes() -> None:
    # A guest's RAM as the template leaves it: one region of touched pages, where
    # used pages lie between pages the guest zeroed (init_on_alloc, freed memory).
    size = 4 * MIB
    pattern = [True, False, False, True, True, False]  # data / zero, repeated
    page_data = [pattern[i % len(pattern)] for i in range(size // PAGE_SIZE)]
    src = new_guest_ram(size)
    dst = new_guest_ram(size)
    try:
        os.pwrite(src, b"".join(bytes([i % 251 + 1]) * PAGE_SIZE if data else bytes(PAGE_SIZE)
                                for i, data in enumerate(page_data)), 0)
        assert allocated_bytes(src) == size  # every page touched
        written = copy_sparse(src, dst, size)
        assert written == sum(page_data) * PAGE_SIZE
        assert allocated_bytes(dst) == written  # the zero pages cost nothing
        for i in (0, 1, 3, 5, len(page_data) - 1):
            expected = bytes([i % 251 + 1]) * PAGE_SIZE if page_data[i] else bytes(PAGE_SIZE)
            assert os.pread(dst, PAGE_SIZE, i * PAGE_SIZE) == expected
    finally:
        os.close(src)
        os.close(dst)


def test_qemu_reopens_the_memfd_it_inherits() -> None:
    fd = new_guest_ram(MIB)
    try:
        assert qemu_mem_path(fd) == f"/proc/self/fd/{fd}"
        assert os.path.realpath(f"/proc/self/fd/{fd}").startswith("/memfd:husk-guest-ram")
    finally:
        os.close(fd)
