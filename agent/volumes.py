"""Block volumes in the guest: making a filesystem on a blank disk, usage, growing.

A direct volume's disk is the pod's alone, hot-plugged by the host. The
agent formats it only when asked (``create_filesystem``) and only when no
filesystem is on it (blkid finds nothing: never over data), reports its usage
from statvfs (the kubelet's volume stats), and grows the filesystem after
the host grew the disk (block_resize), once the guest kernel sees the new size.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CommandError, DeadlineError, FailedPreconditionError
from agent.process import Reaper
from agent.runtime import run_program
from agent.storage import (BLKID_NOTHING_FOUND, GROWFS, MKFS, RESIZE_WAIT_S, SECTOR_BYTES,
                           TOOL_TIMEOUT_S, MountedStorage)
from proto.gen import agent_pb2 as pb

log = logging.getLogger(__name__)

BLKID = "blkid"
POLL_S = 0.05


@dataclass
class VolumeTools:
    reaper: Reaper
    sysfs: Path = Path("/sys")

    async def filesystem_of(self, device: str) -> str:
        """The filesystem type on ``device``, "" when blank (blkid's low-level probe)."""
        try:
            out = await run_program(self.reaper, [BLKID, "-p", "-o", "value", "-s", "TYPE",
                                                  device], TOOL_TIMEOUT_S, "blkid")
        except CommandError as exc:
            if f"exit status {BLKID_NOTHING_FOUND}" in str(exc):
                return ""
            raise
        return out.strip()

    async def make_filesystem_if_blank(self, device: str, fstype: str) -> None:
        found = await self.filesystem_of(device)
        if found:
            log.info("%s already holds a %s filesystem: not formatting it", device, found)
            return
        await run_program(self.reaper, [*MKFS[fstype], device], TOOL_TIMEOUT_S, MKFS[fstype][0])
        log.info("made a %s filesystem on %s", fstype, device)

    async def grow(self, volume: MountedStorage, size_bytes: int) -> None:
        """Wait until the guest sees the disk at ``size_bytes``, then grow its filesystem.

        :raise FailedPreconditionError: a filesystem the guest cannot grow.
        :raise DeadlineError: the new size never reached the guest.
        """
        fstype = volume.storage.fstype
        if fstype not in GROWFS:
            raise FailedPreconditionError(f"cannot grow a {fstype} filesystem in the guest "
                                          f"(it grows {', '.join(sorted(GROWFS))})")
        size_file = self.sysfs / "class" / "block" / Path(volume.device).name / "size"
        deadline = time.monotonic() + RESIZE_WAIT_S
        while int(size_file.read_text()) * SECTOR_BYTES < size_bytes:
            if time.monotonic() > deadline:
                raise DeadlineError(f"{volume.device} did not grow to {size_bytes} bytes in the "
                                    f"guest within {RESIZE_WAIT_S:.0f} s")
            await asyncio.sleep(POLL_S)
        await run_program(self.reaper, [GROWFS[fstype], volume.device], TOOL_TIMEOUT_S,
                          GROWFS[fstype])
        log.info("grew the %s filesystem on %s (%s) to %d bytes", fstype, volume.device,
                 volume.storage.mount_point, size_bytes)


def usage(mount_point: str) -> pb.VolumeStats:
    st = os.statvfs(mount_point)
    return pb.VolumeStats(capacity_bytes=st.f_blocks * st.f_frsize,
                          used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
                          available_bytes=st.f_bavail * st.f_frsize,
                          inodes=st.f_files, inodes_used=st.f_files - st.f_ffree,
                          inodes_free=st.f_ffree)
