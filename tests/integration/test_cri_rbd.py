"""rbd direct volumes through the CRI: QEMU's own librbd opens a Ceph image and the
pod's VM gets it as a disk; the host never maps it.

A single-node cluster (tests/cri/ceph.py) runs in the session containerd's network
namespace, on 127.0.0.1 there, because that is where the shim's QEMU connects from.
Besides the happy path: a wrong cephx key, unreachable monitors and an unresponsive
OSD must fail the container quickly and clearly, and leave the pod as it was.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.storage.blockvolume import RBD_CONNECT_TIMEOUT_S
from shim.storage.directvolume import DirectVolumes, MountInfo
from tests.conftest import HUSK_CRI_STATE
from tests.cri.ceph import QEMU_POOL, QEMU_USER, CephCluster, generate_key, missing_programs
from tests.cri.cri import CriClient, CriError, Pod, api
from tests.cri.harness import Containerd, ContainerdOptions
from tests.cri.images import BUSYBOX_REF

log = logging.getLogger(__name__)

QEMU_RBD_MODULE = Path("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so")


def _missing() -> list[str]:
    missing = missing_programs()
    if not QEMU_RBD_MODULE.exists():
        missing.append(f"{QEMU_RBD_MODULE} (qemu-block-extra)")
    return missing


pytestmark = [
    pytest.mark.cri, pytest.mark.timeout(900),
    pytest.mark.skipif(bool(_missing()), reason=f"rbd volumes need {', '.join(_missing())}: "
                       "install ceph-mon ceph-osd ceph-common qemu-block-extra (make deps)"),
]

RECORDS = DirectVolumes(HUSK_CRI_STATE / "direct-volumes")
IMAGE_MIB = 64
MOUNT_POINT = "/data"
# A port on the cluster's 127.0.0.1 that nothing listens on (the mon has 3300 and 6789).
DEAD_MONITOR_PORT = 3390
# Starting a container (containerd 1.6 creates the shim's task, which attaches the
# volume, at StartContainer) that fails in the backend: containerd's and the shim's
# own work on a machine busy with TCG guests, on top of librbd's.
FAIL_MARGIN_S = 20.0
# When a probe of the pod runs while librbd is still connecting.
PROBE_DELAY_S = 2.0
WATCHERS_GONE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def ceph(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[CephCluster]:
    """The cluster for this module, where the session containerd's shims (and QEMUs) live."""
    with CephCluster.started(containerd.netns_path,
                             tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
        log.info("ceph cluster: bring-up %s; daemons' RSS at the end %s",
                 {k: round(v, 2) for k, v in cluster.timings.items()},
                 {k: f"{v >> 20} MiB" for k, v in cluster.rss_bytes().items()})
    assert not cluster.processes() and not cluster.dir.exists(), "the cluster left something"


@dataclass
class RbdVolume:
    """A Ceph image and the volume path (a CSI target dir) whose rbd record names it."""

    cluster: CephCluster
    image: str
    target: Path
    key_file: Path

    @classmethod
    def create(cls, cluster: CephCluster, root: Path, image: str,
               key: str | None = None) -> RbdVolume:
        """The image, and a root-only key file with ``key`` (default: client.qemu's)."""
        cluster.create_image(QEMU_POOL, image, IMAGE_MIB)
        key_file = root / f"{image}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((key or cluster.client_key(QEMU_USER)) + "\n")
        target = root / image / "mount"
        target.mkdir(parents=True)
        return cls(cluster, image, target, key_file)

    def record(self, monitors: str | None = None) -> None:
        RECORDS.add(str(self.target), MountInfo("rbd", f"{QEMU_POOL}/{self.image}", "ext4", {
            "pool": QEMU_POOL, "image": self.image,
            "monitors": monitors or self.cluster.monitors, "user": QEMU_USER,
            "keyFile": str(self.key_file), "createFilesystem": "true"}))

    def mount(self) -> api.Mount:
        return api.Mount(container_path=MOUNT_POINT, host_path=str(self.target))

    def watchers(self) -> list[dict[str, object]]:
        """The clients with the image open (QEMU's librbd while the disk is attached)."""
        status = json.loads(self.cluster.run(["rbd", "status", "--format", "json",
                                              f"{QEMU_POOL}/{self.image}"]))
        return list(status.get("watchers", []))

    def wait_closed(self) -> None:
        deadline = time.monotonic() + WATCHERS_GONE_TIMEOUT_S
        while self.watchers():
            assert time.monotonic() < deadline, f"{self.image} is still open: {self.watchers()}"
            time.sleep(0.5)

    def read_file(self, name: str, scratch: Path) -> str:
        """The file, from an export of the image, loop-mounted read-only on the host."""
        exported = self.cluster.export_image(QEMU_POOL, self.image, scratch / f"{self.image}.raw")
        probe = scratch / f"{self.image}-check"
        probe.mkdir()
        subprocess.run(["mount", "-o", "ro,loop", str(exported), str(probe)], check=True,
                       timeout=60)
        try:
            return (probe / name).read_text()
        finally:
            subprocess.run(["umount", "-d", str(probe)], check=True, timeout=60)
            exported.unlink()

    def close(self) -> None:
        RECORDS.remove(str(self.target))
        self.cluster.remove_image(QEMU_POOL, self.image)


@pytest.fixture
def volumes(ceph: CephCluster) -> Iterator[list[RbdVolume]]:
    made: list[RbdVolume] = []
    yield made
    for volume in made:
        volume.close()


def _host_rbd_devices() -> list[str]:
    return [str(p) for p in Path("/dev").glob("rbd*")] + \
        [str(p) for p in Path("/sys/bus/rbd/devices").glob("*")]


def _data_mount(cri: CriClient, cid: str) -> list[str]:
    mounts = cri.exec_sync(cid, ["cat", "/proc/mounts"]).out
    return [line for line in mounts.splitlines() if line.split()[1] == MOUNT_POINT]


def _exec_seconds(cri: CriClient, cid: str, delay: float) -> float:
    """How long an exec in ``cid`` takes, started after ``delay`` seconds."""
    time.sleep(delay)
    begin = time.monotonic()
    assert cri.exec_sync(cid, ["sh", "-c", "echo alive"]).out.strip() == "alive"
    return time.monotonic() - begin


def _assert_pod_unharmed(cri: CriClient, pod: Pod, running: str) -> None:
    """A container already running still answers, and a plain new one runs."""
    begin = time.monotonic()
    assert cri.exec_sync(running, ["sh", "-c", "echo alive"]).out.strip() == "alive"
    assert time.monotonic() - begin < FAIL_MARGIN_S, "the pod's VM is stalled"
    ok = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", "echo fine"])
    assert cri.wait_container_exit(ok, timeout=60).exit_code == 0


def test_container_writes_through_an_rbd_volume(cri: CriClient, ceph: CephCluster,
                                                volumes: list[RbdVolume],
                                                containerd_options: ContainerdOptions,
                                                tmp_path: Path) -> None:
    volume = RbdVolume.create(ceph, tmp_path, "vol1")
    volumes.append(volume)
    volume.record()
    pod = cri.run_pod("husk-rbd", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[volume.mount()])
    data = _data_mount(cri, cid)
    assert data and data[0].split()[0].startswith("/dev/vd") and data[0].split()[2] == "ext4", \
        f"{MOUNT_POINT} is not the rbd disk: {data}"
    assert RECORDS.user(str(volume.target)) == pod.id
    assert len(volume.watchers()) == 1, "QEMU's librbd does not have the image open"
    assert not _host_rbd_devices(), "the host mapped an rbd device"
    written = cri.exec_sync(cid, ["sh", "-c", f"echo from-the-guest > {MOUNT_POINT}/proof && "
                                              "sync"])
    assert written.exit_code == 0, written.err
    # Grown live: QEMU's librbd resizes the image, the agent the filesystem.
    config = containerd_options.husk_config
    assert config is not None
    size = 2 * IMAGE_MIB * (1 << 20)
    resize = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(config),
                             "direct-volume", "resize", "--volume-path", str(volume.target),
                             "--size", str(size)], capture_output=True, text=True, timeout=300)
    assert resize.returncode == 0, resize.stderr
    assert json.loads(resize.stdout)["capacity_bytes"] > 1.5 * IMAGE_MIB * (1 << 20)
    info = json.loads(ceph.run(["rbd", "info", "--format", "json",
                                f"{QEMU_POOL}/{volume.image}"]))
    assert info["size"] == size, "the image itself did not grow"
    cri.stop_container(cid, timeout=1)
    cri.remove_container(cid)
    volume.wait_closed()  # unplugged and closed with its container, the pod still runs
    assert RECORDS.user(str(volume.target)) is None, "the volume is still claimed"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    assert volume.read_file("proof", tmp_path) == "from-the-guest\n"
    assert not _host_rbd_devices()


