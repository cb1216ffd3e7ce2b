"""make bench-io: fio in a container, on each kind of storage husk gives a pod, against runc.

One containerd, both handlers; one backend after the other, each in a pod of
its own that is gone before the next one boots, so each is measured alone:

- runc_hostpath: a runc pod with a host directory bind-mounted: the ceiling
  (the host's own filesystem, no VM in the path);
- husk_virtiofs: a husk pod with a host directory the same way, which reaches
  the VM through the shared filesystem (virtiofsd on the host);
- husk_block: a husk pod with a `block` direct volume: a loop device over a file
  in the same host filesystem, hot-plugged as a virtio-blk disk (QEMU's
  host_device, aio=native, cache.direct), ext4 made by the guest;
- husk_rbd: a husk pod with an `rbd` direct volume: an image of a single-node
  Ceph (tests/cri/ceph.py: one mon and one OSD whose store is RAM, in
  containerd's netns, where QEMU's librbd connects from), up only meanwhile.

In each container an untimed fio run writes the data file first (so no round
lays it out, and TCG has translated fio's code by then); then BENCH_RUNS rounds
(default 3) of one fio run: four jobs one after the other on that file,
sequential read and write in 1 MiB blocks, random read and write in 4 KiB
blocks, all direct=1 with libaio at a small iodepth, each ramping up for RAMP_S
and then measured for RUNTIME_S. Printed as JSON (and written to
build/bench/io.json): per metric each backend's median, its ratio to the
ceiling and every run; and the issue's goal, direct block at least 3x virtio-fs
in 4 KiB random-read IOPS.

direct=1 is the guest's: below the VM, virtiofsd opens files without O_DIRECT
(it has no allow_direct_io) and the loop device is buffered (losetup's default),
so husk_virtiofs and husk_block both reach the host's page cache, while the
ceiling's O_DIRECT goes to the host's disk.

Under TCG a husk pod's I/O sometimes never completes (a few in a hundred fio
runs, on virtio-fs and rbd alike): fio then hangs and the pod cannot stop. A
fio run that takes EXEC_TIMEOUT_S counts as hung: the pod's VM is killed (so the
pod can be removed), and the backend starts over once in a new pod on a new
volume; the JSON lists each backend's hung attempts.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as api

from shim.config import load_config
from shim.storage.directvolume import DirectVolumes, MountInfo
from tests.bench import emit, machine
from tests.conftest import write_test_config
from tests.cri.ceph import QEMU_POOL, QEMU_USER, CephCluster
from tests.cri.cri import CriClient, CriError
from tests.cri.harness import REPO_ROOT, Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import FIO_REF, build_fio_image, build_images

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
OUTPUT = REPO_ROOT / "build" / "bench" / "io.json"
# containerd's log (the shims' are in it) of every run, for when one fails.
LOGS_DIR = REPO_ROOT / "build" / "bench" / "logs"
# Disk-backed on Debian (a tmpfs /tmp would refuse the ceiling's O_DIRECT and put
# the loop device's file in RAM).
WORK_BASE = Path("/var/tmp")
CEILING = "runc_hostpath"
MIB = 1 << 20

MOUNT_POINT = "/data"
DATA_FILE = f"{MOUNT_POINT}/fio.dat"
FILE_MIB = 128
# The loop device's file and the rbd image: ext4's own blocks, then the data file.
VOLUME_MIB = 512
# Each job a few seconds under TCG: a round is 4 x (RAMP_S + RUNTIME_S) plus fio's start.
RUNTIME_S = 5
RAMP_S = 1
IOENGINE = "libaio"
IODEPTH = 4
# A round takes ~30 s: a fio run this long is hung (IoHang).
EXEC_TIMEOUT_S = 120
IDLE_COMMAND = ["sleep", "86400"]
# After a failure: the pod gets this long to stop before containerd's teardown takes over.
FAILED_POD_STOP_TIMEOUT_S = 30.0
# A backend whose pod's I/O hangs gets a new pod (and volume) this many times.
HANG_RETRIES = 1
# In husk's sandbox run dir (<state_dir>/sb/<pod id>/).
QEMU_PID_FILE = "qemu.pid"
# The shim reports a killed VM's containers exited within seconds (tests/integration/test_faults.py).
VM_GONE_TIMEOUT_S = 30.0
# fio's latency percentile key in its JSON.
P99 = "99.000000"

GOAL_METRIC = "rand_read_iops"
GOAL_BACKEND = "husk_block"
GOAL_BASELINE = "husk_virtiofs"
GOAL_RATIO = 3.0


@dataclass(frozen=True)
class Job:
    """One fio job of a round; its name prefixes its metrics."""

    name: str
    rw: str  # fio's rw=
    block: str  # fio's bs=

    @property
    def direction(self) -> str:
        """The section of fio's JSON job that has the figures."""
        return "write" if self.rw.endswith("write") else "read"

    @property
    def sequential(self) -> bool:
        return not self.rw.startswith("rand")

    def args(self) -> list[str]:
        # stonewall: the job starts when the one before it has finished.
        return [f"--name={self.name}", f"--rw={self.rw}", f"--bs={self.block}", "--stonewall"]


