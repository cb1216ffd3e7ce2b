"""The QEMU command line for one pod VM, built from a VmSpec.

Owns argument syntax only: no processes, no sockets. A q35 machine with PCIe
root ports left free for hot-plugged disks and NICs, direct kernel boot, no
default devices, QMP on a unix socket, the agent channel, the guest's output
(console and log port) as clients of sockets the shim listens on, the shared
filesystem (virtio-fs, with guest RAM split into NUMA nodes so that virtiofsd
maps only a small one, or 9p), and QEMU's seccomp sandbox.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from shim.vm.accel import AccelChoice
from shim.vm.devices import VIRTIO_FS_QUEUE_SIZE, SlotMap
from shim.vm.ram import qemu_mem_path

AGENT_PORT_NAME = "io.husk.agent"
AGENT_CHARDEV = "agent"
CONSOLE_CHARDEV = "console"
GUEST_LOG_CHARDEV = "guestlog"
LOG_PORT_NAME = "io.husk.log"
SHARED_FS_TAG = "husk-shared"
SHARED_FS_CHARDEV = "fs"
# Memory backends of boot RAM with virtio-fs (RamLayout).
PRIVATE_RAM_ID = "ram-private"
SHARED_RAM_ID = "ram-shared"
PRIVATE_HIGH_RAM_ID = "ram-private-high"
AGENT_VSOCK_PORT = 1024
# DIMM slots for memory hot-added to a running VM, one per grow step.
MEMORY_SLOTS = 8
# Linux's sockaddr_un.sun_path holds 108 bytes including the terminator;
# leave margin for the suffixes QEMU and virtiofsd add.
UNIX_PATH_MAX = 106
FAST_BOOT_PARAMS = ("tsc=reliable", "no_timer_check", "rcupdate.rcu_expedited=1",
                    "i8042.direct=1", "i8042.dumbkbd=1", "i8042.nopnp=1", "i8042.noaux=1",
                    "noreplace-smp", "cryptomgr.notests")
# No DMA bounce buffers: virtio devices reach all guest memory, and a VM with room
# for memory above 4 GiB (maxmem) would otherwise reserve and zero 64 MiB for them
# (with 9p; virtio-fs bounces through a small pool of its own, below).
NO_BOUNCE_BUFFERS = "swiotlb=noforce"
# Guest RAM with virtio-fs. vhost-user hands the backend every RAM region that has
# a file behind it, so only a small NUMA node is shared memory (a memfd that
# virtiofsd maps); the rest is private anonymous memory that no other process
# maps and that KSM can merge across pods (what pods restored from one template
# have in common: the guest kernel, the agent). The guest keeps virtio-fs inside
# the shared node (guest-image/kernel-patches/virtio-fs-dma-api.patch): its
# buffers bounce through a swiotlb pool and its rings come from a CMA area, both
# placed there. The node ends where RAM below 4 GiB ends: the kernel takes the
# swiotlb pool from the top of that RAM.
SHARED_RAM_MIB = 32
BOUNCE_POOL_SLABS = 1024  # swiotlb slabs of 2 KiB: a 2 MiB pool
RING_CMA_MIB = 4
VIRTIO_FS_DMA_PARAMS = ("virtio_ring.virtio_fs_dma_api=1", f"swiotlb={BOUNCE_POOL_SLABS},force")
# q35 keeps RAM below 4 GiB whole up to 2816 MiB (0xb0000000); from there on, only
# the first 2 GiB is below 4 GiB and the rest starts at 4 GiB.
Q35_WHOLE_LOWMEM_LIMIT_MIB = 2816
Q35_SPLIT_LOWMEM_MIB = 2048
# Lockdown (confidentiality) makes the guest kernel create no tracefs files, whose
# ~12,000 inodes and dentries are ~10 MiB of slab in every guest (and in every pod
# restored from a template); it also closes what a privileged container has no
# business with inside its VM: /dev/mem, kcore, kprobes, unsigned modules, kexec.
GUEST_LOCKDOWN = "lockdown=confidentiality"
# A virtio-pmem root takes whole 128 MiB blocks of the guest's device memory
# area: the guest adds hot-plugged DIMMs placed after it only at a memory block
# boundary (128 MiB on x86-64). The image's padding is a hole in the file.
PMEM_ALIGN_BYTES = 128 << 20
# ext4 on the pmem device reading and mapping files in place instead of copying
# them into the guest's page cache.
PMEM_ROOT_PARAMS = ("root=/dev/pmem0", "rootflags=dax")
# QEMU's seccomp filter: QEMU never needs to run programs (no helper scripts,
# no -daemonize), change uids or use obsolete or scheduler/resource syscalls,
# so a guest that takes over QEMU cannot either.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# 9p on a writable share: QEMU (root) sets the guest's owners and modes on the
# host files, and reports failures instead of hiding them ("none" does).
NINE_P_SECURITY_MODEL = "passthrough"


class SharedFsType(enum.Enum):
    VIRTIO_FS = "virtio-fs"
    NINE_P = "9p"


class AgentTransport(enum.Enum):
    VSOCK = "vsock"
    SERIAL = "serial"


MAC_ADDRESS = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class NicSpec:
    """A virtio-net NIC backed by tap fds the shim opened (QEMU opens nothing itself)."""

    id: str
    mac: str
    mtu: int
    tap_fds: tuple[int, ...]
    vhost_fds: tuple[int, ...] = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return self.tap_fds + self.vhost_fds

    def netdev_args(self) -> str:
        """The -netdev value (fds= takes one fd per queue)."""
        args = f"tap,id={self.id},fds={':'.join(map(str, self.tap_fds))}"
        if self.vhost_fds:
            args += f",vhost=on,vhostfds={':'.join(map(str, self.vhost_fds))}"
        return args

    def device_args(self, slot_args: str) -> str:
        """The -device value. host_mtu tells the guest driver the MTU; no option ROM
        (nothing boots from the network)."""
        if not MAC_ADDRESS.fullmatch(self.mac):
            raise CmdlineError(f"NIC {self.id}: {self.mac!r} is not a MAC address")
        args = (f"virtio-net-pci,id={self.id},netdev={self.id},mac={self.mac},"
                f"host_mtu={self.mtu},romfile=,{slot_args}")
        queues = len(self.tap_fds)
        if queues > 1:
            args += f",mq=on,vectors={2 * queues + 2}"
        return args


@dataclass(frozen=True)
class VmPaths:
    """Files of one VM, all inside its private run directory."""

    run_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_serial_socket(self) -> Path:
        return self.run_dir / "serial.sock"

    @property
    def agent_socket(self) -> Path:
        """Where the shim's gRPC client connects (spliced to the guest)."""
        return self.run_dir / "agent.sock"

    @property
    def virtiofsd_socket(self) -> Path:
        return self.run_dir / "fs.sock"

    @property
    def console_socket(self) -> Path:
        """The shim listens here; QEMU connects the serial console to it."""
        return self.run_dir / "con.sock"

    @property
    def guest_log_socket(self) -> Path:
        """The shim listens here; QEMU connects the io.husk.log port to it."""
        return self.run_dir / "log.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def guest_log(self) -> Path:
        return self.run_dir / "guest.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def virtiofsd_pid_file(self) -> Path:
        return self.run_dir / "virtiofsd.pid"

    def sockets(self) -> list[Path]:
        return [self.qmp_socket, self.agent_serial_socket, self.agent_socket,
                self.virtiofsd_socket, self.console_socket, self.guest_log_socket]

    def pid_files(self) -> list[Path]:
        return [self.pid_file, self.virtiofsd_pid_file]


