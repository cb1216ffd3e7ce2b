"""The QEMU command line: devices present, values escaped, limits enforced."""
from __future__ import annotations

from pathlib import Path

import pytest

from shim.vm.accel import Accel, AccelChoice
from shim.vm.cmdline import (QEMU_SANDBOX, AgentTransport, CmdlineError, NicSpec, RamLayout,
                             SharedFsType, VmPaths, VmSpec, build_cmdline, qemu_value)
from shim.vm.virtiofsd import virtiofsd_argv


def _spec(tmp_path: Path, **kw: object) -> VmSpec:
    base = dict(name="pod", paths=VmPaths(tmp_path), qemu_path="qemu",
                kernel=Path("/k"), initrd=Path("/i"), image=Path("/img,x"), vcpus=2,
                memory_mib=256, accel=AccelChoice(Accel.TCG, "test"),
                shared_fs=SharedFsType.VIRTIO_FS, shared_dir=tmp_path / "shared",
                transport=AgentTransport.SERIAL)
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_shared_guest_ram_is_all_mapped_by_virtiofsd(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path))
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=ram-shared,size=256M,share=on" in joined
    assert "q35,vmport=off,sata=off,smbus=off,memory-backend=ram-shared" in joined
    assert "-numa" not in argv and "vhost-user-fs-pci" in joined
    params = argv[argv.index("-append") + 1].split()
    assert "swiotlb=noforce" in params and not any(p.startswith("cma=") for p in params)


def test_virtiofsd_gets_only_a_small_shared_node_of_guest_ram(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, split_ram=True))
    joined = " ".join(argv)
    # vhost-user hands the backend every file-backed region: only the shared node has one.
    assert "memory-backend-ram,id=ram-private,size=224M" in joined
    assert "memory-backend-memfd,id=ram-shared,size=32M,share=on" in joined
    assert argv[argv.index("-numa") + 1] == "node,nodeid=0,cpus=0-1,memdev=ram-private"
    assert "node,nodeid=1,memdev=ram-shared" in argv and "nodeid=2" not in joined
    assert "memory-backend=" not in joined
    assert "vhost-user-fs-pci" in joined and "queue-size=1024" in joined
    assert "-nodefaults" in argv and "-smp" in argv and argv[argv.index("-smp") + 1] == "2"
    # The guest keeps virtio-fs's buffers and rings inside the shared node.
    params = argv[argv.index("-append") + 1].split()
    assert {"virtio_ring.virtio_fs_dma_api=1", "swiotlb=1024,force",
            "cma=4M@224M-256M"} <= set(params)
    assert "swiotlb=noforce" not in params


@pytest.mark.parametrize("memory_mib, low, high", [
    (512, 480, 0), (2815, 2783, 0),
    # From 2816 MiB q35 keeps only 2 GiB below 4 GiB: the shared node ends there.
    (2816, 2016, 768), (16384, 2016, 14336)])
def test_the_shared_node_ends_where_ram_below_4g_ends(memory_mib: int, low: int,
                                                       high: int) -> None:
    layout = RamLayout.for_memory(memory_mib)
    assert (layout.private_low_mib, layout.shared_mib, layout.private_high_mib) == (low, 32, high)
    assert layout.private_low_mib + layout.shared_mib + layout.private_high_mib == memory_mib
    assert f"cma=4M@{low}M-{low + 32}M" in layout.kernel_params()


def test_ram_above_4g_is_a_third_node_of_private_memory(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, memory_mib=4096, split_ram=True))
    joined = " ".join(argv)
    assert "memory-backend-ram,id=ram-private-high,size=2048M" in joined
    assert "node,nodeid=2,memdev=ram-private-high" in argv


def test_the_vm_boots_with_room_to_grow_to_its_maximum(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, vcpus=2, memory_mib=768, max_vcpus=8,
                               max_memory_mib=4096))
    assert argv[argv.index("-smp") + 1] == "2,maxcpus=8"
    assert argv[argv.index("-m") + 1] == "768M,slots=8,maxmem=4096M"
    # Boot memory is the machine's backend; what hot-plug adds has its own.
    assert "memory-backend-memfd,id=ram-shared,size=768M,share=on" in " ".join(argv)


