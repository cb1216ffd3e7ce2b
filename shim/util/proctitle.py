"""The command line ``ps`` shows for this process.

A Python program's /proc/<pid>/cmdline starts with the interpreter. Shims are
found by operators' scripts as ``containerd-shim-<name> -namespace … -id …``,
so the daemon rewrites the argument area the kernel reads cmdline from, in
place, as setproctitle(3) does: the new text ends in a NUL and the area's last
byte is left non-zero, which tells the kernel to stop at that NUL.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# /proc/self/stat fields (1-based): arg_start and arg_end, since Linux 3.5.
ARG_START_FIELD = 48
ARG_END_FIELD = 49
FIRST_FIELD_AFTER_COMM = 3


def set_cmdline(args: list[str]) -> bool:
    """Show ``args`` (space-separated) as this process's command line; False if it won't fit."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start = int(fields[ARG_START_FIELD - FIRST_FIELD_AFTER_COMM])
        end = int(fields[ARG_END_FIELD - FIRST_FIELD_AFTER_COMM])
    except (OSError, IndexError, ValueError) as exc:
        log.debug("cannot read the argument area: %s", exc)
        return False
    text = " ".join(args).encode() + b"\0"
    size = end - start
    if start <= 0 or len(text) >= size:
        return False
    # Python copied argv at startup; nothing reads this memory but the kernel.
    ctypes.memmove(start, text + b"\0" * (size - len(text) - 1) + b" ", size)
    return True
