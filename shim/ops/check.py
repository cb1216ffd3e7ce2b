"""``husk check``: can this node run husk pods, and what would make it better?

Each host requirement is one small function returning a CheckResult: "pass",
"warn" (pods run, degraded: the detail says what it costs) or "fail" (a pod
could not run; the fix says what to do). Every external command runs with a
named timeout in its own process group, so a wedged binary cannot hang the check.
The facts gathered here (tool versions, containerd's handlers, the guest image's
identity) also feed ``husk env``.
"""
from __future__ import annotations

import asyncio
import enum
import fnmatch
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from shim import RUNTIME_TYPE, SHIM_NAME, __version__
from shim.cgroups.host import cgroup_layout
from shim.config import (ALLOWED_ANNOTATIONS, DEFAULT_CONFIG_PATHS, Config, ConfigError,
                         load_config, resolve_config_path)
from shim.network.tcfilter import vhost_net_available
from shim.ops import imageid
from shim.vm.accel import Accel, probe
from shim.vm.cmdline import PMEM_ALIGN_BYTES
from shim.vm.vsock import vhost_vsock_available

# A --version or help query: QEMU answers in ~50 ms, containerd in ~20 ms.
COMMAND_TIMEOUT_S = 10.0
DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
HUSK_RUNTIME_TYPE = RUNTIME_TYPE
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
SHIM_BINARY = SHIM_NAME
TUN_DEVICE = "/dev/net/tun"
SYSTEMD_INIT_DIR = Path("/run/systemd/system")
# containerd started by systemd has systemd's default PATH, not the caller's.
SYSTEMD_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What husk is tested with (Debian bookworm's QEMU, containerd 1.6 to 2.x).
MIN_QEMU = (7, 2)
MIN_CONTAINERD = (1, 6)
# Where each config version keeps the CRI runtimes (containerd 2.x reads 2 and 3).
CRI_RUNTIME_PLUGINS = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
TCG_COST = ("guests run under software emulation: a cold boot takes ~12 s instead of "
            "seconds, guest CPU work is ~10x slower, and each VM holds a ~50 MiB "
            "translation buffer (README, Performance)")
RENDER_WIDTH = 100
RENDER_INDENT = 24  # status and name columns
MAKE_GUEST_IMAGE = ("make guest-image (then copy build/guest/{vmlinux,initrd.img,rootfs.img,"
                    "manifest.txt} to /usr/share/husk/guest/ on an installed node)")


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"  # pods run, degraded
    FAIL = "fail"  # a pod could not run


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}


class CommandError(Exception):
    """An external command could not run or did not finish in time."""


@dataclass(frozen=True)
class CommandOutput:
    returncode: int
    stdout: str
    stderr: str


def run_command(argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S) -> CommandOutput:
    """Run ``argv`` to completion; past ``timeout_s`` its whole process group is killed.

    :raise CommandError: it cannot be started or did not finish in time.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True)
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Its children may hold the pipes: kill the group, not just the process.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CommandError(f"{argv[0]} did not finish within {timeout_s:.0f}s") from None
    return CommandOutput(proc.returncode, out, err)


def tool_version(path: str, flag: str = "--version") -> str:
    """The first line ``path flag`` prints.

    :raise CommandError: it cannot run, times out, or fails.
    """
    out = run_command([path, flag])
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        raise CommandError(f"{path} {flag} exited with {out.returncode}: "
                           f"{out.stderr.strip()[:200] or 'no output'}")
    return lines[0]


def _version_tuple(text: str) -> tuple[int, ...]:
    """(7, 2, 22) from "QEMU emulator version 7.2.22 (Debian ...)", () if none."""
    match = re.search(r"\bv?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


# Section: containerd's configuration


class ContainerdConfigError(Exception):
    """containerd's config file is missing or unreadable."""