@dataclass(frozen=True)
class VmSpec:
    name: str
    paths: VmPaths
    qemu_path: str
    kernel: Path
    initrd: Path
    image: Path
    vcpus: int
    memory_mib: int
    accel: AccelChoice
    shared_fs: SharedFsType
    shared_dir: Path
    transport: AgentTransport
    max_vcpus: int = 0       # what hot-plug may grow it to; 0 = no room
    max_memory_mib: int = 0
    # Every possible vCPU present from the start, the guest booting only `vcpus` of
    # them (the rest come online on resize): for TCG, where QEMU 7.2 aborts when a
    # hot-plugged vCPU's thread finds the translation buffer's regions all taken.
    all_vcpus_present: bool = False
    # The shared filesystem's device is hot-plugged after a restore (vhost-user-fs
    # cannot migrate): the command line keeps only its memory layout.
    shared_fs_hotplug: bool = False
    # Waits for a migration stream (a template's) instead of booting: -incoming defer.
    incoming: bool = False
    # The shared node of guest RAM (RamLayout) in this memfd (shim.vm.ram) instead of
    # one QEMU creates: a template's, or a VM's restored from one; the migration
    # stream then leaves it out (and carries the private nodes).
    ram_fd: int = -1
    # Guest RAM split into NUMA nodes with virtio-fs (RamLayout): virtiofsd maps only
    # the small shared node. False: all of guest RAM is the shared memfd.
    split_ram: bool = False
    # > 0: the image is a read-only virtio-pmem device of this many bytes (the
    # guest's root on DAX; a ROM region, so the guest cannot write it and vhost-user
    # backends are not given it) instead of a virtio-blk disk.
    root_pmem_bytes: int = 0
    vsock_cid: int = 0
    vhost_fd: int = -1
    hotplug_ports: int = 4
    tcg_buffer_mib: int = 0  # 0 = sized by the possible vCPUs (shim.vm.accel)
    msize_9p: int = 512 * 1024
    kernel_params: str = ""
    debug: bool = False
    extra_fds: list[int] = field(default_factory=list)
    nics: tuple[NicSpec, ...] = ()

    def passed_fds(self) -> tuple[int, ...]:
        """Every fd QEMU inherits (the command line names them by number)."""
        ram = (self.ram_fd,) if self.ram_fd >= 0 else ()
        return tuple(self.extra_fds) + ram + tuple(fd for nic in self.nics for fd in nic.fds)