def _fails_fast(cri: CriClient, pod: Pod, volume: RbdVolume, match: str,
                within: float) -> tuple[float, str]:
    """A container with the volume fails with ``match`` in the error within ``within``
    seconds; returns how long it took and the error. (containerd 1.6 creates the
    shim's task, and so attaches the volume, at StartContainer, not CreateContainer.)"""
    cid = cri.create_container(pod, BUSYBOX_REF, ["true"], mounts=[volume.mount()])
    begin = time.monotonic()
    with pytest.raises(CriError, match=match) as failure:
        cri.start_container(cid)
    elapsed = time.monotonic() - begin
    log.info("failed in %.1fs: %s", elapsed, failure.value)
    assert elapsed < within, f"failing took {elapsed:.1f}s: {failure.value}"
    assert RECORDS.user(str(volume.target)) is None, "the failed volume is still claimed"
    assert not volume.watchers(), "a failed attach left the image open"
    return elapsed, str(failure.value)


def _fails_fast_unchecked(cri: CriClient, pod: Pod, volume: RbdVolume, within: float) -> None:
    """A container with the volume fails within ``within`` seconds (while the cluster
    cannot be asked about the image)."""
    cid = cri.create_container(pod, BUSYBOX_REF, ["true"], mounts=[volume.mount()])
    begin = time.monotonic()
    with pytest.raises(CriError) as failure:
        cri.start_container(cid, timeout=within + FAIL_MARGIN_S)
    elapsed = time.monotonic() - begin
    log.info("failed in %.1fs: %s", elapsed, failure.value)
    assert elapsed < within, f"failing took {elapsed:.1f}s: {failure.value}"


