"""Guest RAM in a memfd the shim owns (VMs from templates), and copying it sparsely.

A VM restored from a template gets its guest RAM as a copy of the template's
RAM file, not through the migration stream: QEMU loading RAM from a stream
touches every page of the guest (it checks each zero page), so every restored
VM would start with all of its memory allocated. With the RAM in a file and
QEMU's x-ignore-shared migration capability, the stream holds only device
state, and the copy writes only the pages that hold data; the rest stays holes
that cost nothing until the guest uses them.
"""
from __future__ import annotations

import errno
import os

RAM_MEMFD_NAME = "husk-guest-ram"
COPY_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(COPY_CHUNK)


def new_guest_ram(size_bytes: int) -> int:
    """An empty (all holes) memfd of ``size_bytes``; the caller owns the fd.

    :raise OSError: memfd_create or ftruncate failed.
    """
    fd = os.memfd_create(RAM_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def qemu_mem_path(fd: int) -> str:
    """How QEMU, which inherits ``fd`` under the same number, opens it."""
    return f"/proc/self/fd/{fd}"


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every region of ``fd`` that is not a hole."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes from here on
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        offset = end
    return extents


def copy_sparse(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy ``size`` bytes of guest RAM from ``src_fd`` to ``dst_fd`` (same offsets),
    writing only data: holes and all-zero chunks are left as holes in the
    destination, which must be all holes to begin with. Returns the bytes written.

    :raise OSError: a read or write failed.
    """
    written = 0
    for start, length in _data_extents(src_fd, size):
        offset, end = start, start + length
        while offset < end:
            chunk = os.pread(src_fd, min(COPY_CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, f"guest RAM ends early at {offset}")
            if chunk != _ZERO_CHUNK[:len(chunk)]:
                view = memoryview(chunk)
                done = 0
                while done < len(view):
                    done += os.pwrite(dst_fd, view[done:], offset + done)
                written += len(chunk)
            offset += len(chunk)
    return written


def allocated_bytes(fd: int) -> int:
    """Bytes of the file that hold pages (not holes)."""
    return os.fstat(fd).st_blocks * 512
