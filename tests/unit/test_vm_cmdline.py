"""The QEMU command line: devices present, values escaped, limits enforced."""
from __future__ import annotations

from pathlib import Path

import pytest

from shim.vm.accel import Accel, AccelChoice
from shim.vm.cmdline import (AgentTransport, CmdlineError, SharedFsType, VmPaths, VmSpec,
                             build_cmdline, qemu_value)


def _spec(tmp_path: Path, **kw: object) -> VmSpec:
    base = dict(name="pod", paths=VmPaths(tmp_path), qemu_path="qemu",
                kernel=Path("/k"), initrd=Path("/i"), image=Path("/img,x"), vcpus=2,
                memory_mib=256, accel=AccelChoice(Accel.TCG, "test"),
                shared_fs=SharedFsType.VIRTIO_FS, shared_dir=tmp_path / "shared",
                transport=AgentTransport.SERIAL)
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_virtiofs_needs_shared_memory(tmp_path: Path) -> None:
    argv = build_cmdline(_spec(tmp_path))
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in joined
    assert "q35,vmport=off,sata=off,smbus=off,memory-backend=mem" in joined
    assert "vhost-user-fs-pci" in joined
    assert "-nodefaults" in argv and "-smp" in argv and argv[argv.index("-smp") + 1] == "2"


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