JOBS = (Job("seq_read", "read", "1m"), Job("seq_write", "write", "1m"),
        Job("rand_read", "randread", "4k"), Job("rand_write", "randwrite", "4k"))
# Options before the first --name are every job's.
COMMON_ARGS = ["--output-format=json", f"--filename={DATA_FILE}", f"--size={FILE_MIB}m",
               "--direct=1", f"--ioengine={IOENGINE}", f"--iodepth={IODEPTH}"]
LAYOUT_ARGS = [*COMMON_ARGS, "--name=layout", "--rw=write", "--bs=1m"]
# lat_percentiles: percentiles of the whole latency (submission to completion), not clat's.
ROUND_ARGS = [*COMMON_ARGS, "--time_based", f"--runtime={RUNTIME_S}", f"--ramp_time={RAMP_S}",
              "--lat_percentiles=1", *(arg for job in JOBS for arg in job.args())]


@dataclass(frozen=True)
class Round:
    """One fio run's figures, named <job>_<metric>."""

    seq_read_mib_s: float
    seq_write_mib_s: float
    rand_read_iops: float
    rand_read_lat_mean_us: float
    rand_read_lat_p99_us: float
    rand_write_iops: float
    rand_write_lat_mean_us: float
    rand_write_lat_p99_us: float

    @classmethod
    def from_fio(cls, report: dict[str, Any]) -> Round:
        jobs = {job["jobname"]: job for job in report["jobs"]}
        values: dict[str, float] = {}
        for job in JOBS:
            side = jobs[job.name][job.direction]
            if not side["total_ios"]:
                raise RuntimeError(f"fio job {job.name} did no I/O")
            if job.sequential:
                values[f"{job.name}_mib_s"] = side["bw_bytes"] / MIB
                continue
            values[f"{job.name}_iops"] = side["iops"]
            values[f"{job.name}_lat_mean_us"] = side["lat_ns"]["mean"] / 1e3
            values[f"{job.name}_lat_p99_us"] = side["lat_ns"]["percentile"][P99] / 1e3
        return cls(**values)


METRICS = tuple(f.name for f in fields(Round))


@dataclass(frozen=True)
class Backend:
    """Where a pod's /data lives, and what the container must see there."""

    name: str
    handler: str
    volume: str  # "hostpath", "block" or "rbd": which Bench method makes it
    description: str
    fstype: str | None = None  # /data's filesystem in the container; None: the host's, unchecked
    disk: bool = False  # /data is a virtio-blk disk of the VM (/dev/vd*)


BACKENDS = (
    Backend(CEILING, "runc", "hostpath", "a host directory bind-mounted into a runc container"),
    Backend("husk_virtiofs", "husk", "hostpath",
            "a host directory bind-mounted, through the VM's shared filesystem", fstype="virtiofs"),
    Backend("husk_block", "husk", "block",
            f"a block direct volume: a loop device over a {VOLUME_MIB} MiB file on the host",
            fstype="ext4", disk=True),
    Backend("husk_rbd", "husk", "rbd",
            f"an rbd direct volume: a {VOLUME_MIB} MiB image of a single-node Ceph (memstore OSD), "
            "opened by QEMU's librbd", fstype="ext4", disk=True),
)


