"""husk configuration: configs/husk.toml → frozen dataclasses.

Owns reading and validating the file and the per-pod overrides that pod
annotations may make. Every value that ends up on a QEMU command line passes
through here first and is checked against a type and a range.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shim.vm.devices import MAX_HOTPLUG_PORTS

# Where an installed husk looks first; HUSK_CONFIG and the runtime options'
# config_path take precedence (see resolve_config_path).
DEFAULT_CONFIG_PATHS = (Path("/etc/husk/husk.toml"), Path("/usr/share/husk/husk.toml"))
# An installed guest image, then the one `make guest-image` builds in a checkout.
GUEST_DIRS = (Path("/usr/share/husk/guest"), Path(__file__).resolve().parent.parent / "build" / "guest")

ANNOTATION_PREFIX = "io.husk."
ANNOTATION_VCPUS = "io.husk.vcpus"
ANNOTATION_MEMORY = "io.husk.memory_mib"
ALLOWED_ANNOTATIONS = frozenset({ANNOTATION_VCPUS, ANNOTATION_MEMORY})
# The least memory a guest boots and runs its agent in.
MIN_MEMORY_MIB = 128
# Less gives each vCPU thread's region of the buffer too little room for the guest.
MIN_TCG_BUFFER_MIB = 16
# max_vcpus = 0 caps a VM at the host's CPUs (as Kata's default_maxvcpus = 0) but
# no higher than this: every possible vCPU costs the guest per-CPU memory from
# boot (and under TCG a present vCPU in QEMU), and more vCPUs than the host has
# CPUs only oversubscribe them.
AUTO_MAX_VCPUS = 8

ACCEL_MODES = ("auto", "kvm", "tcg")
SHARED_FS_TYPES = ("virtio-fs", "9p")
AGENT_TRANSPORTS = ("auto", "vsock", "serial")


_DECIMAL = re.compile(r"[0-9]{1,9}")


NETWORK_MODELS = ("tcfilter", "none")


class ConfigError(ValueError):
    """The configuration file or a pod annotation is invalid."""


@dataclass(frozen=True)
class SizeOverrides:
    """A pod's io.husk.vcpus / io.husk.memory_mib annotations; 0 = not given."""

    vcpus: int = 0
    memory_mib: int = 0


ROOT_DEVICES = ("pmem", "virtio-blk")
GUEST_RAM_LAYOUTS = ("shared", "split")


@dataclass(frozen=True)
class HypervisorConfig:
    qemu_path: str = "/usr/bin/qemu-system-x86_64"
    guest_dir: str = ""  # holds vmlinuz, initrd.img, rootfs.img; "" = search GUEST_DIRS
    kernel: str = ""     # "" = <guest_dir>/vmlinux
    initrd: str = ""
    image: str = ""
    kernel_params: str = ""
    # A pod without limits gets vcpus and memory_mib. A pod with limits gets
    # them (containerd's sums) plus the base, for the guest's own kernel and agent.
    vcpus: int = 1
    memory_mib: int = 512
    base_vcpus: int = 0
    base_memory_mib: int = 256
    # What a VM can grow to (the CPUs and memory it boots with room for);
    # max_vcpus 0 = the host's CPUs, at most AUTO_MAX_VCPUS (see auto_max_vcpus).
    max_vcpus: int = 0
    max_memory_mib: int = 16384
    accel: str = "auto"
    hotplug_ports: int = 16
    # TCG's translation buffer per VM in MiB (QEMU's tb-size); 0 = sized by the
    # possible vCPUs (shim.vm.accel.tcg_buffer_mib). Unused under KVM.
    tcg_buffer_mib: int = 0
    # How the guest gets its root image: "pmem" maps the file into the guest
    # (virtio-pmem, read-only, DAX: the guest reads it in place, so its page cache
    # is the host's, once for every pod) or "virtio-blk" (a read-only disk, each
    # guest caching what it reads in its own RAM).
    root_device: str = "pmem"
    # Guest RAM with virtio-fs: "split" keeps virtiofsd to a 32 MiB NUMA node (the
    # guest bounces virtio-fs through it) and the rest private to QEMU, which KSM
    # can merge across pods (shim.vm.cmdline.RamLayout; README, "KSM"); "shared"
    # is all of it memory virtiofsd maps.
    guest_ram: str = "split"

    def __post_init__(self) -> None:
        if self.max_vcpus == 0:
            object.__setattr__(self, "max_vcpus", auto_max_vcpus())

    def guest_file(self, name: str, override: str) -> Path:
        if override:
            return Path(override)
        if self.guest_dir:
            return Path(self.guest_dir) / name
        for d in GUEST_DIRS:
            if (d / name).exists():
                return d / name
        return GUEST_DIRS[0] / name

    @property
    def kernel_path(self) -> Path:
        # The uncompressed kernel: decompressing vmlinuz costs ~4 s under TCG.
        return self.guest_file("vmlinux", self.kernel)

    @property
    def initrd_path(self) -> Path:
        return self.guest_file("initrd.img", self.initrd)

    @property
    def image_path(self) -> Path:
        return self.guest_file("rootfs.img", self.image)


