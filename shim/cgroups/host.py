"""SandboxCgroup: puts the VM's host processes into the pod's cgroup.

containerd hands the pause container a ``linux.cgroupsPath`` (the kubelet's
pod cgroup plus the sandbox id). Like Kata's sandbox_cgroup_only, QEMU and
virtiofsd join that cgroup in every v1 controller (or the v2 unified tree),
so the pod's limits and accounting cover its VM. Only cgroupfs-style paths
("/kubepods/.../<id>") are handled; systemd-style "slice:prefix:name" paths
are logged and skipped. Directories created here are removed at teardown.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cgroupspy.controllers import Controller
from cgroupspy.nodes import Node

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
RMDIR_ATTEMPTS = 50
RMDIR_RETRY_S = 0.02
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer")


def _controller(path: Path) -> Controller:
    """cgroupspy's controller for an existing directory below CGROUP_ROOT.

    cgroupspy has no class for some v1 controllers (pids, freezer) nor for v2;
    their generic files (cgroup.procs) are the same, so the base class serves.
    """
    node = Node(bytes(CGROUP_ROOT) + b"/")
    for part in path.relative_to(CGROUP_ROOT).parts:
        node = Node(part.encode(), parent=node)
    return node.controller or Controller(node)


def _hierarchies() -> list[Path]:
    """v1 controller mount points, or the v2 root when the host is unified."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / c for c in V1_CONTROLLERS if (CGROUP_ROOT / c / "tasks").exists()]


@dataclass
class SandboxCgroup:
    path: str
    _created: list[Path] = field(default_factory=list)

    @classmethod
    def from_spec_path(cls, cgroups_path: str) -> "SandboxCgroup | None":
        if not cgroups_path:
            return None
        if ":" in cgroups_path or not cgroups_path.startswith("/"):
            log.info("cgroup path %r is systemd-style; the VM stays in the shim's cgroup",
                     cgroups_path)
            return None
        clean = PurePosixPath(os.path.normpath(cgroups_path))
        if ".." in clean.parts:
            return None
        return cls(str(clean))

    def join(self, pids: list[int]) -> None:
        """Create the cgroup where missing and move ``pids`` into it (best effort)."""
        for hierarchy in _hierarchies():
            target = hierarchy / self.path.lstrip("/")
            try:
                self._mkdirs(hierarchy, target)
                controller = _controller(target)
                for pid in pids:
                    if pid:
                        controller.procs = [pid]  # one write per pid: the kernel takes one
            except OSError as exc:
                log.warning("cannot put the VM into cgroup %s: %s", target, exc)

    def _mkdirs(self, hierarchy: Path, target: Path) -> None:
        missing = []
        current = target
        while current != hierarchy and not current.exists():
            missing.append(current)
            current = current.parent
        for d in reversed(missing):
            if d.name == "cpuset" or hierarchy.name == "cpuset":
                d.mkdir()
                # A v1 cpuset cgroup is unusable until it has cpus and mems.
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((d.parent / f).read_text())
            else:
                d.mkdir()
            self._created.append(d)

    def remove(self) -> None:
        """Remove the directories join() created (empty once the VM is gone)."""
        for d in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
            for attempt in range(RMDIR_ATTEMPTS):
                try:
                    d.rmdir()
                    break
                except OSError as exc:
                    # A just-reaped process can keep the cgroup busy for a moment.
                    if exc.errno != errno.EBUSY or attempt == RMDIR_ATTEMPTS - 1:
                        log.warning("cannot remove cgroup %s: %s", d, exc)
                        break
                    time.sleep(RMDIR_RETRY_S)
        self._created = []