@dataclass
class Measured:
    """One backend's rounds and what it ran on."""

    rounds: list[Round]
    data_mount: str  # /data's line of the container's /proc/mounts: source, fstype
    kernel: str  # the container's (the guest's for husk)
    fio_version: str
    seconds: float
    hangs: list[str]  # the fio runs of earlier attempts that hung, e.g. "round 2"


class IoHang(RuntimeError):
    """A fio run made no progress for EXEC_TIMEOUT_S: its I/O never completed.

    Seen in husk pods under TCG, on virtio-fs and on an rbd disk alike: the guest
    has requests in flight that the device never completes, and the pod can no
    longer stop (its processes wait for that I/O).
    """


def data_mount(cri: CriClient, cid: str, backend: Backend) -> str:
    """/data's source and fstype in the container, checked against the backend: the
    figures must be of the storage they are named after."""
    mounts = cri.exec_sync(cid, ["cat", "/proc/mounts"]).out
    found = [line.split() for line in mounts.splitlines() if line.split()[1] == MOUNT_POINT]
    if not found:
        raise RuntimeError(f"{backend.name}: no {MOUNT_POINT} in the container:\n{mounts}")
    source, fstype = found[-1][0], found[-1][2]
    if (backend.fstype is not None and fstype != backend.fstype) or \
            (backend.disk and not source.startswith("/dev/vd")):
        raise RuntimeError(f"{backend.name}: {MOUNT_POINT} is {source} ({fstype}), "
                           f"not {backend.description}")
    return f"{source} {fstype}"


def run_fio(cri: CriClient, cid: str, args: list[str], what: str) -> dict[str, Any]:
    """fio's JSON report; raises IoHang if it hangs, RuntimeError if it or a job failed."""
    try:
        result = cri.exec_sync(cid, ["fio", *args], timeout=EXEC_TIMEOUT_S)
    except CriError as exc:
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise IoHang(f"fio's {what} hung ({EXEC_TIMEOUT_S} s without finishing)") from exc
        raise
    if result.exit_code != 0 or "{" not in result.out:
        raise RuntimeError(f"fio exited {result.exit_code}: {result.err.strip() or result.out.strip()}")
    # fio may print notices ahead of the report.
    report: dict[str, Any] = json.loads(result.out[result.out.index("{"):])
    failed = {job["jobname"]: job["error"] for job in report["jobs"] if job["error"]}
    if failed:
        raise RuntimeError(f"fio jobs failed (errno): {failed}; {result.err.strip()}")
    return report