def test_under_tcg_every_vcpu_is_present_and_the_guest_boots_only_its_share(
        tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, vcpus=2, max_vcpus=8, all_vcpus_present=True))
    assert argv[argv.index("-smp") + 1] == "8,maxcpus=8"
    assert "maxcpus=2" in argv[argv.index("-append") + 1].split()


def test_a_vm_from_a_template_keeps_its_memory_layout_but_plugs_virtiofs_later(
        tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, shared_fs_hotplug=True, incoming=True, split_ram=True))
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=ram-shared,size=32M,share=on" in joined
    assert "cma=4M@224M-256M" in argv[argv.index("-append") + 1]
    assert "vhost-user-fs-pci" not in joined and "fs.sock" not in joined
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert "-incoming" not in build_cmdline(_spec(tmp_path))


def test_every_vm_reports_free_pages_and_gets_a_new_generation_id(tmp_path: Path) -> None:
    joined = " ".join(build_cmdline(_spec(tmp_path)))
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on,bus=pcie.0" in joined
    assert "vmgenid,guid=auto" in joined


def test_9p_has_no_shared_memory(tmp_path: Path) -> None:
    joined = " ".join(build_cmdline(_spec(tmp_path, shared_fs=SharedFsType.NINE_P)))
    assert "virtio-9p-pci" in joined and "memfd" not in joined


def test_commas_in_paths_are_escaped(tmp_path: Path) -> None:
    joined = " ".join(build_cmdline(_spec(tmp_path)))
    assert "file=/img,,x,if=none" in joined


def test_hotplug_ports(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, hotplug_ports=3))
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert len(ports) == 3 and "id=hp2" in ports[2]


def test_tcg_buffer_from_config_or_sized_by_the_vcpus(tmp_path: Path) -> None:
    sized = build_cmdline(_spec(tmp_path, max_vcpus=2))
    assert sized[sized.index("-accel") + 1] == "tcg,tb-size=52"
    fixed = build_cmdline(_spec(tmp_path, max_vcpus=2, tcg_buffer_mib=32))
    assert fixed[fixed.index("-accel") + 1] == "tcg,tb-size=32"
    kvm = build_cmdline(_spec(tmp_path, tcg_buffer_mib=32, accel=AccelChoice(Accel.KVM, "test")))
    assert kvm[kvm.index("-accel") + 1] == "kvm"


def test_vsock_transport(tmp_path: Path) -> None:
    joined = " ".join(build_cmdline(_spec(tmp_path, transport=AgentTransport.VSOCK,
                                          vsock_cid=7, vhost_fd=9)))
    assert "vhost-vsock-pci,id=vsock0,guest-cid=7,vhostfd=9" in joined
    assert "io.husk.agent" not in joined


def test_kvm_uses_host_cpu(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, accel=AccelChoice(Accel.KVM, "t")))
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"


def test_long_socket_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CmdlineError, match="longer than"):
        build_cmdline(_spec(tmp_path, paths=VmPaths(tmp_path / ("x" * 120))))


def test_newline_is_refused() -> None:
    with pytest.raises(CmdlineError):
        qemu_value("a\nb")


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_runs_under_its_seccomp_sandbox(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path))
    assert _values(argv, "-sandbox") == [QEMU_SANDBOX]
    for option in ("on", "obsolete=deny", "elevateprivileges=deny", "spawn=deny",
                   "resourcecontrol=deny"):
        assert option in QEMU_SANDBOX.split(",")


def test_guest_output_goes_to_shim_sockets_not_files(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path))
    chardevs = _values(argv, "-chardev")
    assert f"socket,id=console,path={tmp_path}/con.sock,server=off" in chardevs
    assert f"socket,id=guestlog,path={tmp_path}/log.sock,server=off" in chardevs
    assert not [c for c in chardevs if c.startswith("file,")]
    assert _values(argv, "-serial") == ["chardev:console"]
    assert "virtserialport,bus=serial0.0,chardev=guestlog,name=io.husk.log" in argv


def test_every_socket_path_is_checked(tmp_path: Path) -> None:
    """build_cmdline checks sockets(): the guest output sockets must be among them."""
    paths = VmPaths(tmp_path)
    assert {paths.console_socket, paths.guest_log_socket} <= set(paths.sockets())
    assert max(len(p.name) for p in paths.sockets()) <= len("serial.sock")  # keep names short


