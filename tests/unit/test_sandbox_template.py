"""VM templates: which VM may use which template, stale ones, builds and their lock."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from shim.sandbox import template as tpl
from shim.sandbox.template import (TEMPLATE_FORMAT, TemplateError, TemplateId, TemplateStore,
                                   template_spec)
from shim.vm.accel import Accel, AccelChoice
from shim.vm.cmdline import AgentTransport, SharedFsType, VmPaths, VmSpec, build_cmdline


def _spec(tmp_path: Path, **kw: object) -> VmSpec:
    guest = tmp_path / "guest"
    guest.mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd.img", "rootfs.img"):
        if not (guest / name).exists():
            (guest / name).write_bytes(name.encode())
    base = dict(name="pod-a", paths=VmPaths(tmp_path / "run-a"), qemu_path="/bin/true",
                kernel=guest / "vmlinux", initrd=guest / "initrd.img", image=guest / "rootfs.img",
                vcpus=1, memory_mib=512, max_vcpus=4, max_memory_mib=2048,
                accel=AccelChoice(Accel.TCG, "test"), shared_fs=SharedFsType.VIRTIO_FS,
                shared_dir=tmp_path / "shared", transport=AgentTransport.SERIAL)
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_pods_of_one_shape_share_a_template_and_any_other_shape_gets_another(
        tmp_path: Path) -> None:
    one = TemplateId.of(_spec(tmp_path), "1.0")
    # Another pod: its own name, run directory, CID and fds.
    other_pod = _spec(tmp_path, name="pod-b", paths=VmPaths(tmp_path / "run-b"))
    assert TemplateId.of(other_pod, "1.0") == one
    for change in ({"memory_mib": 1024}, {"vcpus": 2}, {"max_memory_mib": 4096},
                   {"kernel_params": "mitigations=off"}, {"hotplug_ports": 8},
                   {"tcg_buffer_mib": 32},
                   {"transport": AgentTransport.VSOCK, "vsock_cid": 7, "vhost_fd": 9}):
        assert TemplateId.of(_spec(tmp_path, **change), "1.0").key != one.key, change
    assert TemplateId.of(_spec(tmp_path), "1.1").key != one.key  # another husk


def test_vsock_vms_share_a_template_whatever_their_cid(tmp_path: Path) -> None:
    ids = {TemplateId.of(_spec(tmp_path, transport=AgentTransport.VSOCK, vsock_cid=cid,
                                vhost_fd=fd, extra_fds=[fd]), "1.0").key
           for cid, fd in ((5, 11), (6, 12))}
    assert len(ids) == 1


def test_a_9p_vm_cannot_come_from_a_template(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="virtio-fs"):
        TemplateId.of(_spec(tmp_path, shared_fs=SharedFsType.NINE_P), "1.0")


def test_template_vms_have_no_pod_devices_and_a_restore_differs_only_in_waiting(
        tmp_path: Path) -> None:
    spec = _spec(tmp_path, kernel_params="quiet", split_ram=True)
    build = build_cmdline(template_spec(spec, incoming=False, ram_fd=7))
    restore = build_cmdline(template_spec(spec, incoming=True, ram_fd=7))
    assert "vhost-user-fs-pci" not in " ".join(build)
    # The shared node of guest RAM in the shim's memfd: it travels as a file, not in
    # the stream; the private node is QEMU's own (the stream carries it).
    assert ("memory-backend-file,mem-path=/proc/self/fd/7,id=ram-shared,size=32M,share=on"
            in build)
    assert "memory-backend-ram,id=ram-private,size=480M" in build
    # Unsplit, all of guest RAM is in the memfd (the stream carries only devices).
    unsplit = build_cmdline(template_spec(dataclasses.replace(spec, split_ram=False),
                                          incoming=False, ram_fd=7))
    assert ("memory-backend-file,mem-path=/proc/self/fd/7,id=ram-shared,size=512M,share=on"
            in unsplit) and "-numa" not in unsplit
    assert 7 in template_spec(spec, incoming=True, ram_fd=7).passed_fds()
    assert build[build.index("-append") + 1].endswith("quiet husk.template=1")
    assert "-incoming" in restore
    assert [a for a in restore if a not in ("-incoming", "defer")] == build


def _build(store: TemplateStore, tid: TemplateId, content: bytes = b"guest state") -> None:
    state = store.build_path(tid)
    state.write_bytes(content)
    (state.parent / tpl.RAM_FILE).write_bytes(b"guest memory")
    store.install(tid, state, 1.5)


def test_an_installed_template_is_found_with_its_record(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    tid = TemplateId.of(_spec(tmp_path), "1.0")
    assert store.find(tid) is None
    _build(store, tid)
    found = store.find(tid)
    assert found is not None and found.state.read_bytes() == b"guest state"
    meta = json.loads((found.dir / "meta.json").read_text())
    assert meta["inputs"] == tid.inputs and meta["state_bytes"] == len(b"guest state")
    assert (tmp_path / "templates").stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "templates").glob("*.building"))


def test_a_template_built_from_another_image_is_refused_and_removed(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    spec = _spec(tmp_path)
    _build(store, TemplateId.of(spec, "1.0"))
    # A new guest image in the same place: same command line, other file.
    image = spec.image
    image.write_bytes(b"a rebuilt root filesystem")
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    tid = TemplateId.of(spec, "1.0")
    assert tid.stale_inputs(json.loads(
        (store.root / tid.key / "meta.json").read_text())["inputs"]) == ["image"]
    assert store.find(tid) is None
    assert not (store.root / tid.key).exists()


def test_a_damaged_record_or_missing_state_means_no_template(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    tid = TemplateId.of(_spec(tmp_path), "1.0")
    _build(store, tid)
    (store.root / tid.key / "meta.json").write_text("{not json")
    assert store.find(tid) is None
    for part in ("state", "ram"):
        _build(store, tid)
        (store.root / tid.key / part).unlink()
        assert store.find(tid) is None


def test_a_failed_build_is_not_retried_for_a_while(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = TemplateStore(tmp_path / "templates")
    tid = TemplateId.of(_spec(tmp_path), "1.0")
    store.root.mkdir()
    store.record_failure(tid, "the agent did not answer")
    assert store.recently_failed(tid) == "the agent did not answer"
    monkeypatch.setattr(tpl, "RETRY_AFTER_S", -1.0)
    assert store.recently_failed(tid) is None
    _build(store, tid)  # a later success clears it
    monkeypatch.setattr(tpl, "RETRY_AFTER_S", 600.0)
    assert store.recently_failed(tid) is None


def test_one_build_at_a_time_and_a_bounded_wait(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    tid = TemplateId.of(_spec(tmp_path), "1.0")

    async def scenario() -> list[str]:
        order: list[str] = []

        async def builder(name: str) -> None:
            async with store.locked(tid):
                order.append(f"{name} in")
                await asyncio.sleep(0.2)
                order.append(f"{name} out")

        await asyncio.gather(builder("a"), builder("b"))
        async with store.locked(tid):
            with pytest.raises(TemplateError, match="being built by another shim"):
                async with store.locked(tid, timeout_s=0.2):
                    pass
        return order

    order = asyncio.run(scenario())
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_kvm_templates_depend_on_the_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path, accel=AccelChoice(Accel.KVM, "test"))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: CPU A\nflags\t\t: fpu vme\n")
    monkeypatch.setattr(tpl, "CPUINFO", cpuinfo)
    before = TemplateId.of(spec, "1.0")
    cpuinfo.write_text("model name\t: CPU B\nflags\t\t: fpu vme avx\n")
    after = TemplateId.of(spec, "1.0")
    assert before.key == after.key and after.stale_inputs(before.inputs) == ["host_cpu"]
    assert "host_cpu" not in TemplateId.of(dataclasses.replace(
        spec, accel=AccelChoice(Accel.TCG, "test")), "1.0").inputs


def test_a_failed_build_leaves_no_partial_files(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    tid = TemplateId.of(_spec(tmp_path), "1.0")
    state = store.build_path(tid)
    state.write_bytes(b"half a stream")
    store.abandon(tid)
    assert list(store.root.iterdir()) == []
    assert store.find(tid) is None


def test_prune_removes_templates_unused_for_long_and_keeps_the_rest(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    now = time.time()
    day = 86400.0

    def entry(name: str, age_s: float, directory: bool = True) -> Path:
        path = tmp_path / name
        if directory:
            path.mkdir()
            (path / "ram").write_bytes(b"x")
        else:
            path.write_text("reason")
        os.utime(path, (now - age_s, now - age_s))
        return path

    current = TemplateId("k" * 24, {})
    kept = [entry("k" * 24, 30 * day),                   # the one just built: always kept
            entry("a" * 24, 1 * day),                    # used yesterday
            entry(f"{'b' * 24}.lock", 30 * day, False),  # locks stay (another shim may hold one)
            entry(f"{'c' * 24}.building", 30 * day),     # a build in progress
            entry(f"{'d' * 24}.failed", 60, False)]      # a recent failure still holds off retries
    gone = [entry("e" * 24, 8 * day), entry(f"{'f' * 24}.failed", 2 * day, False)]
    assert store.prune(current, 7 * day) == ["e" * 24]
    assert all(p.exists() for p in kept)
    assert not any(p.exists() for p in gone)


def test_find_marks_a_template_used(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    tid = TemplateId("k" * 24, {"qemu": "q"})
    directory = tmp_path / tid.key
    directory.mkdir()
    for name in ("state", "ram"):
        (directory / name).write_bytes(b"x")
    (directory / "meta.json").write_text(json.dumps({"format": TEMPLATE_FORMAT,
                                                     "inputs": tid.inputs}))
    os.utime(directory, (1, 1))
    assert store.find(tid) is not None
    assert time.time() - directory.stat().st_mtime < 60
    assert store.prune(TemplateId("x" * 24, {}), 3600) == []