class CmdlineError(ValueError):
    """A value cannot be placed on QEMU's command line safely."""


@dataclass(frozen=True)
class RamLayout:
    """Boot RAM as NUMA nodes, in address order: private (node 0, with every vCPU),
    shared with virtiofsd (node 1, the top of RAM below 4 GiB), private above 4 GiB
    (node 2, only when RAM does not fit below 4 GiB)."""

    private_low_mib: int
    shared_mib: int
    private_high_mib: int

    @classmethod
    def for_memory(cls, memory_mib: int, split: bool = True) -> RamLayout:
        """``split=False``: one node, all of it shared."""
        if not split:
            return cls(0, memory_mib, 0)
        below_4g = memory_mib if memory_mib < Q35_WHOLE_LOWMEM_LIMIT_MIB else Q35_SPLIT_LOWMEM_MIB
        return cls(below_4g - SHARED_RAM_MIB, SHARED_RAM_MIB, memory_mib - below_4g)

    @classmethod
    def of(cls, spec: VmSpec) -> RamLayout:
        return cls.for_memory(spec.memory_mib, spec.split_ram)

    def kernel_params(self) -> tuple[str, ...]:
        """Where the guest keeps virtio-fs: rings in a CMA area inside the shared node
        (the kernel takes the bounce pool from its top by itself); no bounce buffers
        when all of guest RAM is shared."""
        if not self.private_low_mib:
            return (NO_BOUNCE_BUFFERS,)
        start = self.private_low_mib
        return (*VIRTIO_FS_DMA_PARAMS,
                f"cma={RING_CMA_MIB}M@{start}M-{start + self.shared_mib}M")


def qemu_value(value: object) -> str:
    """One value inside a QEMU ``key=value,...`` option: commas are doubled."""
    text = str(value)
    if any(c in text for c in "\n\0"):
        raise CmdlineError(f"value {text!r} contains a newline or NUL")
    return text.replace(",", ",,")


def check_socket_path(path: Path) -> None:
    if len(str(path).encode()) >= UNIX_PATH_MAX:
        raise CmdlineError(f"socket path {path} is longer than {UNIX_PATH_MAX - 1} bytes")


def kernel_cmdline(spec: VmSpec) -> str:
    # panic=-1 with QEMU's -no-reboot: a guest that panics ends QEMU at once.
    root = PMEM_ROOT_PARAMS if spec.root_pmem_bytes else ("root=/dev/vda",)
    if spec.shared_fs is SharedFsType.VIRTIO_FS:
        dma = RamLayout.of(spec).kernel_params()
    else:
        dma = (NO_BOUNCE_BUFFERS,)
    params = ["console=ttyS0", "8250.nr_uarts=1", *root, "ro", "panic=-1",
              # Skip probing hardware a VM never has; saves seconds under TCG.
              *FAST_BOOT_PARAMS, GUEST_LOCKDOWN, *dma, f"husk.transport={spec.transport.value}"]
    if spec.debug:
        params += ["husk.debug=1", "loglevel=7"]
    else:
        params += ["quiet", "loglevel=3"]
    if spec.all_vcpus_present and spec.max_vcpus > spec.vcpus:
        params.append(f"maxcpus={spec.vcpus}")
    if spec.kernel_params:
        params.append(spec.kernel_params)
    return " ".join(params)


