"""VM templates: a guest booted once per node and VM shape, saved, and restored for each pod.

A template is a guest booted with everything a pod's VM has at boot except what
cannot migrate or belongs to one pod (the virtio-fs device, NICs, volumes), its
agent started and warmed up, paused and written to a file with QEMU's
migration. A pod's VM starts with the same command line waiting for that
stream (-incoming defer), loads it, gets its own devices hot-plugged, and its
agent's CreateSandbox gives the guest its identity (random seed, clock,
hostname); see shim.sandbox.sandbox.

This module owns the files: where a template lives, which one a VM may use,
and who builds it. A template is named by its VM's command line (with the
per-VM paths, CIDs and fds replaced), so any change of size, device or kernel
parameter is another template. It records what it was built from (QEMU, the
kernel, initrd and image, the host CPU under KVM); when those changed it is
stale: never used, rebuilt. One shim builds a template while the others wait
on its lock file; a failed build is not retried for a while (pods boot cold).
Each restore marks its template used; a template nobody restored from for a
while (its shape is gone, or husk or the guest image changed: every later pod
names another template) is removed when the next one is installed.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shim.vm.accel import Accel
from shim.vm.cmdline import AgentTransport, VmPaths, VmSpec, build_cmdline

log = logging.getLogger(__name__)

# Bumped when what a template holds changes meaning (the restore protocol).
TEMPLATE_FORMAT = 2
# The guest's agent warms up (imports what CreateSandbox needs) before it serves.
TEMPLATE_KERNEL_PARAM = "husk.template=1"
STATE_FILE = "state"  # QEMU's migration stream: the devices
RAM_FILE = "ram"  # the guest's shared RAM, sparse (shim.vm.ram); the state holds the rest
META_FILE = "meta.json"
FAILED_FILE = "failed"
LOCK_SUFFIX = ".lock"
# Waiting for another shim's build: a cold boot and a save, slower under load.
LOCK_TIMEOUT_S = 300.0
LOCK_POLL_S = 0.1
# After a failed build, pods of that shape boot cold this long before a retry.
RETRY_AFTER_S = 600.0
META_MAX_BYTES = 64 * 1024
# Placeholders for what differs between a template's VM and each pod's.
CANONICAL_RUN_DIR = Path("/run/husk-template")
CANONICAL_CID = 3
CANONICAL_FD = 3
CPUINFO = Path("/proc/cpuinfo")


class TemplateError(Exception):
    """A template could not be found, built or locked; the pod boots cold."""


def template_spec(spec: VmSpec, *, incoming: bool, ram_fd: int) -> VmSpec:
    """The VM of a template for pods whose VM is ``spec`` (incoming=False), or of a
    pod restored from it (incoming=True): shared guest RAM in the shim's memfd ``ram_fd``,
    no shared-filesystem device and no NICs (hot-plugged after the restore), the
    agent told to warm up."""
    params = " ".join(p for p in (spec.kernel_params, TEMPLATE_KERNEL_PARAM) if p)
    return dataclasses.replace(spec, shared_fs_hotplug=True, nics=(), kernel_params=params,
                               incoming=incoming, ram_fd=ram_fd)


def _file_identity(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"missing ({exc.strerror})"
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino} dev={st.st_dev}"


def _cpu_identity() -> str:
    """The host CPU model and features: a KVM guest's -cpu host is this CPU."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return "unknown"
    wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TemplateId:
    """Which template a VM can use (key) and what it must have been built from (inputs)."""

    key: str
    inputs: dict[str, str]

    @classmethod
    def of(cls, spec: VmSpec, husk_version: str) -> TemplateId:
        """For a pod VM of ``spec``.

        :raise TemplateError: the VM cannot come from a template (9p: its device
            is on the command line and carries the pod's path).
        """
        if spec.shared_fs.value != "virtio-fs":
            raise TemplateError("templates need the virtio-fs shared filesystem")
        canonical = dataclasses.replace(
            template_spec(spec, incoming=False, ram_fd=CANONICAL_FD), name="template",
            paths=VmPaths(CANONICAL_RUN_DIR),
            vsock_cid=CANONICAL_CID if spec.transport is AgentTransport.VSOCK else 0,
            vhost_fd=CANONICAL_FD if spec.vhost_fd >= 0 else -1, extra_fds=[])
        argv = build_cmdline(canonical)
        key = hashlib.sha256(json.dumps([TEMPLATE_FORMAT, husk_version, argv]).encode())
        qemu = shutil.which(spec.qemu_path) or spec.qemu_path
        inputs = {"qemu": _file_identity(Path(qemu)), "kernel": _file_identity(spec.kernel),
                  "initrd": _file_identity(spec.initrd), "image": _file_identity(spec.image)}
        if spec.accel.accel is Accel.KVM:
            inputs["host_cpu"] = _cpu_identity()
        return cls(key.hexdigest()[:24], inputs)

    def stale_inputs(self, recorded: dict[str, str]) -> list[str]:
        """Names of the inputs that differ from what a template recorded."""
        return sorted(k for k in self.inputs.keys() | recorded.keys()
                      if self.inputs.get(k) != recorded.get(k))


