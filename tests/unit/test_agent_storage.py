"""Guest mounts (agent/storage.py): options, PCI path resolution, real mount(2) calls."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import storage as st
from agent.errors import DeadlineError, GuestError, InvalidArgumentError
from agent.storage import (MS_NODEV, MS_NOSUID, MS_RDONLY, Storage, mount_storage,
                           resolve_pci_path, split_options, wait_for_block_device)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


def test_split_options() -> None:
    flags, data = split_options(["ro", "nosuid", "nodev", "trans=virtio", "msize=512000", ""])
    assert flags == MS_RDONLY | MS_NOSUID | MS_NODEV
    assert data == "trans=virtio,msize=512000"
    assert split_options(["ro", "rw"]) == (0, "")


@pytest.mark.parametrize("storage, message", [
    (Storage("overlay", "x", "", [], "/run/x"), "not supported"),
    (Storage("virtio-fs", "tag", "virtiofs", [], "run/x"), "absolute path"),
    (Storage("virtio-fs", "tag", "virtiofs", [], "/run/../x"), "normalized"),
    (Storage("virtio-fs", "tag", "virtiofs", [], "/"), "cannot be mounted on /"),
    (Storage("9p", "", "9p", [], "/run/x"), "no source"),
    (Storage("blk", "zz/01", "ext4", [], "/run/x"), "invalid PCI path"),
    (Storage("blk", "02/01", "", [], "/run/x"), "needs an fstype"),
])
def test_storage_check(storage: Storage, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        storage.check()


def fake_pci_disk(sysfs: Path, devfs: Path, name: str = "vdb") -> None:
    """A virtio-blk disk at PCI path 02/01: slot 2 of the root bus is a bridge to bus 01."""
    bridge = sysfs / "devices" / "pci0000:00" / "0000:00:02.0"
    (bridge / "pci_bus" / "0000:01").mkdir(parents=True)
    (bridge / "0000:01:01.0" / "virtio3" / "block" / name).mkdir(parents=True)
    devfs.mkdir(exist_ok=True)


async def test_pci_path_resolution(tmp_path: Path) -> None:
    sysfs, devfs = tmp_path / "sys", tmp_path / "dev"
    assert resolve_pci_path("02/01", sysfs) is None
    fake_pci_disk(sysfs, devfs)
    assert resolve_pci_path("02/01", sysfs) == \
        sysfs / "devices/pci0000:00/0000:00:02.0/0000:01:01.0"
    assert resolve_pci_path("02", sysfs) == sysfs / "devices/pci0000:00/0000:00:02.0"
    assert resolve_pci_path("03/01", sysfs) is None
    # A root port that is function 3 of slot 0x10 (husk's hot-plug ports).
    port = sysfs / "devices" / "pci0000:00" / "0000:00:10.3"
    (port / "pci_bus" / "0000:05").mkdir(parents=True)
    (port / "0000:05:00.0").mkdir()
    assert resolve_pci_path("10.3/00", sysfs) == port / "0000:05:00.0"
    with pytest.raises(InvalidArgumentError):
        resolve_pci_path("10.8/00", sysfs)

    # The /dev node shows up late (hotplug): the wait sees it.
    async def appear() -> None:
        await asyncio.sleep(0.2)
        (devfs / "vdb").touch()

    task = asyncio.ensure_future(appear())
    assert await wait_for_block_device("02/01", sysfs=sysfs, devfs=devfs, timeout=5) == devfs / "vdb"
    await task
    with pytest.raises(DeadlineError, match="PCI path 04/01"):
        await wait_for_block_device("04/01", sysfs=sysfs, devfs=devfs, timeout=0.2)


def _virtiofs_bound(sysfs: Path) -> Path:
    """A sysfs where a virtio-fs device is bound to its driver."""
    device = sysfs / "bus" / "virtio" / "drivers" / "virtiofs" / "virtio3"
    device.mkdir(parents=True)
    return sysfs


async def test_shared_fs_mount_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str, int, str]] = []
    monkeypatch.setattr(st, "mount", lambda *args: calls.append(args))
    target = tmp_path / "shared"
    await mount_storage(Storage("virtio-fs", "husk-shared", "virtiofs", [], str(target)),
                        sysfs=_virtiofs_bound(tmp_path / "sys"))
    await mount_storage(Storage("9p", "husk-shared", "9p", ["msize=512000", "cache=mmap"],
                                str(target)))
    await mount_storage(Storage("9p", "tag", "", ["trans=fd", "ro"], str(target)))
    assert calls == [
        ("husk-shared", str(target), "virtiofs", 0, ""),
        ("husk-shared", str(target), "9p", 0,
         "msize=512000,cache=mmap,trans=virtio,version=9p2000.L"),
        ("tag", str(target), "9p", MS_RDONLY, "trans=fd,version=9p2000.L"),
    ]
    assert target.is_dir()  # created


async def test_virtiofs_mount_waits_for_a_hot_plugged_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restore from a template the device arrives just before CreateSandbox."""
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(st, "mount", lambda *args: calls.append(args))
    storage = Storage("virtio-fs", "husk-shared", "virtiofs", [], str(tmp_path / "m"))
    mounting = asyncio.create_task(mount_storage(storage, sysfs=tmp_path / "sys"))
    await asyncio.sleep(0.2)
    assert not calls and not mounting.done()
    _virtiofs_bound(tmp_path / "sys")
    await asyncio.wait_for(mounting, 2)
    assert calls and calls[0][0] == "husk-shared"
    with pytest.raises(DeadlineError, match="no virtio-fs device"):
        await st.wait_for_virtiofs(sysfs=tmp_path / "empty", timeout=0.2)