@dataclass(frozen=True)
class RuntimeHandler:
    """One CRI runtime handler (``...containerd.runtimes.<name>``), the fields husk cares about."""

    name: str
    runtime_type: str
    pod_annotations: tuple[str, ...] = ()
    privileged_without_host_devices: bool = False
    config_path: str = ""       # options.ConfigPath: the husk.toml its shims read
    systemd_cgroup: bool = False  # options.SystemdCgroup (runc's cgroup driver)

    def allows(self, annotation: str) -> bool:
        # containerd matches pod_annotations with Go's filepath.Match.
        return any(fnmatch.fnmatchcase(annotation, pattern) for pattern in self.pod_annotations)


@dataclass(frozen=True)
class ContainerdConfig:
    path: Path
    version: int
    handlers: tuple[RuntimeHandler, ...] = ()

    @property
    def husk_handlers(self) -> tuple[RuntimeHandler, ...]:
        return tuple(h for h in self.handlers if h.runtime_type == HUSK_RUNTIME_TYPE)

    @property
    def cgroup_driver(self) -> str:
        """"systemd" when containerd's runc handlers use it (the kubelet must match)."""
        runc = [h for h in self.handlers if h.runtime_type == RUNC_RUNTIME_TYPE]
        return "systemd" if any(h.systemd_cgroup for h in runc) else "cgroupfs"


