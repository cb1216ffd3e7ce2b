"""VM templates with real VMs: built once, restored as distinct guests, rebuilt when
the guest image changes, and a damaged one falls back to a cold boot; with guest RAM
split into NUMA nodes, virtiofsd maps only the shared one.

A template directory and a copy of the guest image of this module's own, so
that changing the image touches nobody else's templates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shim.config import Config, load_config
from shim.sandbox.description import PodDescription
from shim.sandbox.sandbox import Sandbox
from shim.vm.cmdline import SHARED_RAM_MIB
from tests.conftest import GUEST_DIR, mounts_below, our_processes, write_test_config
from tests.guest import run
from tests.rootfs import make_busybox_rootfs

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(600)]

GUEST_FILES = ("vmlinux", "initrd.img", "rootfs.img")


@pytest.fixture(scope="module")
def setup(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, Path]]:
    work = tmp_path_factory.mktemp("templates")
    guest = work / "guest"
    guest.mkdir()
    for name in GUEST_FILES:
        shutil.copy2(GUEST_DIR / name, guest / name)
    templates = work / "templates"
    state = Path("/run") / f"husk-test-{secrets.token_hex(4)}"
    config = load_config(str(write_test_config(work / "husk.toml", state, templates_dir=templates,
                                               templates=True, guest_dir=str(guest))))
    assert config.hypervisor.guest_ram == "split"  # the default: templates carry it in two parts
    assert config.template.dir == str(templates) and config.template.enabled
    yield config, guest
    assert our_processes(str(state)) == [], "QEMU/virtiofsd left running"
    assert mounts_below(state) == [], "mounts left behind"
    shutil.rmtree(state, ignore_errors=True)


class Pod:
    def __init__(self, config: Config, name: str, rootfs: Path) -> None:
        self.box = Sandbox(PodDescription(f"{name}-{secrets.token_hex(3)}", hostname=name), config)
        self.box.test_rootfs = rootfs  # type: ignore[attr-defined]

    async def __aenter__(self) -> Sandbox:
        await self.box.start()
        return self.box

    async def __aexit__(self, *exc: object) -> None:
        await self.box.stop()
        assert not self.box.run_dir.exists()


async def _sh(box: Sandbox, script: str) -> str:
    status, out, err = await run(box, ["sh", "-c", script])
    assert status == 0, err
    return out


def _templates(config: Config) -> list[Path]:
    return sorted(p for p in Path(config.template.dir).iterdir() if (p / "meta.json").exists())


async def test_restored_guests_are_distinct_and_a_changed_image_is_rebuilt(
        setup: tuple[Config, Path], busybox_rootfs: Path) -> None:
    config, guest = setup
    # The first pod of its shape builds the template, then is restored from it.
    async with Pod(config, "first", busybox_rootfs) as first:
        assert first.times.template == "built"
        [template] = _templates(config)
        built = json.loads((template / "meta.json").read_text())
        async with Pod(config, "second", busybox_rootfs) as second:
            assert second.times.template == "restored"
            probe = "cat /proc/cmdline; head -c 32 /dev/urandom | od -An -tx1; date +%s"
            one, two = await _sh(first, probe), await _sh(second, probe)
            assert "husk.template=1" in one and "husk.template=1" in two
            assert one.splitlines()[1:-1] != two.splitlines()[1:-1], "same random bytes"
            # The template reported single free pages, so it held none of them; a
            # restored guest is back to the kernel's 2 MiB blocks once it is a pod's.
            order = "cat /sys/module/page_reporting/parameters/page_reporting_order"
            assert await _sh(second, order) == "9\n"
    # A new guest image in the same place: the template is stale, never used, rebuilt.
    with open(guest / "rootfs.img", "r+b") as image:
        image.seek(-4096, os.SEEK_END)  # in the padding past the filesystem, same size
        image.write(b"\1" * 4096)
    async with Pod(config, "third", busybox_rootfs) as third:
        assert third.times.template == "built"
        assert await _sh(third, "echo ok") == "ok\n"
    [template] = _templates(config)
    rebuilt = json.loads((template / "meta.json").read_text())
    assert rebuilt["inputs"]["image"] != built["inputs"]["image"]
    assert rebuilt["inputs"]["kernel"] == built["inputs"]["kernel"]


def _guest_ram_mapped_by(pid: int) -> int:
    """Bytes of memfd (guest RAM) mappings of ``pid`` and its children."""
    total = 0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and "memfd:" in fields[5]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                total += end - start
    return total


@pytest.mark.parametrize("layout", ["split", "shared"])
async def test_virtiofsd_maps_only_the_shared_node_and_virtio_fs_bounces_through_it(
        setup: tuple[Config, Path], tmp_path: Path, layout: str) -> None:
    """Split (the default), virtiofsd maps the 32 MiB node; "shared", all of guest RAM."""
    config, _ = setup
    if layout != config.hypervisor.guest_ram:  # its templates apart from the module's
        config = dataclasses.replace(
            config, hypervisor=dataclasses.replace(config.hypervisor, guest_ram=layout),
            template=dataclasses.replace(config.template, dir=str(tmp_path / "templates")))
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    async with Pod(config, "bounce", rootfs) as pod:
        assert pod.times.template in ("built", "restored")
        total_kib = int((await _sh(pod, "grep MemTotal /proc/meminfo")).split()[1])
        assert total_kib > 4 * SHARED_RAM_MIB << 10
        mapped = _guest_ram_mapped_by(pod.pids()["virtiofsd"])
        if layout == "split":
            assert 0 < mapped <= SHARED_RAM_MIB << 20, \
                f"virtiofsd maps {mapped >> 20} MiB of guest RAM"
        else:
            assert mapped > total_kib << 10, f"virtiofsd maps {mapped >> 20} MiB of guest RAM"
        # 24 MiB each way through virtio-fs: twelve times the guest's 2 MiB bounce pool,
        # and virtiofsd could not reach a buffer outside the shared node.
        data = secrets.token_bytes(24 << 20)
        (rootfs / "from-host").write_bytes(data)
        out = await _sh(pod, "sha256sum /from-host && cat /from-host > /from-guest && sync")
        assert out.split()[0] == hashlib.sha256(data).hexdigest()
        assert hashlib.sha256((rootfs / "from-guest").read_bytes()).digest() == \
            hashlib.sha256(data).digest()


async def test_a_damaged_template_is_discarded_and_the_pod_boots(
        setup: tuple[Config, Path], busybox_rootfs: Path) -> None:
    config, _ = setup
    async with Pod(config, "maker", busybox_rootfs):
        pass
    [template] = _templates(config)
    state = template / "state"
    with open(state, "r+b") as f:  # keep the header, garble the devices and memory
        f.seek(4096)
        f.write(secrets.token_bytes(1 << 20))
    async with Pod(config, "survivor", busybox_rootfs) as survivor:
        assert survivor.times.template == ""  # booted
        assert "husk.template=1" not in await _sh(survivor, "cat /proc/cmdline")
    assert not template.exists()