@dataclass
class Bench:
    """One run's containerd and dirs: makes each backend's volume and pod, measures it,
    and undoes each (pod, record, loop device, cluster) on leaving its with."""

    cd: Containerd
    work: Path
    state: Path  # husk's (runtime.state_dir)

    @property
    def records(self) -> DirectVolumes:
        return DirectVolumes(self.state / "direct-volumes")

    def measure(self, backend: Backend) -> Measured:
        """RUNS rounds in one pod; a pod whose I/O hangs is replaced once, on a new volume."""
        hangs: list[str] = []
        for attempt in range(1 + HANG_RETRIES):
            try:
                return self._measure_once(backend, f"{backend.name}-{attempt}", hangs)
            except IoHang as hang:
                if attempt == HANG_RETRIES:
                    raise
                hangs.append(str(hang))
                print(f"{backend.name}: {hang}; again in a new pod", file=sys.stderr)
        raise AssertionError("unreachable")

    def _measure_once(self, backend: Backend, name: str, hangs: list[str]) -> Measured:
        begin = time.monotonic()
        cri = self.cd.cri
        with self.volume(backend, name) as host_path, self.pod(backend, name, host_path) as cid:
            mount = data_mount(cri, cid, backend)
            kernel = cri.exec_sync(cid, ["uname", "-r"]).out.strip()
            version = str(run_fio(cri, cid, LAYOUT_ARGS, "layout run")["fio version"])
            rounds = []
            for i in range(RUNS):
                rounds.append(Round.from_fio(run_fio(cri, cid, ROUND_ARGS, f"round {i + 1}")))
                print(f"{backend.name} {i + 1}/{RUNS}: {json.dumps(asdict(rounds[-1]))}",
                      file=sys.stderr)
        return Measured(rounds, mount, kernel, version, round(time.monotonic() - begin, 1), hangs)

    def volume(self, backend: Backend, name: str) -> contextlib.AbstractContextManager[Path]:
        """The host path to mount at /data."""
        makers = {"hostpath": self.host_dir, "block": self.loop_block, "rbd": self.rbd}
        return makers[backend.volume](name)

    @contextlib.contextmanager
    def host_dir(self, name: str) -> Iterator[Path]:
        path = self.work / name
        path.mkdir()
        yield path

    def _target(self, name: str) -> Path:
        """A volume path as a CSI driver would have it (its target dir, never mounted here)."""
        path = self.work / name / "mount"
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def loop_block(self, name: str) -> Iterator[Path]:
        with contextlib.ExitStack() as undo:
            image = self.work / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(VOLUME_MIB * MIB)
            device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                                    text=True, check=True, timeout=60).stdout.strip()
            undo.callback(subprocess.run, ["losetup", "-d", device], check=False, timeout=60)
            target = self._target(name)
            self.records.add(str(target), MountInfo("block", device, "ext4", {"createFilesystem": "true"}))
            undo.callback(self.records.remove, str(target))
            yield target

    @contextlib.contextmanager
    def rbd(self, name: str) -> Iterator[Path]:
        with contextlib.ExitStack() as undo:
            cluster = undo.enter_context(CephCluster.started(self.cd.netns_path, self.work))
            cluster.create_image(QEMU_POOL, name, VOLUME_MIB)
            key_file = self.work / f"{name}.key"
            key_file.touch(mode=0o600)  # root-only, or the shim refuses it
            undo.callback(key_file.unlink)
            key_file.write_text(cluster.client_key(QEMU_USER) + "\n")
            target = self._target(name)
            self.records.add(str(target), MountInfo("rbd", f"{QEMU_POOL}/{name}", "ext4", {
                "pool": QEMU_POOL, "image": name, "monitors": cluster.monitors, "user": QEMU_USER,
                "keyFile": str(key_file), "createFilesystem": "true"}))
            undo.callback(self.records.remove, str(target))
            yield target

    @contextlib.contextmanager
    def pod(self, backend: Backend, name: str, host_path: Path) -> Iterator[str]:
        """An idle fio container in a pod of the backend's handler, `host_path` at /data;
        the pod is stopped and removed on the way out (before its volume is undone)."""
        cri = self.cd.cri
        pod = cri.run_pod(f"bench-io-{name.replace('_', '-')}", handler=backend.handler)
        cid = ""
        try:
            cid = cri.run_container(pod, FIO_REF, IDLE_COMMAND, mounts=[
                api.Mount(container_path=MOUNT_POINT, host_path=str(host_path))])
            yield cid
        except IoHang:
            # Once the shim has seen the VM go, the pod stops as any other.
            self.kill_vm(pod.id)
            cri.wait_container_exit(cid, timeout=VM_GONE_TIMEOUT_S)
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)
            raise
        except BaseException:
            # The body's error is the one to report: a pod that does not stop in time is
            # left to containerd's teardown, which kills what it must.
            with contextlib.suppress(CriError):
                cri.stop_pod(pod.id, timeout=FAILED_POD_STOP_TIMEOUT_S)
                cri.remove_pod(pod.id, timeout=FAILED_POD_STOP_TIMEOUT_S)
            raise
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)

    def kill_vm(self, pod_id: str) -> None:
        """SIGKILL of a husk pod's QEMU, by its pid file: a pod whose I/O hung cannot
        stop, but one whose VM died can (the shim reports its processes exited)."""
        pid_file = self.state / "sb" / pod_id / QEMU_PID_FILE
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if pod_id in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                os.kill(pid, signal.SIGKILL)
                print(f"killed the VM of pod {pod_id} (QEMU pid {pid})", file=sys.stderr)


