"""The guest's identity from its host: entropy and the wall clock.

A guest restored from a template starts with its template's kernel random
state and clock; the vmgenid device makes the kernel reseed on restore, and
CreateSandbox brings fresh entropy from the host and the host's time on top,
before anything of the pod runs.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time

from agent.errors import GuestError, InvalidArgumentError

log = logging.getLogger(__name__)

URANDOM = "/dev/urandom"
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the kernel's CRNG from its input pool
MAX_SEED_BYTES = 512
# A cold-booted guest's clock comes from the host's RTC; less drift than this is left alone.
CLOCK_SLACK_S = 0.5


def mix_in_entropy(seed: bytes, device: str = URANDOM) -> None:
    """Mix ``seed`` into the kernel's pool and reseed its CRNG with it.

    :raise InvalidArgumentError: an oversized seed.
    :raise GuestError: the kernel refused.
    """
    if len(seed) > MAX_SEED_BYTES:
        raise InvalidArgumentError(f"random seed of {len(seed)} bytes (at most {MAX_SEED_BYTES})")
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, seed)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as e:
        raise GuestError(f"cannot reseed the random number generator: {e.strerror}") from e


def set_clock(clock_ns: int) -> float:
    """Set the wall clock to the host's when it is off by more than CLOCK_SLACK_S;
    returns by how much it was behind (seconds, negative when ahead).

    :raise GuestError: the kernel refused.
    """
    behind = (clock_ns - time.time_ns()) / 1e9
    if abs(behind) > CLOCK_SLACK_S:
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, clock_ns)
        except OSError as e:
            raise GuestError(f"cannot set the clock: {e.strerror}") from e
        log.info("clock set to the host's (it was %.1f s %s)", abs(behind),
                 "behind" if behind > 0 else "ahead")
    return behind