def smp_args(spec: VmSpec) -> str:
    """-smp: the vCPUs present at boot, and as many more possible for hot-plug."""
    if spec.all_vcpus_present and spec.max_vcpus > spec.vcpus:
        return f"{spec.max_vcpus},maxcpus={spec.max_vcpus}"
    if spec.max_vcpus > spec.vcpus:
        return f"{spec.vcpus},maxcpus={spec.max_vcpus}"
    return str(spec.vcpus)


def memory_args(spec: VmSpec) -> str:
    """-m: boot memory, and DIMM slots up to the maximum for hot-added memory; a
    pmem root takes its room in the same device memory area, on top."""
    pmem_mib = -(-spec.root_pmem_bytes // (1 << 20))
    if spec.max_memory_mib > spec.memory_mib or pmem_mib:
        maxmem = max(spec.max_memory_mib, spec.memory_mib) + pmem_mib
        return f"{spec.memory_mib}M,slots={MEMORY_SLOTS},maxmem={maxmem}M"
    return f"{spec.memory_mib}M"


def root_args(spec: VmSpec) -> list[str]:
    """The root image: a read-only virtio-pmem mapping of the file, or a virtio-blk disk."""
    if spec.root_pmem_bytes:
        if spec.root_pmem_bytes % PMEM_ALIGN_BYTES:
            raise CmdlineError(f"a pmem root must be a multiple of {PMEM_ALIGN_BYTES} bytes "
                               f"({spec.image} has {spec.root_pmem_bytes})")
        # share=on: every VM maps the host's page cache of the file; readonly=on
        # opens it read-only and makes the region a ROM.
        return ["-object", f"memory-backend-file,id=rootfs,mem-path={qemu_value(spec.image)},"
                           f"size={spec.root_pmem_bytes},share=on,readonly=on",
                "-device", "virtio-pmem-pci,memdev=rootfs,id=rootfs-pmem,bus=pcie.0,addr=0x2"]
    return ["-drive", f"file={qemu_value(spec.image)},if=none,id=rootfs,format=raw,"
                      "readonly=on,cache=unsafe",
            "-device", "virtio-blk-pci,drive=rootfs,bus=pcie.0,addr=0x2"]


def numa_ram_args(spec: VmSpec) -> list[str]:
    """Boot RAM as RamLayout's nodes: private anonymous memory, and the shared node
    in a memfd (the shim's ``ram_fd`` when it has one, which the migration stream
    then leaves out); unsplit, the shared memfd alone."""
    layout = RamLayout.of(spec)
    if spec.ram_fd >= 0:
        shared = f"memory-backend-file,mem-path={qemu_mem_path(spec.ram_fd)}"
    else:
        shared = "memory-backend-memfd"
    shared += f",id={SHARED_RAM_ID},size={layout.shared_mib}M,share=on"
    if not layout.private_low_mib:  # one node: the machine's memory backend
        return ["-object", shared]
    backends = [f"memory-backend-ram,id={PRIVATE_RAM_ID},size={layout.private_low_mib}M",
                shared]
    possible_vcpus = max(spec.vcpus, spec.max_vcpus)
    nodes = [f"node,nodeid=0,cpus=0-{possible_vcpus - 1},memdev={PRIVATE_RAM_ID}",
             f"node,nodeid=1,memdev={SHARED_RAM_ID}"]
    if layout.private_high_mib:
        backends.append(f"memory-backend-ram,id={PRIVATE_HIGH_RAM_ID},"
                        f"size={layout.private_high_mib}M")
        nodes.append(f"node,nodeid=2,memdev={PRIVATE_HIGH_RAM_ID}")
    return [*(arg for backend in backends for arg in ("-object", backend)),
            *(arg for node in nodes for arg in ("-numa", node))]


def build_cmdline(spec: VmSpec, slots: SlotMap | None = None) -> list[str]:
    """The full argv for QEMU; boot-time devices take their slots from ``slots``
    (the VM's; a fresh map when only the command line is wanted).

    :raise CmdlineError: a path or value that QEMU would misparse.
    """
    p = spec.paths
    slots = slots if slots is not None else SlotMap(spec.hotplug_ports)
    for sock in p.sockets():
        check_socket_path(sock)
    machine = "q35,vmport=off,sata=off,smbus=off"
    args = [spec.qemu_path, "-name", qemu_value(f"husk-{spec.name}"),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-sandbox", QEMU_SANDBOX,
            *spec.accel.qemu_args(max(spec.vcpus, spec.max_vcpus), spec.tcg_buffer_mib),
            "-smp", smp_args(spec), "-m", memory_args(spec),
            "-kernel", qemu_value(spec.kernel), "-initrd", qemu_value(spec.initrd),
            "-append", kernel_cmdline(spec),
            "-qmp", f"unix:{qemu_value(p.qmp_socket)},server=on,wait=off",
            "-pidfile", qemu_value(p.pid_file),
            # server=off: QEMU connects to the shim's listener (see shim.vm.guestlog).
            "-chardev", f"socket,id={CONSOLE_CHARDEV},path={qemu_value(p.console_socket)},"
                        "server=off",
            "-serial", f"chardev:{CONSOLE_CHARDEV}",
            *root_args(spec)]
    if spec.shared_fs is SharedFsType.VIRTIO_FS:
        args += numa_ram_args(spec)
        if not spec.split_ram:
            machine += f",memory-backend={SHARED_RAM_ID}"
        if not spec.shared_fs_hotplug:
            args += ["-chardev", f"socket,id={SHARED_FS_CHARDEV},"
                                 f"path={qemu_value(p.virtiofsd_socket)}",
                     "-device", f"vhost-user-fs-pci,chardev={SHARED_FS_CHARDEV},"
                                f"tag={SHARED_FS_TAG},queue-size={VIRTIO_FS_QUEUE_SIZE},"
                                "bus=pcie.0,addr=0x3"]
    else:
        args += ["-fsdev", f"local,id=fs,path={qemu_value(spec.shared_dir)},"
                           f"security_model={NINE_P_SECURITY_MODEL}",
                 "-device", f"virtio-9p-pci,fsdev=fs,mount_tag={SHARED_FS_TAG},"
                            "bus=pcie.0,addr=0x3"]
    args += ["-machine", machine]
    args += ["-device", "virtio-serial-pci,id=serial0,bus=pcie.0,addr=0x4",
             "-chardev", f"socket,id={GUEST_LOG_CHARDEV},path={qemu_value(p.guest_log_socket)},"
                         "server=off",
             "-device", f"virtserialport,bus=serial0.0,chardev={GUEST_LOG_CHARDEV},"
                        f"name={LOG_PORT_NAME}"]
    if spec.transport is AgentTransport.SERIAL:
        args += ["-chardev", f"socket,id={AGENT_CHARDEV},path={qemu_value(p.agent_serial_socket)},"
                             "server=on,wait=off",
                 "-device", f"virtserialport,bus=serial0.0,chardev={AGENT_CHARDEV},"
                            f"name={AGENT_PORT_NAME}"]
    else:
        args += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={spec.vsock_cid},"
                            f"vhostfd={spec.vhost_fd},bus=pcie.0,addr=0x5"]
    for nic in spec.nics:
        args += ["-netdev", nic.netdev_args(), "-device", nic.device_args(slots.coldplug().qemu_args)]
    # Free page reporting: the guest hands back memory it freed (a booted kernel's
    # initramfs, a restored guest's untouched RAM, what a finished process held),
    # and QEMU releases it on the host.
    args += ["-device", f"virtio-balloon-pci,id=balloon0,free-page-reporting=on,"
                        f"{slots.coldplug().qemu_args}"]
    # A new generation ID at every QEMU start: a guest restored from a template
    # reseeds its random number generator the moment it runs again.
    args += ["-device", "vmgenid,guid=auto"]
    if spec.incoming:
        args += ["-incoming", "defer"]
    # Free root ports for hot-plugged devices.
    return args + slots.port_args()