def test_9p_never_uses_security_model_none(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, shared_fs=SharedFsType.NINE_P))
    (fsdev,) = _values(argv, "-fsdev")
    assert "security_model=passthrough" in fsdev.split(",")
    assert "security_model=none" not in fsdev


def test_pid_files(tmp_path: Path) -> None:
    paths = VmPaths(tmp_path)
    assert paths.virtiofsd_pid_file.name == "virtiofsd.pid"
    assert paths.pid_files() == [paths.pid_file, paths.virtiofsd_pid_file]


def test_virtiofsd_is_confined_and_has_no_xattrs_by_default(tmp_path: Path) -> None:
    argv = virtiofsd_argv("virtiofsd", tmp_path / "fs.sock", tmp_path / "shared", "auto")
    opts = _values(argv, "-o")
    assert "sandbox=namespace" in opts
    assert "modcaps=-mknod:-setfcap" in opts
    assert "no_xattr" in opts and "xattr" not in opts
    assert f"source={tmp_path}/shared" in opts and "cache=auto" in opts


def test_virtiofsd_xattrs_when_configured(tmp_path: Path) -> None:
    opts = _values(virtiofsd_argv("virtiofsd", tmp_path / "fs.sock", tmp_path, "none",
                                  xattr=True), "-o")
    assert "xattr" in opts and "no_xattr" not in opts


def _nic(i: int, queues: int = 1, vhost: bool = False) -> NicSpec:
    taps = tuple(range(10 + 10 * i, 10 + 10 * i + queues))
    return NicSpec(f"net{i}", f"02:00:00:00:00:0{i}", 1450, taps,
                   tuple(fd + 100 for fd in taps) if vhost else ())


def test_nics_take_tap_fds_and_the_cni_mac_and_mtu(tmp_path: Path) -> None:
    spec = _spec(tmp_path, nics=(_nic(0), _nic(1, queues=2, vhost=True)))
    argv = build_cmdline(spec)
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == ["tap,id=net0,fds=10", "tap,id=net1,fds=20:21,vhost=on,vhostfds=120:121"]
    nics = [a for a in argv if a.startswith("virtio-net-pci")]
    assert "mac=02:00:00:00:00:00,host_mtu=1450" in nics[0] and "mq=on" not in nics[0]
    assert "mq=on,vectors=6" in nics[1]
    assert "bus=pcie.0,addr=0x6" in nics[0] and "bus=pcie.0,addr=0x7" in nics[1]
    assert spec.passed_fds() == (10, 20, 21, 120, 121), "QEMU must inherit every fd it names"


def test_a_bad_mac_never_reaches_qemu(tmp_path: Path) -> None:
    bad = NicSpec("net0", "02:00:00:00:00:00,romfile=/etc/shadow", 1500, (10,))
    with pytest.raises(CmdlineError):
        build_cmdline(_spec(tmp_path, nics=(bad,)))


def test_a_pmem_root_is_a_read_only_mapping_with_room_beside_the_dimms(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path, root_pmem_bytes=256 << 20, memory_mib=512,
                               max_memory_mib=4096))
    joined = " ".join(argv)
    assert ("memory-backend-file,id=rootfs,mem-path=/img,,x,size=268435456,share=on,readonly=on"
            in joined)
    assert "virtio-pmem-pci,memdev=rootfs" in joined and "virtio-blk-pci" not in joined
    # The DIMMs keep their whole room: the pmem region comes on top of it.
    assert argv[argv.index("-m") + 1] == "512M,slots=8,maxmem=4352M"
    append = argv[argv.index("-append") + 1].split()
    assert "root=/dev/pmem0" in append and "rootflags=dax" in append and "ro" in append
    # Without room to grow, the pmem region still needs a device memory area.
    fixed = build_cmdline(_spec(tmp_path, root_pmem_bytes=128 << 20, memory_mib=512))
    assert fixed[fixed.index("-m") + 1] == "512M,slots=8,maxmem=640M"


def test_a_pmem_root_must_be_whole_memory_blocks(tmp_path: Path) -> None:
    with pytest.raises(CmdlineError, match="multiple of 134217728"):
        build_cmdline(_spec(tmp_path, root_pmem_bytes=(128 << 20) + (2 << 20)))


def test_a_virtio_blk_root(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path))
    assert "virtio-blk-pci,drive=rootfs,bus=pcie.0,addr=0x2" in argv
    assert "root=/dev/vda" in argv[argv.index("-append") + 1].split()