def test_wrong_key_fails_the_container_and_leaves_nothing(cri: CriClient, ceph: CephCluster,
                                                          volumes: list[RbdVolume],
                                                          tmp_path: Path) -> None:
    volume = RbdVolume.create(ceph, tmp_path, "wrongkey", key=generate_key())
    volumes.append(volume)
    volume.record()
    pod = cri.run_pod("husk-rbd-key", handler="husk")
    try:
        running = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
        elapsed, error = _fails_fast(cri, pod, volume, "Permission denied", FAIL_MARGIN_S)
        assert "wrongkey" in error or str(volume.target) in error, error
        _assert_pod_unharmed(cri, pod, running)
    finally:
        cri.remove_all_pods()


def test_unreachable_monitors_fail_within_the_connect_timeout(
        cri: CriClient, containerd: Containerd, ceph: CephCluster,
        volumes: list[RbdVolume], tmp_path: Path) -> None:
    with pytest.raises(ConnectionRefusedError):
        containerd.connect("127.0.0.1", DEAD_MONITOR_PORT).close()
    volume = RbdVolume.create(ceph, tmp_path, "nomon")
    volumes.append(volume)
    volume.record(monitors=f"127.0.0.1:{DEAD_MONITOR_PORT}")
    pod = cri.run_pod("husk-rbd-nomon", handler="husk")
    try:
        running = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
        with ThreadPoolExecutor(1) as pool:
            # librbd connects on QEMU's main loop, so the VM stalls meanwhile; but
            # for the shim's connect timeout, not librbd's default 300 s.
            probe: Future[float] = pool.submit(_exec_seconds, cri, running, PROBE_DELAY_S)
            elapsed, error = _fails_fast(cri, pod, volume, "Connection timed out",
                                         RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S)
            stalled = probe.result(timeout=RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S)
        log.info("an exec during the failing attach took %.1fs", stalled)
        # librbd's own timeout, not an earlier refusal: the monitors were tried.
        assert elapsed >= RBD_CONNECT_TIMEOUT_S - 1, f"{elapsed:.1f}s: {error}"
        assert stalled < RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S, f"the pod stalled {stalled:.1f}s"
        _assert_pod_unharmed(cri, pod, running)
    finally:
        cri.remove_all_pods()


