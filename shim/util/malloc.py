"""glibc's malloc kept from holding on to freed memory in a long-lived daemon.

glibc raises its mmap threshold each time it unmaps a freed block, up to 32 MiB:
after the first large transient buffer (a 1 MiB read of a template's RAM, a big
message), later ones of that size come from the heap or a thread's arena instead,
and freed memory at their top is trimmed only beyond twice the new threshold. A
daemon that restored its pod's RAM kept ~2 MiB that way. With the threshold fixed
at glibc's default, large blocks are mapped and unmapped as they come and go.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's default; fixing it stops the raising


def fix_mmap_threshold() -> bool:
    """Fix malloc's mmap threshold for this process (and children it forks);
    False (logged) on a libc without mallopt."""
    try:
        done = bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError) as exc:
        log.debug("no mallopt: %s", exc)
        return False
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return done
