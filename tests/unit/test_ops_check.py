"""``husk check``: each check against fakes of its neighbours (binaries, devices, files)."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from shim import __version__
from shim.cgroups import host
from shim.config import Config, HypervisorConfig
from shim.ops import check, imageid
from shim.ops.check import Report, Status, Target
from shim.vm.accel import Accel, AccelChoice
from shim.vm.cmdline import PMEM_ALIGN_BYTES

HUSK_V2 = '''version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
  pod_annotations = ["io.husk.*"]
  privileged_without_host_devices = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
'''
HUSK_V3 = '''version = 3
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-like]
  runtime_type = "io.containerd.husk.v2"
  pod_annotations = ["io.husk.vcpus", "io.husk.memory_mib"]
  privileged_without_host_devices = true
'''


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _target(tmp_path: Path, containerd_text: str | None = None, **sections: object) -> Target:
    config = dataclasses.replace(Config(), **sections)  # type: ignore[arg-type]
    path = tmp_path / "containerd.toml"
    cd, error = None, "not read"
    if containerd_text is not None:
        path.write_text(containerd_text)
        cd = check.read_containerd_config(path)
    return Target(config, str(tmp_path / "husk.toml"), path, cd, error)


def _hv(**kw: object) -> HypervisorConfig:
    return dataclasses.replace(HypervisorConfig(), **kw)  # type: ignore[arg-type]


# Section: commands


def test_run_command_missing_binary_is_named(tmp_path: Path) -> None:
    with pytest.raises(check.CommandError, match="cannot run .*nothing-here"):
        check.run_command([str(tmp_path / "nothing-here")])


def test_run_command_never_hangs_even_when_a_child_holds_the_pipe() -> None:
    start = time.monotonic()
    with pytest.raises(check.CommandError, match="did not finish within"):
        check.run_command(["sh", "-c", "sleep 30 & sleep 30"], timeout_s=0.3)
    assert time.monotonic() - start < 5


# Section: config and accelerator


def test_broken_config_fails_with_the_file_named(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "husk.toml"
    bad.write_text("[hypervisor]\nvcpu = 2\n")
    result, config = check.check_config(str(bad))
    assert result.status is Status.FAIL
    assert "unknown key 'vcpu'" in result.detail
    assert str(bad) in result.fix
    assert config == Config()  # the other checks go on with the defaults
    bad.write_text("[hypervisor\n")
    assert check.check_config(str(bad))[0].status is Status.FAIL


def test_valid_config_passes(tmp_path: Path) -> None:
    good = tmp_path / "husk.toml"
    good.write_text("[hypervisor]\nvcpus = 2\n")
    result, config = check.check_config(str(good))
    assert result.status is Status.PASS and str(good) in result.detail
    assert config.hypervisor.vcpus == 2


def test_tcg_is_a_warning_with_its_reason_and_cost(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_probe(qemu: str) -> AccelChoice:
        return AccelChoice(Accel.TCG, "KVM unusable: /dev/kvm does not exist")
    monkeypatch.setattr(check, "probe", fake_probe)
    result = check.check_accel(_target(tmp_path))
    assert result.status is Status.WARN
    assert "TCG: KVM unusable: /dev/kvm does not exist" in result.detail
    assert "~10x slower" in result.detail
    forced = check.check_accel(_target(tmp_path, hypervisor=_hv(accel="kvm")))
    assert forced.status is Status.FAIL and 'accel = "auto"' in forced.fix
    tcg = check.check_accel(_target(tmp_path, hypervisor=_hv(accel="tcg")))
    assert tcg.status is Status.WARN and "forced by config" in tcg.detail


def test_kvm_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_probe(qemu: str) -> AccelChoice:
        return AccelChoice(Accel.KVM, "KVM probe passed")
    monkeypatch.setattr(check, "probe", fake_probe)
    assert check.check_accel(_target(tmp_path)).status is Status.PASS


# Section: QEMU and virtiofsd


def test_missing_qemu_fails_naming_the_package_and_the_key(tmp_path: Path) -> None:
    target = _target(tmp_path, hypervisor=_hv(qemu_path=str(tmp_path / "no-qemu")))
    result = check.check_qemu(target)
    assert result.status is Status.FAIL
    assert "qemu-system-x86" in result.fix and "qemu_path" in result.fix
    assert target.config_file in result.fix
    assert check.check_qemu_rbd(target).status is Status.WARN


@pytest.mark.parametrize(("version", "machines", "status"), [
    ("7.2.22", "q35                  Standard PC", Status.PASS),
    ("8.2.0", "q35                  Standard PC", Status.PASS),
    ("6.2.0", "q35                  Standard PC", Status.WARN),
    ("7.2.22", "pc                   Standard PC", Status.FAIL),
])
def test_qemu_version_and_q35(tmp_path: Path, version: str, machines: str,
                              status: Status) -> None:
    qemu = _script(tmp_path / "qemu", f'[ "$1" = -version ] && echo "QEMU emulator version '
                                      f'{version}" && exit 0\necho "{machines}"\n')
    result = check.check_qemu(_target(tmp_path, hypervisor=_hv(qemu_path=str(qemu))))
    assert result.status is status, result


@pytest.mark.parametrize(("stderr", "status"), [
    ("qemu: -blockdev driver=rbd,node-name=husk-check: Parameter 'pool' is missing", Status.PASS),
    ("qemu: -blockdev driver=rbd: Unknown driver 'rbd'", Status.WARN),
])
def test_qemu_rbd_driver(tmp_path: Path, stderr: str, status: Status) -> None:
    qemu = _script(tmp_path / "qemu", f'echo "{stderr}" >&2\nexit 1\n')
    result = check.check_qemu_rbd(_target(tmp_path, hypervisor=_hv(qemu_path=str(qemu))))
    assert result.status is status
    if status is Status.WARN:
        assert "qemu-block-extra" in result.fix


def test_virtiofsd(tmp_path: Path) -> None:
    missing = dataclasses.replace(Config().shared_fs, virtiofsd_path=str(tmp_path / "none"))
    result = check.check_virtiofsd(_target(tmp_path, shared_fs=missing))
    assert result.status is Status.FAIL and "virtiofsd_path" in result.fix
    nine_p = dataclasses.replace(missing, type="9p")
    assert check.check_virtiofsd(_target(tmp_path, shared_fs=nine_p)).status is Status.PASS
    fake = _script(tmp_path / "virtiofsd", 'echo "virtiofsd version 7.2.22"\n')
    ok = dataclasses.replace(missing, virtiofsd_path=str(fake))
    result = check.check_virtiofsd(_target(tmp_path, shared_fs=ok))
    assert result.status is Status.PASS and "7.2.22" in result.detail


# Section: devices


@pytest.mark.parametrize("section", ["agent", "network"])
@pytest.mark.parametrize(("mode", "available", "status"), [
    ("auto", True, Status.PASS), ("auto", False, Status.WARN),
    ("on", False, Status.FAIL), ("off", False, Status.PASS),
])
def test_vhost_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, mode: str,
                       available: bool, status: Status) -> None:
    monkeypatch.setattr(check, "vhost_vsock_available", lambda: available)
    monkeypatch.setattr(check, "vhost_net_available", lambda: available)
    if section == "agent":
        key, value = "transport", {"on": "vsock", "off": "serial"}.get(mode, mode)
        run, module = check.check_vhost_vsock, "vhost_vsock"
    else:
        key, value, run, module = "vhost_net", mode, check.check_vhost_net, "vhost_net"
    changed = dataclasses.replace(getattr(Config(), section), **{key: value})
    result = run(_target(tmp_path, **{section: changed}))
    assert result.status is status, result
    if status is not Status.PASS:
        assert f"modprobe {module}" in result.fix
    if status is Status.FAIL:
        assert "'auto'" in result.fix


def test_without_vhost_vsock_the_agent_uses_virtio_serial(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "vhost_vsock_available", lambda: False)
    assert "virtio-serial" in check.check_vhost_vsock(_target(tmp_path)).detail


def test_ksm_is_reported_with_its_trade_never_failed(tmp_path: Path) -> None:
    ksm = tmp_path / "ksm"
    missing = check.check_ksm(_target(tmp_path), ksm)
    assert missing.status is Status.PASS and "not in this kernel" in missing.detail
    ksm.mkdir()
    (ksm / "run").write_text("0\n")
    off = check.check_ksm(_target(tmp_path), ksm)
    assert off.status is Status.PASS and off.detail.startswith("off")
    assert off.fix.startswith(f"echo 1 > {ksm / 'run'}") and "side channel" in off.fix
    (ksm / "run").write_text("1\n")
    on = check.check_ksm(_target(tmp_path), ksm)
    assert on.detail.startswith("on") and on.fix == ""


def test_tun(tmp_path: Path) -> None:
    device = tmp_path / "tun"
    result = check.check_tun(_target(tmp_path), str(device))
    assert result.status is Status.FAIL and result.fix == "modprobe tun"
    device.write_bytes(b"")
    assert check.check_tun(_target(tmp_path), str(device)).status is Status.PASS
    none = dataclasses.replace(Config().network, model="none")
    assert check.check_tun(_target(tmp_path, network=none), str(tmp_path / "x")).status \
        is Status.PASS


@pytest.mark.parametrize(("files", "layout", "status"), [
    (["cgroup.controllers"], "v2", Status.PASS),
    (["memory/tasks", "unified/cgroup.controllers"], "hybrid", Status.PASS),
    (["memory/tasks"], "v1", Status.PASS),
    ([], "none", Status.WARN),
])
def test_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: list[str],
                 layout: str, status: Status) -> None:
    root = tmp_path / "cgroup"
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    monkeypatch.setattr(host, "CGROUP_ROOT", root)
    assert host.cgroup_layout() == layout
    result = check.check_cgroups(_target(tmp_path, HUSK_V2))
    assert result.status is status
    if status is Status.PASS:
        assert "driver systemd" in result.detail


# Section: guest image


def _guest(tmp_path: Path, manifest: str | None, **hv: object) -> Target:
    guest = tmp_path / "guest"
    guest.mkdir()
    for name in ("vmlinux", "initrd.img", "rootfs.img"):
        (guest / name).write_bytes(b"x")
    os.truncate(guest / "rootfs.img", PMEM_ALIGN_BYTES)  # padded as build.sh does (a hole)
    if manifest is not None:
        (guest / "manifest.txt").write_text(manifest)
    return _target(tmp_path, hypervisor=_hv(guest_dir=str(guest), **hv))


def _installed_sources() -> str:
    dirs = imageid.installed_package_dirs()
    assert dirs is not None
    return imageid.sources_hash(dirs)


def test_guest_image_of_this_husk_passes(tmp_path: Path) -> None:
    manifest = (f"# husk guest image manifest\nhusk: {__version__}\n"
                f"agent-sources: {_installed_sources()}\nkernel: linux-image-x 6.1\n"
                "kernel-patches: virtio-fs-dma-api \n")
    result = check.check_guest_image(_guest(tmp_path, manifest))
    assert result.status is Status.PASS, result
    assert "linux-image-x 6.1" in result.detail


@pytest.mark.parametrize("root_device", ["pmem", "virtio-blk"])
def test_an_unpadded_image_is_a_warning_for_a_pmem_root(tmp_path: Path, root_device: str) -> None:
    manifest = (f"husk: {__version__}\nagent-sources: {_installed_sources()}\n"
                "kernel: linux-image-x 6.1\nkernel-patches: virtio-fs-dma-api\n")
    target = _guest(tmp_path, manifest, root_device=root_device)
    os.truncate(Path(target.config.hypervisor.guest_dir) / "rootfs.img", PMEM_ALIGN_BYTES + 4096)
    result = check.check_guest_image(target)
    if root_device == "pmem":
        assert result.status is Status.WARN and "virtio-blk" in result.detail, result
        assert "make guest-image" in result.fix
    else:
        assert result.status is Status.PASS, result


@pytest.mark.parametrize("guest_ram", ["split", "shared"])
def test_split_guest_ram_needs_the_guest_kernels_virtio_fs_patch(tmp_path: Path,
                                                                 guest_ram: str) -> None:
    manifest = (f"husk: {__version__}\nagent-sources: {_installed_sources()}\n"
                "kernel: linux-image-x 6.1\n")  # an image built before the patch
    result = check.check_guest_image(_guest(tmp_path, manifest, guest_ram=guest_ram))
    if guest_ram == "split":
        assert result.status is Status.FAIL, result
        assert "virtio-fs-dma-api" in result.detail and 'guest_ram = "shared"' in result.fix
    else:
        assert result.status is Status.PASS, result


@pytest.mark.parametrize(("manifest", "words"), [
    ("husk: 0.0.1\nagent-sources: {sources}\n", "built for husk 0.0.1"),
    (f"husk: {__version__}\nagent-sources: 0123456789abcdef\n", "is not this husk's"),
    ("kernel: linux-image-x 6.1\ninputs: abc\n", "does not record the husk version"),
])
def test_guest_image_of_another_husk_fails_with_make_guest_image(
        tmp_path: Path, manifest: str, words: str) -> None:
    result = check.check_guest_image(
        _guest(tmp_path, manifest.format(sources=_installed_sources())))
    assert result.status is Status.FAIL
    assert words in result.detail
    assert "make guest-image" in result.fix


def test_guest_image_missing_files_or_manifest(tmp_path: Path) -> None:
    target = _guest(tmp_path, None)
    assert check.check_guest_image(target).status is Status.WARN
    (Path(target.config.hypervisor.guest_dir) / "vmlinux").unlink()
    result = check.check_guest_image(target)
    assert result.status is Status.FAIL and "vmlinux" in result.detail
    assert "guest_dir" in result.fix


# Section: containerd


def test_containerd_config_v2_with_handler_and_annotations(tmp_path: Path) -> None:
    target = _target(tmp_path, HUSK_V2)
    assert target.containerd is not None and target.containerd.cgroup_driver == "systemd"
    result = check.check_containerd_config(target)
    assert result.status is Status.PASS, result
    assert "'husk'" in result.detail


def test_containerd_config_v3(tmp_path: Path) -> None:
    result = check.check_containerd_config(_target(tmp_path, HUSK_V3))
    assert result.status is Status.PASS, result
    assert "version 3" in result.detail and "'kata-like'" in result.detail


def test_containerd_config_of_another_version_is_not_read_for_handlers(tmp_path: Path) -> None:
    # A version 3 file with the handler under version 2's plugin name registers nothing.
    text = HUSK_V2.replace("version = 2", "version = 3")
    assert check.check_containerd_config(_target(tmp_path, text)).status is Status.FAIL


def test_containerd_config_without_the_handler_fails(tmp_path: Path) -> None:
    text = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\nbin_dir = "/usr/lib/cni"\n'
    result = check.check_containerd_config(_target(tmp_path, text))
    assert result.status is Status.FAIL
    assert "io.containerd.husk.v2" in result.detail
    assert "configs/containerd-husk.toml" in result.fix


def test_containerd_config_without_annotations_warns(tmp_path: Path) -> None:
    text = HUSK_V2.replace('  pod_annotations = ["io.husk.*"]\n', "")
    result = check.check_containerd_config(_target(tmp_path, text))
    assert result.status is Status.WARN
    assert "io.husk.memory_mib" in result.detail and "io.husk.vcpus" in result.detail
    assert 'pod_annotations = ["io.husk.*"]' in result.fix
    partial = HUSK_V3.replace('"io.husk.vcpus", ', "")
    result = check.check_containerd_config(_target(tmp_path, partial))
    assert result.status is Status.WARN and "io.husk.vcpus" in result.detail
    assert "io.husk.memory_mib" not in result.detail


def test_containerd_config_with_a_missing_husk_config_fails(tmp_path: Path) -> None:
    text = HUSK_V2 + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]\n'
                      f'ConfigPath = "{tmp_path}/nope.toml"\n')
    result = check.check_containerd_config(_target(tmp_path, text))
    assert result.status is Status.FAIL and "nope.toml" in result.detail


def test_containerd_config_imports_are_merged(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "husk.toml").write_text(HUSK_V2)
    main = 'version = 2\nimports = ["conf.d/*.toml"]\n'
    result = check.check_containerd_config(_target(tmp_path, main))
    assert result.status is Status.PASS, result


def test_containerd_config_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(check.ContainerdConfigError, match="does not exist"):
        check.read_containerd_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("version = \n")
    with pytest.raises(check.ContainerdConfigError, match="not valid TOML"):
        check.read_containerd_config(tmp_path / "bad.toml")
    result = check.check_containerd_config(_target(tmp_path))
    assert result.status is Status.FAIL and "restart containerd" in result.fix


def _fake_containerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(bin_dir / "containerd", f'echo "{line}"\n')
    monkeypatch.setenv("PATH", str(bin_dir))


def test_containerd_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_containerd(tmp_path, monkeypatch, "containerd github.com/containerd/containerd/v2 "
                                            "v2.3.4 abcdef")
    result = check.check_containerd(_target(tmp_path, HUSK_V3))
    assert result.status is Status.PASS and "2.3.4" in result.detail
    _fake_containerd(tmp_path, monkeypatch, "containerd github.com/containerd/containerd "
                                            "1.6.20~ds1 1.6.20~ds1-1")
    result = check.check_containerd(_target(tmp_path, HUSK_V3))
    assert result.status is Status.FAIL and "version 3" in result.detail
    assert check.check_containerd(_target(tmp_path, HUSK_V2)).status is Status.PASS
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = check.check_containerd(_target(tmp_path, HUSK_V2))
    assert result.status is Status.FAIL and "apt-get install containerd" in result.fix


def test_shim_binary_on_containerd_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(check, "SYSTEMD_DEFAULT_PATH", str(system))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("sys.argv", [str(tmp_path / "husk")])
    assert check.check_shim_binary(_target(tmp_path)).status is Status.FAIL
    venv = tmp_path / "venv"
    venv.mkdir()
    _script(venv / check.SHIM_BINARY, "")
    monkeypatch.setenv("PATH", str(venv))
    result = check.check_shim_binary(_target(tmp_path))
    assert result.status is Status.WARN and f"ln -s {venv}" in result.fix
    _script(system / check.SHIM_BINARY, "")
    assert check.check_shim_binary(_target(tmp_path)).status is Status.PASS


# Section: the report


def test_report_fails_on_any_failure_and_renders_fixes() -> None:
    ok = check.CheckResult("a", Status.PASS, "fine")
    warn = check.CheckResult("b", Status.WARN, "slow", "do x")
    fail = check.CheckResult("c", Status.FAIL, "broken", "do y")
    assert Report((ok, warn)).ok
    report = Report((ok, warn, fail))
    assert not report.ok
    text = report.render()
    assert "FAIL  c" in text and "fix: do y" in text and "pods cannot run" in text
    assert report.as_dict()["checks"][2] == {"name": "c", "status": "fail", "detail": "broken",
                                             "fix": "do y"}


def test_run_checks_with_a_broken_config_fails(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async def fake_probe(qemu: str) -> AccelChoice:
        return AccelChoice(Accel.TCG, "KVM unusable: test")
    monkeypatch.setattr(check, "probe", fake_probe)
    bad = tmp_path / "husk.toml"
    bad.write_text("not toml [\n")
    report = check.run_checks(str(bad), tmp_path / "containerd.toml")
    assert not report.ok
    assert report.results[0].status is Status.FAIL and str(bad) in report.results[0].fix
    # The other checks still ran, on the built-in defaults.
    assert [r.name for r in report.results] == [
        "config", "accelerator", "qemu", "qemu-rbd", "virtiofsd", "vhost-vsock", "vhost-net",
        "tun", "ksm", "cgroups", "guest-image", "containerd", "containerd-config", "shim"]


# Section: the image's identity


def test_sources_hash_covers_python_sources_only(tmp_path: Path) -> None:
    agent, proto = tmp_path / "agent", tmp_path / "proto"
    (agent / "__pycache__").mkdir(parents=True)
    proto.mkdir()
    (agent / "a.py").write_text("x = 1\n")
    (proto / "p.py").write_text("y = 2\n")
    dirs = {"agent": agent, "proto": proto}
    first = imageid.sources_hash(dirs)
    (agent / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (proto / "agent.proto").write_text("syntax")
    assert imageid.sources_hash(dirs) == first
    (agent / "a.py").write_text("x = 2\n")
    assert imageid.sources_hash(dirs) != first
    lines = imageid.manifest_lines(tmp_path)
    assert lines == [f"husk: {__version__}", f"agent-sources: {imageid.sources_hash(dirs)}"]


def test_parse_manifest_reads_top_level_lines_only() -> None:
    ident = imageid.parse_manifest("# husk guest image manifest\nhusk: 1.2.3\n"
                                   "agent-sources: abc\nkernel: linux 6.1\n"
                                   "rootfs: ext4:\n  husk: not-this\ninputs: 99\n")
    assert ident == imageid.ImageIdentity("1.2.3", "abc", "linux 6.1", "99")


def test_split_ram_problem_names_the_patch_or_says_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.txt"
    assert imageid.split_ram_problem(manifest) == ""  # unreadable: nothing to add
    manifest.write_text("kernel: linux-source-6.1 6.1.192-3\nkernel-patches: other \n")
    assert "virtio-fs-dma-api" in imageid.split_ram_problem(manifest)
    manifest.write_text("kernel-patches: other virtio-fs-dma-api \n")
    assert imageid.split_ram_problem(manifest) == ""