def _table(data: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    for key in keys:
        value = data.get(key, {})
        data = value if isinstance(value, Mapping) else {}
    return data


def _handlers(data: Mapping[str, Any], version: int) -> dict[str, RuntimeHandler]:
    plugin = CRI_RUNTIME_PLUGINS.get(version, CRI_RUNTIME_PLUGINS[2])
    runtimes = _table(data, "plugins", plugin, "containerd", "runtimes")
    found: dict[str, RuntimeHandler] = {}
    for name, raw in runtimes.items():
        if not isinstance(raw, Mapping):
            continue
        options = _table(raw, "options")
        annotations = raw.get("pod_annotations", [])
        found[name] = RuntimeHandler(
            name=name, runtime_type=str(raw.get("runtime_type", "")),
            pod_annotations=tuple(str(a) for a in annotations) if isinstance(annotations, list)
            else (),
            privileged_without_host_devices=raw.get("privileged_without_host_devices") is True,
            config_path=str(options.get("ConfigPath", "")),
            systemd_cgroup=options.get("SystemdCgroup") is True)
    return found


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ContainerdConfigError(f"{path} does not exist") from None
    except OSError as exc:
        raise ContainerdConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ContainerdConfigError(f"{path} is not valid TOML: {exc}") from None


def read_containerd_config(path: Path) -> ContainerdConfig:
    """The runtime handlers of containerd's config and the files it imports.

    Config version 1 (no ``version`` key), 2 (containerd 1.x) and 3 (2.x) keep the
    CRI runtimes in different plugin tables; an imported file's handlers replace
    same-named ones, as containerd merges them.

    :raise ContainerdConfigError: the file (or an import) is missing or not TOML.
    """
    data = _load_toml(path)
    version = data.get("version", 1)
    if not isinstance(version, int) or version not in CRI_RUNTIME_PLUGINS:
        raise ContainerdConfigError(f"{path}: unknown config version {version!r}")
    handlers = _handlers(data, version)
    imports = data.get("imports", [])
    for pattern in imports if isinstance(imports, list) else []:
        full = os.path.join(path.parent, str(pattern))  # relative to the config's directory
        for imported in sorted(glob.glob(full)):
            extra = _load_toml(Path(imported))
            extra_version = extra.get("version", version)
            handlers.update(_handlers(extra, extra_version if isinstance(extra_version, int)
                                      else version))
    return ContainerdConfig(path, version, tuple(handlers.values()))


# Section: the checks


@dataclass(frozen=True)
class Target:
    """What is checked: husk's config (the file a fix names) and containerd's."""

    config: Config
    config_file: str  # where a fix says to edit husk's config
    containerd_config: Path = DEFAULT_CONTAINERD_CONFIG
    containerd: ContainerdConfig | None = None
    containerd_error: str = ""


def check_config(explicit: str | None) -> tuple[CheckResult, Config]:
    """The husk config in effect; built-in defaults (for the other checks) if it is broken."""
    path = resolve_config_path(explicit)
    try:
        config = load_config(explicit)
    except ConfigError as exc:
        return (CheckResult("config", Status.FAIL, f"{exc} (the checks below use the built-in "
                                                   "defaults)",
                            f"fix {path} (every key is documented in configs/husk.toml)"),
                Config())
    where = str(path) if path else "none found: built-in defaults"
    return CheckResult("config", Status.PASS, f"husk {__version__}, config {where}"), config


def check_accel(target: Target) -> CheckResult:
    hv = target.config.hypervisor
    fix = ("run pods on a node with hardware virtualisation: kvm_intel or kvm_amd loaded "
           "and /dev/kvm read-write for root")
    if hv.accel == "tcg":
        return CheckResult("accelerator", Status.WARN, f"TCG, forced by config; {TCG_COST}",
                           f'set [hypervisor] accel = "auto" in {target.config_file}')
    choice = asyncio.run(probe(hv.qemu_path))
    if choice.accel is Accel.KVM:
        return CheckResult("accelerator", Status.PASS, f"KVM ({choice.reason})")
    if hv.accel == "kvm":
        return CheckResult("accelerator", Status.FAIL,
                           f'accel = "kvm" but {choice.reason}: QEMU cannot start',
                           f'{fix}, or set [hypervisor] accel = "auto" in {target.config_file}')
    return CheckResult("accelerator", Status.WARN, f"TCG: {choice.reason}; {TCG_COST}", fix)


def _qemu_fix(target: Target) -> str:
    return ("apt-get install qemu-system-x86, or set [hypervisor] qemu_path in "
            f"{target.config_file}")


def check_qemu(target: Target) -> CheckResult:
    qemu = target.config.hypervisor.qemu_path
    try:
        version = tool_version(qemu, "-version")
        machines = run_command([qemu, "-machine", "help"]).stdout
    except CommandError as exc:
        return CheckResult("qemu", Status.FAIL, str(exc), _qemu_fix(target))
    if not re.search(r"^q35\s", machines, re.MULTILINE):
        return CheckResult("qemu", Status.FAIL, f"{version}: no q35 machine type",
                           _qemu_fix(target))
    numbers = _version_tuple(version)
    if numbers[:2] < MIN_QEMU:
        wanted = ".".join(map(str, MIN_QEMU))
        return CheckResult("qemu", Status.WARN, f"{version} at {qemu}: older than {wanted}, "
                                                "which husk is tested with", _qemu_fix(target))
    return CheckResult("qemu", Status.PASS, f"{version} at {qemu}, q35")


def check_qemu_rbd(target: Target) -> CheckResult:
    """QEMU's rbd block driver (a module, qemu-block-extra), for rbd direct volumes."""
    qemu = target.config.hypervisor.qemu_path
    fix = "apt-get install qemu-block-extra"
    # An rbd node without a pool: with the driver QEMU complains about the pool,
    # without it about the driver. Nothing connects to a Ceph cluster.
    try:
        out = run_command([qemu, "-machine", "none", "-nodefaults", "-display", "none",
                           "-blockdev", "driver=rbd,node-name=husk-check"])
    except CommandError as exc:
        return CheckResult("qemu-rbd", Status.WARN, f"not checked: {exc}", fix)
    if "'pool' is missing" in out.stderr:
        return CheckResult("qemu-rbd", Status.PASS, "rbd block driver present")
    message = out.stderr.strip().splitlines()[-1:] or ["no message"]
    return CheckResult("qemu-rbd", Status.WARN,
                       f"no rbd block driver ({message[0][:200]}): rbd direct volumes fail; "
                       "other pods run", fix)


def check_virtiofsd(target: Target) -> CheckResult:
    shared = target.config.shared_fs
    if shared.type != "virtio-fs":
        return CheckResult("virtiofsd", Status.PASS, f"not used (shared_fs.type = {shared.type})")
    try:
        version = tool_version(shared.virtiofsd_path)
    except CommandError as exc:
        return CheckResult("virtiofsd", Status.FAIL, str(exc),
                           "apt-get install qemu-system-common (Debian 12 ships "
                           "/usr/lib/qemu/virtiofsd; later releases the virtiofsd package, "
                           "/usr/libexec/virtiofsd), or set [shared_fs] virtiofsd_path or "
                           f'type = "9p" in {target.config_file}')
    return CheckResult("virtiofsd", Status.PASS, f"{version} at {shared.virtiofsd_path}")


@dataclass(frozen=True)
class _VhostDevice:
    """A vhost device a config key may leave to "auto", force on, or turn off."""

    name: str        # "vhost-vsock"
    key: str         # "[agent] transport"
    on: str          # the value that forces it
    used: str        # what it gives when present
    without: str     # what pods get without it


def _check_vhost(device: _VhostDevice, mode: str, available: bool, config_file: str) -> CheckResult:
    module = device.name.replace("-", "_")
    fix = f"modprobe {module} (and load it at boot: /etc/modules-load.d/)"
    if mode not in ("auto", device.on):
        return CheckResult(device.name, Status.PASS, f"not used ({device.key} = {mode!r})")
    if available:
        return CheckResult(device.name, Status.PASS, device.used)
    if mode == device.on:
        return CheckResult(device.name, Status.FAIL, f"{device.key} = {mode!r} but "
                                                     f"/dev/{device.name} is missing",
                           f"{fix}, or set {device.key} = 'auto' in {config_file}")
    return CheckResult(device.name, Status.WARN, f"no /dev/{device.name}: {device.without}", fix)


VHOST_VSOCK = _VhostDevice("vhost-vsock", "[agent] transport", "vsock", "agent over vsock",
                           "agent over virtio-serial (works; every agent call goes through "
                           "QEMU's main loop instead of the host kernel)")
VHOST_NET = _VhostDevice("vhost-net", "[network] vhost_net", "on",
                         "NIC data path in the host kernel",
                         "QEMU moves every packet itself (lower throughput, more CPU)")


def check_vhost_vsock(target: Target) -> CheckResult:
    return _check_vhost(VHOST_VSOCK, target.config.agent.transport, vhost_vsock_available(),
                        target.config_file)


def check_vhost_net(target: Target) -> CheckResult:
    net = target.config.network
    mode = "off" if net.model == "none" else net.vhost_net
    return _check_vhost(VHOST_NET, mode, vhost_net_available(), target.config_file)


def check_tun(target: Target, device: str = TUN_DEVICE) -> CheckResult:
    if target.config.network.model == "none":
        return CheckResult("tun", Status.PASS, 'not used (network.model = "none")')
    if os.access(device, os.R_OK | os.W_OK):
        return CheckResult("tun", Status.PASS, f"{device}")
    return CheckResult("tun", Status.FAIL, f"{device} is missing or not read-write: a pod's "
                                           "NICs cannot be made", "modprobe tun")


KSM_DIR = Path("/sys/kernel/mm/ksm")


def check_ksm(target: Target, ksm_dir: Path = KSM_DIR) -> CheckResult:
    """KSM is the node's choice: pods run either way, with more memory each when off."""
    try:
        run = (ksm_dir / "run").read_text().strip()
    except OSError:
        return CheckResult("ksm", Status.PASS, "not in this kernel: every pod's guest RAM is "
                                               "its own")
    if run == "1":
        return CheckResult("ksm", Status.PASS, "on: the host merges the guest RAM that pods "
                                               "have in common")
    return CheckResult("ksm", Status.PASS,
                       "off: every pod's guest RAM is its own; with KSM on, pods restored from "
                       "one template share most of theirs (README, Memory)",
                       f"echo 1 > {ksm_dir / 'run'} (merging across pods is a side channel "
                       "between them: README, Memory)")


def check_cgroups(target: Target) -> CheckResult:
    layout = cgroup_layout()
    names = {"v2": "cgroup v2 (unified)", "v1": "cgroup v1",
             "hybrid": "cgroup v1 (hybrid: the cgroup2 at /sys/fs/cgroup/unified is unused)"}
    if layout == "none":
        return CheckResult("cgroups", Status.WARN, "no cgroup hierarchy under /sys/fs/cgroup: "
                                                   "VMs stay in the shim's cgroup, outside "
                                                   "their pods' limits",
                           "mount the cgroup hierarchies (systemd does at boot)")
    init = "systemd" if SYSTEMD_INIT_DIR.is_dir() else "not systemd"
    if target.containerd is None:
        driver = "driver unknown (containerd's config unreadable)"
    else:
        driver = (f"driver {target.containerd.cgroup_driver} (from SystemdCgroup of "
                  "containerd's runc handlers)")
    return CheckResult("cgroups", Status.PASS, f"{names[layout]}, {driver}; init is {init}; "
                                               "husk follows either driver's paths")


@dataclass(frozen=True)
class GuestImage:
    """Where the guest's files are and what its manifest says."""

    kernel: Path
    initrd: Path
    image: Path
    manifest: Path
    identity: imageid.ImageIdentity | None  # None: no readable manifest
    installed_sources: str  # the hash of this husk's agent sources, "" if not found

    @classmethod
    def locate(cls, config: Config) -> "GuestImage":
        hv = config.hypervisor
        manifest = hv.image_path.parent / imageid.MANIFEST_NAME
        try:
            identity: imageid.ImageIdentity | None = imageid.parse_manifest(manifest.read_text())
        except (OSError, UnicodeDecodeError):
            identity = None
        dirs = imageid.installed_package_dirs()
        return cls(hv.kernel_path, hv.initrd_path, hv.image_path, manifest, identity,
                   imageid.sources_hash(dirs) if dirs else "")


def check_guest_image(target: Target) -> CheckResult:
    guest = GuestImage.locate(target.config)
    fix = f"{MAKE_GUEST_IMAGE}, or set [hypervisor] guest_dir in {target.config_file}"
    missing = [str(p) for p in (guest.kernel, guest.initrd, guest.image)
               if not os.access(p, os.R_OK) or not p.is_file()]
    if missing:
        return CheckResult("guest-image", Status.FAIL, f"missing: {', '.join(missing)}", fix)
    ident = guest.identity
    if ident is None:
        return CheckResult("guest-image", Status.WARN, f"files present, but no {guest.manifest}: "
                                                       "cannot tell which husk built them",
                           MAKE_GUEST_IMAGE)
    if not ident.husk_version or not ident.agent_sources:
        return CheckResult("guest-image", Status.FAIL, f"{guest.manifest} does not record the "
                                                       "husk version: an image built before "
                                                       "husk recorded it", MAKE_GUEST_IMAGE)
    if ident.husk_version != __version__:
        return CheckResult("guest-image", Status.FAIL, f"built for husk {ident.husk_version}, "
                                                       f"this is husk {__version__}",
                           MAKE_GUEST_IMAGE)
    if not guest.installed_sources:
        return CheckResult("guest-image", Status.WARN, "this husk's agent sources were not "
                                                       "found: cannot compare them with the "
                                                       "image's", "reinstall husk")
    if ident.agent_sources != guest.installed_sources:
        return CheckResult("guest-image", Status.FAIL,
                           f"its agent (sources {ident.agent_sources}) is not this husk's "
                           f"({guest.installed_sources}): the guest may not speak its protocol",
                           MAKE_GUEST_IMAGE)
    if target.config.hypervisor.guest_ram == "split":
        problem = imageid.split_ram_problem(guest.manifest)
        if problem:
            return CheckResult("guest-image", Status.FAIL, problem,
                               f'{MAKE_GUEST_IMAGE}, or set guest_ram = "shared" in '
                               f"{target.config_file}")
    summary = (f"{guest.image.parent}: husk {ident.husk_version}, agent sources "
               f"{ident.agent_sources}, {ident.kernel}")
    if (target.config.hypervisor.root_device == "pmem"
            and guest.image.stat().st_size % PMEM_ALIGN_BYTES):
        return CheckResult("guest-image", Status.WARN,
                           f"{summary}; {guest.image.name} is not whole {PMEM_ALIGN_BYTES >> 20} "
                           "MiB blocks, so it goes in as a virtio-blk disk instead of pmem: every "
                           "guest keeps its own copy of what it reads", MAKE_GUEST_IMAGE)
    return CheckResult("guest-image", Status.PASS, summary)


def containerd_version() -> tuple[str, str]:
    """(path, version) of the containerd on PATH.

    :raise CommandError: none on PATH, or it does not answer.
    """
    path = shutil.which("containerd")
    if path is None:
        raise CommandError("containerd is not on PATH")
    # "containerd github.com/containerd/containerd 1.6.20~ds1 <build>"; 2.x: ".../v2 v2.3.4 <commit>"
    fields = tool_version(path).split()
    return path, (fields[2].lstrip("v") if len(fields) > 2 else " ".join(fields))


def check_containerd(target: Target) -> CheckResult:
    fix = "apt-get install containerd (1.6 or later), or put containerd on PATH"
    try:
        path, version = containerd_version()
    except CommandError as exc:
        return CheckResult("containerd", Status.FAIL, str(exc), fix)
    if _version_tuple(version)[:2] < MIN_CONTAINERD:
        return CheckResult("containerd", Status.FAIL, f"containerd {version} at {path}: husk "
                                                      "needs 1.6 or later", fix)
    if target.containerd and target.containerd.version == 3 and _version_tuple(version)[0] < 2:
        return CheckResult("containerd", Status.FAIL,
                           f"containerd {version} cannot read {target.containerd.path} (config "
                           "version 3 is containerd 2.x's)",
                           "write the handler in a version 2 config (configs/containerd-husk.toml)")
    return CheckResult("containerd", Status.PASS, f"containerd {version} at {path}")


def check_containerd_config(target: Target) -> CheckResult:
    path = target.containerd_config
    snippet = (f"merge configs/containerd-husk.toml (containerd 1.6/1.7) or "
               f"configs/containerd2-husk.toml (2.x) into {path} and restart containerd")
    cfg = target.containerd
    if cfg is None:
        return CheckResult("containerd-config", Status.FAIL, target.containerd_error, snippet)
    handlers = cfg.husk_handlers
    if not handlers:
        return CheckResult("containerd-config", Status.FAIL,
                           f"{path} (version {cfg.version}) has no runtime with runtime_type "
                           f'"{HUSK_RUNTIME_TYPE}": pods cannot ask for husk', snippet)
    problems: list[str] = []
    fixes: list[str] = []
    for h in handlers:
        if h.config_path and not Path(h.config_path).is_file():
            return CheckResult("containerd-config", Status.FAIL,
                               f"handler {h.name!r}: options.ConfigPath {h.config_path} does "
                               "not exist: its shims cannot start",
                               f"create {h.config_path} from configs/husk.toml, or fix "
                               f"ConfigPath in {path}")
        denied = sorted(a for a in ALLOWED_ANNOTATIONS if not h.allows(a))
        if denied:
            problems.append(f"handler {h.name!r} does not let through {', '.join(denied)} "
                            "(pods cannot size their VM)")
            fixes.append(f'pod_annotations = ["io.husk.*"] in handler {h.name!r}')
        if not h.privileged_without_host_devices:
            problems.append(f"handler {h.name!r}: privileged containers get the host's "
                            "device list in their spec")
            fixes.append(f"privileged_without_host_devices = true in handler {h.name!r}")
    names = ", ".join(repr(h.name) for h in handlers)
    config_paths = sorted({h.config_path for h in handlers if h.config_path})
    uses = f"; ConfigPath {', '.join(config_paths)}" if config_paths else ""
    if problems:
        return CheckResult("containerd-config", Status.WARN,
                           f"{path}: handler {names}; " + "; ".join(problems),
                           "set " + "; ".join(fixes) + f" in {path}, then restart containerd")
    return CheckResult("containerd-config", Status.PASS,
                       f"{path} (version {cfg.version}): handler {names} with the io.husk.* "
                       f"annotations{uses}")


def check_shim_binary(target: Target) -> CheckResult:
    """containerd runs containerd-shim-husk-v2 from its own PATH (and its own directory)."""
    containerd = shutil.which("containerd")
    dirs = SYSTEMD_DEFAULT_PATH.split(":")
    if containerd and os.path.dirname(containerd) not in dirs:
        dirs.append(os.path.dirname(containerd))
    search = ":".join(dirs)
    found = shutil.which(SHIM_BINARY, path=search)
    if found:
        return CheckResult("shim", Status.PASS, found)
    # Beside this husk (a venv's bin), or on the caller's PATH: containerd may not see it.
    beside = Path(sys.argv[0]).resolve().parent / SHIM_BINARY
    elsewhere = shutil.which(SHIM_BINARY) or (str(beside) if beside.is_file() else None)
    if elsewhere:
        return CheckResult("shim", Status.WARN,
                           f"{elsewhere} is not on containerd's default PATH ({search}): only "
                           "a containerd whose PATH includes its directory finds it",
                           f"ln -s {elsewhere} /usr/local/bin/{SHIM_BINARY}")
    return CheckResult("shim", Status.FAIL, f"{SHIM_BINARY} not found",
                       f"pip install husk, then ln -s <venv>/bin/{SHIM_BINARY} /usr/local/bin/")


def make_target(explicit: str | None, containerd_config: Path) -> tuple[CheckResult, Target]:
    config_result, config = check_config(explicit)
    path = resolve_config_path(explicit)
    config_file = str(path) if path else str(DEFAULT_CONFIG_PATHS[0])
    try:
        containerd: ContainerdConfig | None = read_containerd_config(containerd_config)
        error = ""
    except ContainerdConfigError as exc:
        containerd, error = None, str(exc)
    return config_result, Target(config, config_file, containerd_config, containerd, error)


CHECKS = (check_accel, check_qemu, check_qemu_rbd, check_virtiofsd, check_vhost_vsock,
          check_vhost_net, check_tun, check_ksm, check_cgroups, check_guest_image,
          check_containerd,
          check_containerd_config, check_shim_binary)


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    # Paths and package names stay whole.
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


@dataclass(frozen=True)
class Report:
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when nothing failed: a pod can run (perhaps degraded)."""
        return all(r.status is not Status.FAIL for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "husk_version": __version__,
                "checks": [r.as_dict() for r in self.results]}

    def render(self, width: int = RENDER_WIDTH) -> str:
        lines = []
        for r in self.results:
            lines += _wrap(r.detail, width, f"{r.status.value.upper():4}  {r.name:18}",
                           " " * RENDER_INDENT)
            if r.fix and r.status is not Status.PASS:
                lines += _wrap(f"fix: {r.fix}", width, " " * RENDER_INDENT,
                               " " * (RENDER_INDENT + 5))
        failed = sum(r.status is Status.FAIL for r in self.results)
        warned = sum(r.status is Status.WARN for r in self.results)
        lines.append(f"\npods can run ({warned} warnings)" if self.ok else
                     f"\npods cannot run: {failed} failed, {warned} warnings")
        return "\n".join(lines)


def run_checks(explicit: str | None, containerd_config: Path = DEFAULT_CONTAINERD_CONFIG) -> Report:
    config_result, target = make_target(explicit, containerd_config)
    return Report((config_result, *(check(target) for check in CHECKS)))