@dataclass(frozen=True)
class SharedFsConfig:
    type: str = "virtio-fs"
    virtiofsd_path: str = "/usr/lib/qemu/virtiofsd"
    virtiofs_cache: str = "auto"
    msize_9p: int = 512 * 1024


@dataclass(frozen=True)
class AgentConfig:
    transport: str = "auto"
    dial_timeout_s: float = 60.0
    request_timeout_s: float = 30.0
    # A Check every keepalive_interval_s; this many unanswered in a row and the
    # agent is declared dead (its VM is stopped, its processes exit 255).
    keepalive_interval_s: float = 10.0
    keepalive_misses: int = 3


@dataclass(frozen=True)
class NetworkConfig:
    # "tcfilter": a tap per CNI interface joined to it with tc redirects;
    # "none": the pod's VM gets no NIC (loopback only).
    model: str = "tcfilter"
    # vhost-net moves the NIC's data path into the host kernel: "auto" uses it
    # where /dev/vhost-net exists.
    vhost_net: str = "auto"


@dataclass(frozen=True)
class StorageConfig:
    # Where direct-volume records are (husk direct-volume add/publish write them);
    # Kata's is /run/kata-containers/shared/direct-volumes, for CSI drivers written for it.
    direct_volumes_dir: str = "/run/husk/direct-volumes"
    # Each direct-volume disk gets its own QEMU I/O thread, so its requests are
    # served beside the vCPUs instead of under QEMU's global lock (Kata's
    # enable_iothreads).
    disk_iothreads: bool = True


@dataclass(frozen=True)
class TemplateConfig:
    # Pods start from a VM template (a guest booted once per VM shape, saved and
    # restored; see shim.sandbox.template) instead of booting; false boots every pod.
    enabled: bool = True
    # Root only: a template holds a guest's memory.
    dir: str = "/var/lib/husk/templates"
    # A template no pod was restored from for this many days is removed when another
    # is built (after an upgrade or a new guest image, old ones are never used again).
    keep_unused_days: int = 7


@dataclass(frozen=True)
class RuntimeConfig:
    state_dir: str = "/run/husk"
    debug: bool = False
    # A shim's log (/var/log/husk/<sandbox id>.log) outlives its pod by this many
    # days (0: until the newest 1000 push it out).
    log_keep_days: int = 7


@dataclass(frozen=True)
class DebugConfig:
    # `husk exec` may run processes in a pod's guest, outside its containers
    # (root in the VM, every container's files and memory within reach): off unless asked.
    console: bool = False


@dataclass(frozen=True)
class MonitorConfig:
    # Where `husk monitor` serves Prometheus metrics (host:port; [v6]:port).
    listen: str = "127.0.0.1:8090"


