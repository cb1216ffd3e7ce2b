"""The agent's settings: where its state, the shared filesystem and crun live."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/run/husk")
# Where the host's CreateSandbox mounts the shared filesystem; containers' rootfs
# are <shared>/<container id>/rootfs. Used as the shared root when the sandbox
# brings no shared-filesystem storage.
DEFAULT_SHARED_DIR = Path("/run/husk/shared")
DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_CGROUP_PARENT = "husk"
ETC_RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True)
class AgentConfig:
    """Paths and names the agent works with; tests point them at temp dirs."""

    state_dir: Path = DEFAULT_STATE_DIR
    shared_dir: Path = DEFAULT_SHARED_DIR
    crun: str = "crun"
    cgroup_root: Path = DEFAULT_CGROUP_ROOT
    # Containers' cgroups are /<cgroup_parent>/<container id>.
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    # None: /etc/resolv.conf when writable, else <state_dir>/resolv.conf.
    resolv_conf: Path | None = None
    sysfs: Path = Path("/sys")
    devfs: Path = Path("/dev")
    proc_sys: Path = Path("/proc/sys")

    @property
    def crun_root(self) -> Path:
        return self.state_dir / "crun"

    @property
    def bundles_dir(self) -> Path:
        return self.state_dir / "containers"

    @property
    def console_dir(self) -> Path:
        # Short on purpose: console socket paths must fit in sockaddr_un.
        return self.state_dir / "tty"