def test_cluster_listens_in_containerds_netns_only(containerd: Containerd,
                                                   ceph: CephCluster) -> None:
    """The mon is on 127.0.0.1:3300 where the shims are, and not on the host's network."""
    def listening(argv: list[str]) -> set[str]:
        lines = subprocess.run(argv, capture_output=True, text=True, check=True,
                               timeout=30).stdout.splitlines()
        return {line.split()[3] for line in lines}

    inside = listening(["nsenter", f"--net={containerd.netns_path}", "--", "ss", "-Hltn"])
    assert ceph.monitors in inside, inside
    host = listening(["ss", "-Hltn"])
    assert not {a for a in host if a.rsplit(":", 1)[1] in ("3300", "6789")}, host
    assert ceph.daemon_pids().keys() == {"osd.0", "mon.a"}


def test_stopping_the_pod_with_the_volume_attached_releases_it(
        cri: CriClient, ceph: CephCluster, volumes: list[RbdVolume], tmp_path: Path) -> None:
    """The VM goes with the disk still attached: the image is closed (no watcher left
    to time out, no lock left to break) and the next pod gets it with its data."""
    volume = RbdVolume.create(ceph, tmp_path, "podstop")
    volumes.append(volume)
    volume.record()
    first = cri.run_pod("husk-rbd-stop", handler="husk")
    cid = cri.run_container(first, BUSYBOX_REF, ["sleep", "600"], mounts=[volume.mount()])
    written = cri.exec_sync(cid, ["sh", "-c", f"echo kept > {MOUNT_POINT}/proof && sync"])
    assert written.exit_code == 0, written.err
    cri.stop_pod(first.id)
    cri.remove_pod(first.id)
    assert RECORDS.user(str(volume.target)) is None, "the volume is still claimed"
    begin = time.monotonic()
    volume.wait_closed()
    log.info("image closed %.1fs after the pod was removed", time.monotonic() - begin)
    second = cri.run_pod("husk-rbd-stop-2", handler="husk")
    try:
        cid = cri.run_container(second, BUSYBOX_REF, ["sleep", "600"], mounts=[volume.mount()])
        assert cri.exec_sync(cid, ["cat", f"{MOUNT_POINT}/proof"]).out == "kept\n"
    finally:
        cri.remove_all_pods()



def test_unresponsive_osds_fail_the_container_not_the_pod(
        cri: CriClient, ceph: CephCluster, volumes: list[RbdVolume], tmp_path: Path) -> None:
    """The monitors answer but the OSD does not (stopped): the image's header never
    comes. The container must fail in bounded time and the pod must carry on."""
    volume = RbdVolume.create(ceph, tmp_path, "noosd")
    volumes.append(volume)
    volume.record()
    pod = cri.run_pod("husk-rbd-noosd", handler="husk")
    osd = ceph.daemon_pids()["osd.0"]
    try:
        running = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
        os.kill(osd, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            probe: Future[float] = pool.submit(_exec_seconds, cri, running, PROBE_DELAY_S)
            try:
                _fails_fast_unchecked(cri, pod, volume, RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S)
            finally:
                os.kill(osd, signal.SIGCONT)  # a stalled probe can finish, too
            stalled = probe.result(timeout=RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S)
        assert stalled < RBD_CONNECT_TIMEOUT_S + FAIL_MARGIN_S, f"the pod stalled {stalled:.1f}s"
        assert RECORDS.user(str(volume.target)) is None, "the failed volume is still claimed"
        _assert_pod_unharmed(cri, pod, running)
        volume.wait_closed()  # no half-open image left in QEMU once the OSD is back
    finally:
        os.kill(osd, signal.SIGCONT)
        cri.remove_all_pods()
