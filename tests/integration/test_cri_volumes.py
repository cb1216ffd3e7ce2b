"""Direct block volumes through the CRI: a host block device (a loop device standing in
for a mapped RBD or an LVM volume) reaches the pod's VM as a disk, never mounted on the
host, chosen by its direct-volume record."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.storage.directvolume import DirectVolumes, MountInfo
from tests.conftest import HUSK_CRI_STATE
from tests.cri.cri import CriClient, CriError, api
from tests.cri.harness import ContainerdOptions
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(900)]

MIB = 1 << 20
RECORDS = DirectVolumes(HUSK_CRI_STATE / "direct-volumes")


class LoopDisk:
    """A file-backed loop device and the volume path (a CSI target dir) that names it."""

    def __init__(self, root: Path, name: str, size: int = 64 * MIB) -> None:
        self.image = root / f"{name}.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.device = subprocess.run(["losetup", "--find", "--show", str(self.image)],
                                     capture_output=True, text=True, check=True).stdout.strip()
        self.target = root / name / "mount"
        self.target.mkdir(parents=True)

    def record(self, **metadata: str) -> None:
        RECORDS.add(str(self.target), MountInfo("block", self.device, "ext4",
                                                {"createFilesystem": "true", **metadata}))

    def mount(self, path: str = "/data", readonly: bool = False) -> api.Mount:
        return api.Mount(container_path=path, host_path=str(self.target), readonly=readonly)

    def holders(self) -> list[int]:
        """Pids with the device open (QEMU while the disk is attached)."""
        found = []
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            try:
                if any(os.readlink(fd) == self.device for fd in fd_dir.iterdir()):
                    found.append(int(fd_dir.parent.name))
            except OSError:
                continue
        return found

    def free_on_host(self) -> bool:
        return not self.holders()

    def read_file(self, name: str) -> str:
        probe = self.image.parent / f"{self.image.stem}-check"
        probe.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "ro", self.device, str(probe)], check=True)
        try:
            return (probe / name).read_text()
        finally:
            subprocess.run(["umount", str(probe)], check=True)

    def close(self) -> None:
        RECORDS.remove(str(self.target))
        subprocess.run(["losetup", "-d", self.device], check=False)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[list[LoopDisk]]:
    made: list[LoopDisk] = []
    yield made
    for disk in made:
        disk.close()


def _wait_free(disk: LoopDisk) -> None:
    deadline = time.monotonic() + 30
    while not disk.free_on_host():
        assert time.monotonic() < deadline, f"{disk.device} is still held after the pod"
        time.sleep(0.2)


def _husk(config: Path, *args: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(config),
                           "direct-volume", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_block_volume_is_a_disk_in_the_guest(cri: CriClient, disks: list[LoopDisk],
                                             containerd_options: ContainerdOptions,
                                             tmp_path: Path) -> None:
    disk = LoopDisk(tmp_path, "vol-a")
    disks.append(disk)
    disk.record()
    pod = cri.run_pod("husk-blk", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[disk.mount()])
    mounts = cri.exec_sync(cid, ["cat", "/proc/mounts"]).out
    data = [line for line in mounts.splitlines() if line.split()[1] == "/data"]
    assert data and data[0].split()[0].startswith("/dev/vd") and data[0].split()[2] == "ext4", \
        f"/data is not the disk: {data or mounts}"
    assert not [line for line in mounts.splitlines()
                if line.split()[1] == "/data" and "virtiofs" in line]
    assert not disk.free_on_host(), "QEMU does not hold the device"
    assert str(disk.device) not in Path("/proc/mounts").read_text(), "the host mounted it"
    # Another pod cannot have it while this one does.
    other = cri.run_pod("husk-blk-2", handler="husk")
    with pytest.raises(CriError, match="used by pod sandbox"):
        cri.run_container(other, BUSYBOX_REF, ["true"], mounts=[disk.mount()])
    cri.stop_pod(other.id)
    cri.remove_pod(other.id)
    written = cri.exec_sync(cid, ["sh", "-c", "echo from-the-guest > /data/proof && "
                                        "dd if=/dev/zero of=/data/blob bs=1M count=8 && sync"])
    assert written.exit_code == 0, written.err
    # stats (a CSI plugin's NodeGetVolumeStats) report the guest's usage...
    config = containerd_options.husk_config
    assert config is not None
    stats = _husk(config, "stats", "--volume-path", str(disk.target))
    assert 50 * MIB < stats["capacity_bytes"] < 64 * MIB and stats["used_bytes"] >= 8 * MIB
    # ...and resize (NodeExpandVolume) grows it live, once the host device has grown.
    with open(disk.image, "r+b") as f:
        f.truncate(128 * MIB)
    subprocess.run(["losetup", "-c", disk.device], check=True)
    grown = _husk(config, "resize", "--volume-path", str(disk.target), "--size", str(128 * MIB))
    assert grown["capacity_bytes"] > 100 * MIB, grown
    df = cri.exec_sync(cid, ["df", "-k", "/data"]).out.splitlines()[-1].split()
    assert int(df[1]) * 1024 > 100 * MIB, df
    cri.stop_container(cid, timeout=1)
    cri.remove_container(cid)
    _wait_free(disk)  # unplugged with its container, the pod still runs
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    assert disk.read_file("proof") == "from-the-guest\n"
    assert RECORDS.user(str(disk.target)) is None, "the volume is still claimed"


def test_bad_records_fail_the_container_and_leave_nothing(cri: CriClient,
                                                          disks: list[LoopDisk],
                                                          tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "mount"
    missing.mkdir(parents=True)
    RECORDS.add(str(missing), MountInfo("block", "/dev/husk-no-such-disk", "ext4"))
    busy = LoopDisk(tmp_path, "busy")
    disks.append(busy)
    busy.record()
    subprocess.run(["mkfs.ext4", "-q", busy.device], check=True)
    held = tmp_path / "held"
    held.mkdir()
    subprocess.run(["mount", busy.device, str(held)], check=True)
    pod = cri.run_pod("husk-badvol", handler="husk")
    try:
        with pytest.raises(CriError, match="husk-no-such-disk"):
            cri.run_container(pod, BUSYBOX_REF, ["true"], mounts=[
                api.Mount(container_path="/data", host_path=str(missing))])
        with pytest.raises(CriError, match="in use on the host"):
            cri.run_container(pod, BUSYBOX_REF, ["true"], mounts=[busy.mount()])
        assert RECORDS.user(str(missing)) is None and RECORDS.user(str(busy.target)) is None
        # The pod is unharmed: a plain container still runs.
        ok = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", "echo fine"])
        assert cri.wait_container_exit(ok, timeout=60).exit_code == 0
    finally:
        subprocess.run(["umount", str(held)], check=False)
        RECORDS.remove(str(missing))
        cri.remove_all_pods()


def test_ten_volumes_come_and_go_twice(cri: CriClient, disks: list[LoopDisk],
                                       tmp_path: Path) -> None:
    """Hot-add and remove 10 volumes on one pod, twice: the second round needs the
    first round's slots back; afterwards QEMU holds none of the devices."""
    for i in range(10):
        disks.append(LoopDisk(tmp_path, f"many-{i}", size=16 * MIB))
        disks[-1].record()
    pod = cri.run_pod("husk-many", handler="husk")
    try:
        for round_ in range(2):
            cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[
                d.mount(f"/v{i}") for i, d in enumerate(disks)])
            mounts = cri.exec_sync(cid, ["cat", "/proc/mounts"]).out
            devices = {line.split()[0] for line in mounts.splitlines()
                       if line.split()[1].startswith("/v")}
            assert len(devices) == 10 and all(d.startswith("/dev/vd") for d in devices), mounts
            cri.exec_sync(cid, ["sh", "-c", f"for i in $(seq 0 9); do echo {round_} > /v$i/r; done"])
            cri.stop_container(cid, timeout=1)
            cri.remove_container(cid)
            for disk in disks:
                _wait_free(disk)
    finally:
        cri.remove_all_pods()
    assert {disk.read_file("r") for disk in disks} == {"1\n"}
    assert json.loads(json.dumps([RECORDS.user(str(d.target)) for d in disks])) == [None] * 10