@dataclass(frozen=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    shared_fs: SharedFsConfig = field(default_factory=SharedFsConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def size_overrides(self, annotations: Mapping[str, str]) -> SizeOverrides:
        """The allowlisted ``io.husk.*`` pod annotations (an operator's VM size).

        :raise ConfigError: an unknown ``io.husk.`` key or an out-of-range value.
        """
        hv = self.hypervisor
        vcpus = memory_mib = 0
        for key, value in annotations.items():
            if not key.startswith(ANNOTATION_PREFIX):
                continue
            if key not in ALLOWED_ANNOTATIONS:
                allowed = ", ".join(sorted(ALLOWED_ANNOTATIONS))
                raise ConfigError(f"annotation {key!r} is not supported (allowed: {allowed})")
            if key == ANNOTATION_VCPUS:
                vcpus = _bounded_int(key, value, 1, hv.max_vcpus)
            elif key == ANNOTATION_MEMORY:
                memory_mib = _bounded_int(key, value, MIN_MEMORY_MIB, hv.max_memory_mib)
        return SizeOverrides(vcpus, memory_mib)

    def with_pod_annotations(self, annotations: Mapping[str, str]) -> "Config":
        """The config with the ``io.husk.*`` size annotations as its defaults (``husk run``).

        :raise ConfigError: an unknown ``io.husk.`` key or an out-of-range value.
        """
        overrides = self.size_overrides(annotations)
        changes = {k: v for k, v in dataclasses.asdict(overrides).items() if v}
        if not changes:
            return self
        return dataclasses.replace(self, hypervisor=dataclasses.replace(self.hypervisor, **changes))


def _bounded_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, str):
        # ASCII digits only ("²" is a digit to str.isdigit), and short: int() of a
        # 5000-digit string is slow and then out of range anyway.
        text = value.strip()
        if not _DECIMAL.fullmatch(text):
            raise ConfigError(f"{name}: expected a decimal integer, got {value[:40]!r}")
        value = int(text)
    if not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is outside {low}..{high}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _section(cls: type, name: str, raw: Mapping[str, Any]) -> Any:
    """Build one dataclass section, checking key names and value types."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"[{name}] unknown key {key!r} (known: {', '.join(known)})")
        default = known[key].default
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"[{name}] {key}: expected {expected.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document.

    :raise ConfigError: unknown sections or keys, wrong types, values out of range.
    """
    sections = {"hypervisor": HypervisorConfig, "shared_fs": SharedFsConfig,
                "agent": AgentConfig, "network": NetworkConfig, "storage": StorageConfig,
                "template": TemplateConfig, "runtime": RuntimeConfig, "debug": DebugConfig,
                "monitor": MonitorConfig}
    for name in data:
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sections)})")
    parts = {name: _section(cls, name, data.get(name, {})) for name, cls in sections.items()}
    config = Config(**parts)
    hv = config.hypervisor
    _choice("hypervisor.accel", hv.accel, ACCEL_MODES)
    _choice("hypervisor.root_device", hv.root_device, ROOT_DEVICES)
    _choice("hypervisor.guest_ram", hv.guest_ram, GUEST_RAM_LAYOUTS)
    _bounded_int("hypervisor.max_vcpus", hv.max_vcpus, 1, 255)  # 0 is resolved at construction
    _bounded_int("hypervisor.max_memory_mib", hv.max_memory_mib, MIN_MEMORY_MIB, 1 << 22)
    _bounded_int("hypervisor.vcpus", hv.vcpus, 1, hv.max_vcpus)
    _bounded_int("hypervisor.memory_mib", hv.memory_mib, MIN_MEMORY_MIB, hv.max_memory_mib)
    _bounded_int("hypervisor.base_vcpus", hv.base_vcpus, 0, hv.max_vcpus - 1)
    _bounded_int("hypervisor.base_memory_mib", hv.base_memory_mib, MIN_MEMORY_MIB,
                 hv.max_memory_mib)
    _bounded_int("hypervisor.hotplug_ports", hv.hotplug_ports, 0, MAX_HOTPLUG_PORTS)
    if 0 < _bounded_int("hypervisor.tcg_buffer_mib", hv.tcg_buffer_mib, 0, 4096) < MIN_TCG_BUFFER_MIB:
        raise ConfigError(f"hypervisor.tcg_buffer_mib: {hv.tcg_buffer_mib} is too small "
                          f"(0 sizes it by the vCPUs; else at least {MIN_TCG_BUFFER_MIB})")
    if any(c in hv.kernel_params for c in "\n\0"):
        raise ConfigError("hypervisor.kernel_params must be one line")
    _choice("shared_fs.type", config.shared_fs.type, SHARED_FS_TYPES)
    _choice("shared_fs.virtiofs_cache", config.shared_fs.virtiofs_cache, ("none", "auto", "always"))
    _choice("agent.transport", config.agent.transport, AGENT_TRANSPORTS)
    if not 0.1 <= config.agent.keepalive_interval_s <= 3600:
        raise ConfigError("agent.keepalive_interval_s must be within 0.1..3600")
    _bounded_int("agent.keepalive_misses", config.agent.keepalive_misses, 1, 100)
    _choice("network.model", config.network.model, NETWORK_MODELS)
    _choice("network.vhost_net", config.network.vhost_net, ("auto", "on", "off"))
    if not config.storage.direct_volumes_dir.startswith("/"):
        raise ConfigError("storage.direct_volumes_dir must be an absolute path")
    if not config.template.dir.startswith("/"):
        raise ConfigError("template.dir must be an absolute path")
    _bounded_int("template.keep_unused_days", config.template.keep_unused_days, 0, 36500)
    _bounded_int("runtime.log_keep_days", config.runtime.log_keep_days, 0, 36500)
    parse_listen(config.monitor.listen)
    return config


def auto_max_vcpus() -> int:
    """max_vcpus = 0: the host's CPUs, at most AUTO_MAX_VCPUS."""
    return max(1, min(os.cpu_count() or 1, AUTO_MAX_VCPUS))


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (``:port``: every address) → (host, port).

    :raise ConfigError: no port, or a port outside 1..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {address!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def resolve_config_path(explicit: str | None = None) -> Path | None:
    """The file to read: the explicit path, $HUSK_CONFIG, then the standard places."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("HUSK_CONFIG")
    if env:
        return Path(env)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), None)


def load_config(explicit: str | None = None) -> Config:
    """Read the configuration; built-in defaults when no file exists.

    :raise ConfigError: the named file is missing or invalid.
    """
    path = resolve_config_path(explicit)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