def _rounded(value: float, metric: str) -> float:
    return round(value) if metric.endswith("_iops") else round(value, 1)


def summary(measured: dict[str, Measured], metric: str) -> dict[str, Any]:
    """One metric: each backend's median, its ratio to the ceiling (4 significant digits;
    above 1 is faster in MiB/s and IOPS, slower in latency) and every run."""
    runs = {name: [getattr(r, metric) for r in m.rounds] for name, m in measured.items()}
    med = {name: statistics.median(values) for name, values in runs.items()}
    return {**{name: _rounded(v, metric) for name, v in med.items()},
            "ratio_to_ceiling": {name: float(f"{v / med[CEILING]:.4g}") for name, v in med.items()
                                 if name != CEILING},
            "runs": {name: [_rounded(v, metric) for v in values] for name, values in runs.items()}}


def goal(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    figures = results[GOAL_METRIC]
    ratio = figures[GOAL_BACKEND] / figures[GOAL_BASELINE]
    return {"metric": GOAL_METRIC, f"{GOAL_BACKEND}_over_{GOAL_BASELINE}": round(ratio, 2),
            "target": GOAL_RATIO, "met": ratio >= GOAL_RATIO}


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: every with-block and finally cleans up on the way out."""
    raise SystemExit(128 + signum)


def report(measured: dict[str, Measured], config: Path, state: Path, load_at_start: float,
           started: float) -> dict[str, Any]:
    """The JSON: the machine, each backend, every metric's summary, the goal, the method."""
    results = {metric: summary(measured, metric) for metric in METRICS}
    husk = measured["husk_virtiofs"]
    vm = load_config(str(config))
    return {
        "benchmark": "io",
        "machine": {**machine(state), "guest_kernel": husk.kernel,
                    # Other work on the machine (a test run's VMs) shows here, not only in the figures.
                    "load_1m": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)}},
        "runs": RUNS,
        "ceiling": CEILING,
        "backends": {b.name: {"handler": b.handler, "volume": b.description,
                              "data_mount": measured[b.name].data_mount,
                              "seconds": measured[b.name].seconds,
                              "hung_attempts": measured[b.name].hangs} for b in BACKENDS},
        **results,
        "goal": goal(results),
        "method": {
            "fio": husk.fio_version,
            "husk_vm": {"vcpus": vm.hypervisor.vcpus, "memory_mib": vm.hypervisor.memory_mib,
                        "shared_fs": vm.shared_fs.type, "virtiofs_cache": vm.shared_fs.virtiofs_cache},
            "jobs": {job.name: f"rw={job.rw} bs={job.block}" for job in JOBS},
            "every_job": (f"direct=1 ioengine={IOENGINE} iodepth={IODEPTH} on {DATA_FILE} "
                          f"({FILE_MIB} MiB, written by an untimed fio run first); "
                          f"{RAMP_S} s ramp-up, then {RUNTIME_S} s measured; one job at a time"),
            "latency": "fio's lat_ns: submission to completion, mean and 99th percentile",
            "ratio_to_ceiling": (f"backend / {CEILING}: above 1 is faster in MiB/s and IOPS, "
                                 "slower in latency"),
            "below_the_guest": ("virtiofsd opens without O_DIRECT and the loop device is "
                                "buffered: husk_virtiofs and husk_block reach the host's page "
                                "cache; runc_hostpath's O_DIRECT goes to the host's disk; "
                                "husk_rbd's OSD stores in RAM"),
        },
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    if RUNS < 1:
        raise SystemExit("BENCH_RUNS must be at least 1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    with scratch_dirs("bio", WORK_BASE) as (work, state):
        config = write_test_config(work / "husk.toml", state)
        images = [*build_images(), build_fio_image()]
        options = ContainerdOptions(images=images, husk_config=config, log_level="info",
                                    keep_logs_dir=LOGS_DIR)
        with Containerd.started(options) as cd:
            bench = Bench(cd, work, state)
            measured = {b.name: bench.measure(b) for b in BACKENDS}
        result = report(measured, config, state, load_at_start, started)
        emit(result, OUTPUT)
        return 0


if __name__ == "__main__":
    sys.exit(main())
