"""The agent's block-volume tools against real disks (loop devices): format only a blank
disk, report usage, grow the filesystem after the disk grew."""
from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.errors import FailedPreconditionError
from agent.process import Reaper
from agent.storage import MountedStorage, Storage, mount, umount
from agent.volumes import VolumeTools, usage

MIB = 1 << 20
CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    status = Path("/proc/self/status").read_text()
    return bool(int(status.split("CapEff:")[1].split()[0], 16) & (1 << cap))


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        yield loop, image
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


async def test_a_blank_disk_is_formatted_and_a_formatted_one_is_not(
        reaper: Reaper, loop_disk: tuple[str, Path], tmp_path: Path) -> None:
    device, _ = loop_disk
    tools = VolumeTools(reaper)
    assert await tools.filesystem_of(device) == ""
    await tools.make_filesystem_if_blank(device, "ext4")
    assert await tools.filesystem_of(device) == "ext4"
    target = tmp_path / "mnt"
    target.mkdir()
    mount(device, str(target), "ext4")
    try:
        (target / "data").write_text("keep me")
    finally:
        umount(str(target))
    await tools.make_filesystem_if_blank(device, "ext4")  # must not wipe it
    mount(device, str(target), "ext4")
    try:
        assert (target / "data").read_text() == "keep me"
    finally:
        umount(str(target))


async def test_usage_and_growing(reaper: Reaper, loop_disk: tuple[str, Path],
                                 tmp_path: Path) -> None:
    device, image = loop_disk
    tools = VolumeTools(reaper)
    await tools.make_filesystem_if_blank(device, "ext4")
    target = tmp_path / "mnt"
    target.mkdir()
    mount(device, str(target), "ext4")
    volume = MountedStorage(Storage("blk", "10.0/00", "ext4", [], str(target)), device)
    try:
        before = usage(str(target))
        (target / "blob").write_bytes(os.urandom(4 * MIB))
        os.sync()
        after = usage(str(target))
        assert after.used_bytes - before.used_bytes >= 4 * MIB
        assert after.capacity_bytes < 33 * MIB and after.inodes_used > before.inodes_used - 1
        with pytest.raises(FailedPreconditionError, match="xfs"):
            await tools.grow(MountedStorage(Storage("blk", "10.0/00", "xfs", [], str(target)),
                                            device), 64 * MIB)
        if not _has_cap(CAP_SYS_RESOURCE):
            pytest.skip("online ext4 growing needs CAP_SYS_RESOURCE, which this machine's root "
                        "lacks; the VM test (test_cri_volumes.py) grows a volume in a guest")
        # The host grows the disk (for a loop device: the file, then a capacity re-read).
        with open(image, "r+b") as f:
            f.truncate(64 * MIB)
        subprocess.run(["losetup", "-c", device], check=True)
        await tools.grow(volume, 64 * MIB)
        assert usage(str(target)).capacity_bytes > 48 * MIB
    finally:
        umount(str(target))