async def test_virtiofs_mount_retries_until_the_tag_is_registered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's sysfs link precedes the tag: mount(2) says EINVAL meanwhile."""
    attempts: list[str] = []

    def mount(source: str, *rest: object) -> None:
        attempts.append(source)
        if len(attempts) < 3:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(st, "mount", mount)
    storage = Storage("virtio-fs", "husk-shared", "virtiofs", [], str(tmp_path / "m"))
    await mount_storage(storage, sysfs=_virtiofs_bound(tmp_path / "sys"))
    assert attempts == ["husk-shared"] * 3
    # Another error, or EINVAL past the deadline, is the storage's failure.
    monkeypatch.setattr(st, "mount", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "x")))
    with pytest.raises(OSError):
        await st.mount_virtiofs("husk-shared", str(tmp_path / "m"), 0, "", timeout=0.1)


async def test_mount_failure_is_a_guest_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Outside a VM there is no virtiofs tag like this: mount(2) fails cleanly.
        with pytest.raises(GuestError, match="no-such-tag"):
            await mount_storage(Storage("virtio-fs", "no-such-tag", "", [],
                                        str(tmp_path / "m")), sysfs=_virtiofs_bound(tmp_path / "sys"))
    assert not os.path.ismount(tmp_path / "m")


BLK_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    from agent.storage import Storage, mount_storage
    sysfs, devfs, target = map(Path, sys.argv[1:4])
    async def main():
        m = await mount_storage(Storage("blk", "02/01", "ext4", ["nodev", "noexec"], str(target)),
                                sysfs=sysfs, devfs=devfs)
        (target / "hello").write_text("on the volume")
        with open("/proc/self/mountinfo") as f:
            line = next(l for l in f if l.split()[4] == str(target))
        m.unmount()
        return {"mountinfo": line, "after": os.path.ismount(target)}
    print(json.dumps(asyncio.run(main())))
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"),
                    reason="needs root and loop devices")
def test_blk_volume_mounts_for_real(tmp_path: Path) -> None:
    """A loop device stands in for the virtio-blk disk; the mount runs in a private
    mount namespace so nothing can leak onto the host."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        sysfs, devfs, target = tmp_path / "sys", tmp_path / "dev", tmp_path / "vol"
        fake_pci_disk(sysfs, devfs)
        (devfs / "vdb").symlink_to(loop)
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                              "-c", BLK_SCRIPT, str(sysfs), str(devfs), str(target)],
                             cwd=REPO, check=True, capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    result = json.loads(out.stdout)
    fields = result["mountinfo"].split()
    assert "nodev" in fields[5] and "noexec" in fields[5]
    assert fields[fields.index("-") + 1] == "ext4"
    assert result["after"] is False
    assert not os.path.ismount(target)


async def test_ephemeral_storage_is_a_real_tmpfs(tmp_path: Path) -> None:
    target = tmp_path / "pod-shm"
    mounted = await mount_storage(Storage(driver="ephemeral", source="shm", fstype="",
                                          options=["mode=1777", "size=1m"],
                                          mount_point=str(target)))
    try:
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if x.split()[4] == str(target))
        assert " - tmpfs " in line
        (target / "x").write_text("ok")
    finally:
        mounted.unmount()
    assert not (target / "x").exists()


HOLDS_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from agent.storage import SubmountHolds
    root = sys.argv[1]
    rootfs, volume, plain = (os.path.join(root, n) for n in ("rootfs", "volume", "plain"))
    for path in (rootfs, volume, plain):
        os.mkdir(path)
    for path in (rootfs, volume):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
    holds = SubmountHolds()
    holds.hold("a", [rootfs, volume, plain, os.path.join(root, "missing")])
    holds.hold("b", [volume])
    held = holds.paths
    holds.release("a")
    after_a = [os.path.ismount(rootfs), os.path.ismount(volume)]
    holds.release("b")
    print(json.dumps({"held": held, "after_a": after_a, "after_b": os.path.ismount(volume),
                      "left": holds.paths}))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts in a private namespace)")
def test_submounts_are_held_until_their_last_container_goes(tmp_path: Path) -> None:
    """tmpfs mounts stand in for virtio-fs submounts (another st_dev than the parent)."""
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", HOLDS_SCRIPT, str(tmp_path)],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=30)
    result = json.loads(out.stdout)
    assert result["held"] == [str(tmp_path / "rootfs"), str(tmp_path / "volume")]
    assert result["after_a"] == [False, True]  # b still uses the volume
    assert result["after_b"] is False
    assert result["left"] == []


NOFOLLOW_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from agent.storage import umount
    root = sys.argv[1]
    target, link = os.path.join(root, "target"), os.path.join(root, "link")
    os.mkdir(target)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    os.symlink(target, link)
    umount(link)  # a symlink where a mount point was: not followed
    print(os.path.ismount(target))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts in a private namespace)")
def test_umount_does_not_follow_a_symlink(tmp_path: Path) -> None:
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", NOFOLLOW_SCRIPT, str(tmp_path)],
                         cwd=REPO, check=True, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "True"
