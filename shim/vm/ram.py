"""The shared node of guest RAM in a memfd the shim owns (VMs from templates), and
copying it sparsely.

A VM restored from a template gets its shared RAM (the node virtiofsd maps,
shim.vm.cmdline.RamLayout) as a copy of the template's RAM file, not through
the migration stream: QEMU loading RAM from a stream reads every page of the
guest (it checks each zero page), and a read of a memfd's hole allocates a page,
so every restored VM would start with all of that memory allocated. With that
RAM in a file and QEMU's x-ignore-shared migration capability, the stream leaves
it out, and the copy writes only the pages that hold data; the rest stays holes
that cost nothing until the guest uses them. The private nodes come through the
stream: a read of anonymous memory that was never written maps the zero page.
"""
from __future__ import annotations

import errno
import os

RAM_MEMFD_NAME = "husk-guest-ram"
COPY_CHUNK = 1 << 20
PAGE_SIZE = 4096
_ZERO_CHUNK = bytes(COPY_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


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
    writing only data: holes and all-zero pages are left as holes in the
    destination, which must be all holes to begin with. Returns the bytes written.

    Page by page, not chunk by chunk: a guest's RAM is a patchwork of used pages and
    free ones it zeroed, and every page written is a page of memory the copy holds.

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
                for run_start, run_end in _data_runs(chunk):
                    _write_all(dst_fd, memoryview(chunk)[run_start:run_end], offset + run_start)
                    written += run_end - run_start
            offset += len(chunk)
    return written


def _data_runs(chunk: bytes) -> list[tuple[int, int]]:
    """[start, end) of every run of pages in ``chunk`` that are not all zero."""
    runs: list[tuple[int, int]] = []
    run_start = -1
    for page in range(0, len(chunk), PAGE_SIZE):
        # bytes slices, not memoryview ones: their == is a memcmp (10x faster).
        is_zero = chunk[page:page + PAGE_SIZE] == _ZERO_PAGE[:len(chunk) - page]
        if is_zero and run_start >= 0:
            runs.append((run_start, page))
            run_start = -1
        elif not is_zero and run_start < 0:
            run_start = page
    if run_start >= 0:
        runs.append((run_start, len(chunk)))
    return runs


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def allocated_bytes(fd: int) -> int:
    """Bytes of the file that hold pages (not holes)."""
    return os.fstat(fd).st_blocks * 512


def allocated_bytes_of(path: os.PathLike[str]) -> int:
    """Bytes of the file at ``path`` that hold data (not holes). :raise OSError:"""
    return os.stat(path).st_blocks * 512