@dataclass(frozen=True)
class Template:
    id: TemplateId
    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def ram(self) -> Path:
        return self.dir / RAM_FILE


class TemplateStore:
    """Templates under one directory (root only: a template holds a guest's memory)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, tid: TemplateId) -> Path:
        return self.root / tid.key

    def find(self, tid: TemplateId) -> Template | None:
        """The template for ``tid`` if it is complete and built from the same inputs.

        A stale one (its QEMU, kernel or image changed since) is removed.
        """
        directory = self._dir(tid)
        meta_path = directory / META_FILE
        try:
            with open(meta_path, "rb") as f:
                meta = json.loads(f.read(META_MAX_BYTES))
            recorded = meta["inputs"]
            if not isinstance(recorded, dict) or meta.get("format") != TEMPLATE_FORMAT:
                raise ValueError("unknown format")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("template %s: unreadable record (%s); rebuilding it", tid.key, exc)
            self.discard(tid)
            return None
        changed = tid.stale_inputs(recorded)
        if changed:
            log.warning("template %s is stale (%s changed since it was built); rebuilding it",
                        tid.key, ", ".join(changed))
            self.discard(tid)
            return None
        template = Template(tid, directory)
        if not (template.state.is_file() and template.ram.is_file()):
            log.warning("template %s is incomplete; rebuilding it", tid.key)
            self.discard(tid)
            return None
        with contextlib.suppress(OSError):
            os.utime(directory)  # used now: prune() keeps it
        return template

    def prune(self, keep: TemplateId, unused_for_s: float) -> list[str]:
        """Remove the templates (and failure markers) nobody restored from for
        ``unused_for_s``, except ``keep``; returns their keys.

        A template a shim is restoring from right now was marked used by its
        find(); one removed meanwhile stays readable through the open files.
        """
        removed = []
        now = time.time()
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            key, dot, suffix = entry.name.partition(".")
            if key == keep.key or (dot and suffix != FAILED_FILE):  # locks, builds in progress
                continue
            try:
                unused = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if unused < (RETRY_AFTER_S if dot else unused_for_s):
                continue
            if dot:
                Path(entry.path).unlink(missing_ok=True)
            else:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(key)
        return removed

    def recently_failed(self, tid: TemplateId) -> str | None:
        """Why the last build of ``tid`` failed, if it was less than RETRY_AFTER_S ago."""
        marker = self.root / f"{tid.key}.{FAILED_FILE}"
        try:
            st = marker.stat()
            if time.time() - st.st_mtime > RETRY_AFTER_S:
                return None
            with open(marker, "rb") as f:
                return f.read(1024).decode(errors="replace")
        except OSError:
            return None

    def record_failure(self, tid: TemplateId, reason: str) -> None:
        with contextlib.suppress(OSError):
            (self.root / f"{tid.key}.{FAILED_FILE}").write_text(reason[:1024])

    def build_path(self, tid: TemplateId) -> Path:
        """Where a build writes its state before install() (cleared first); its RAM
        goes beside it (RAM_FILE)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        building = self.root / f"{tid.key}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(mode=0o700)
        return building / STATE_FILE

    def abandon(self, tid: TemplateId) -> None:
        """Remove a build that failed (its partial state and RAM: ~150 MiB)."""
        shutil.rmtree(self.root / f"{tid.key}.building", ignore_errors=True)

    def install(self, tid: TemplateId, state: Path, build_s: float) -> Template:
        """Make a finished build the template for ``tid``: flushed to disk (a host
        crash must not leave a template whose RAM was never written), then renamed
        into place (atomically)."""
        building = state.parent
        for written in (state, building / RAM_FILE):
            fd = os.open(written, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        meta = {"format": TEMPLATE_FORMAT, "key": tid.key, "inputs": tid.inputs,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_s": round(build_s, 3), "state_bytes": state.stat().st_size,
                "ram_bytes": (building / RAM_FILE).stat().st_blocks * 512}
        (building / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        self.discard(tid)
        os.rename(building, self._dir(tid))
        (self.root / f"{tid.key}.{FAILED_FILE}").unlink(missing_ok=True)
        return Template(tid, self._dir(tid))

    def discard(self, tid: TemplateId) -> None:
        """Remove the template (a restore from it failed, or it is stale)."""
        shutil.rmtree(self._dir(tid), ignore_errors=True)

    @contextlib.asynccontextmanager
    async def locked(self, tid: TemplateId,
                     timeout_s: float = LOCK_TIMEOUT_S) -> AsyncIterator[None]:
        """Hold ``tid``'s build lock (another shim building it makes us wait).

        :raise TemplateError: not acquired within ``timeout_s``.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f"{tid.key}{LOCK_SUFFIX}",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if loop.time() >= deadline:
                        raise TemplateError(f"template {tid.key} was being built by another "
                                            f"shim for over {timeout_s:.0f}s") from None
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)
