"""Unit tests for the guest image build helpers (guest-image/imagetool.py)
and a syntax check of the image's shell scripts. Booting the image is
guest-image/boottest.py's job, not this file's."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GUEST_IMAGE_DIR = Path(__file__).resolve().parents[2] / "guest-image"


def _load_imagetool():
    spec = importlib.util.spec_from_file_location("imagetool", GUEST_IMAGE_DIR / "imagetool.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["imagetool"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


imagetool = _load_imagetool()


# Section: apt mirrors

DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://thirdparty.example/node
Suites: nodistro
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def test_deb822_sources_yield_debian_suites_only(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(DEB822)
    (tmp_path / "other.list").write_text("deb https://vendor.example/apt cloud-sdk-bookworm main\n")
    sources = imagetool.host_sources(tmp_path, tmp_path / "absent.list")
    assert imagetool.debian_mirror_lines(sources, "bookworm") == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://security.example/debian-security bookworm-security main",
    ]


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    listing = tmp_path / "sources.list"
    listing.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main non-free\n"
        "deb-src http://mirror.example/debian bookworm main\n")
    sources = imagetool.host_sources(tmp_path / "no-such-dir", listing)
    assert imagetool.debian_mirror_lines(sources, "bookworm") == [
        "deb http://mirror.example/debian bookworm main"]


def test_missing_release_suite_is_an_error() -> None:
    sources = imagetool.parse_deb822(DEB822)
    with pytest.raises(imagetool.ImageToolError, match="bullseye"):
        imagetool.debian_mirror_lines(sources, "bullseye")


# Section: pins

LOCK = """\
# comment
grpcio==1.85.1
protobuf == 6.33.6  # trailing comment
Typing_Extensions==4.12.2
psutil>=7
"""


def test_pins_are_read_exactly() -> None:
    assert imagetool.read_pins(LOCK, ["grpcio", "protobuf", "typing-extensions"]) == [
        "grpcio==1.85.1", "protobuf==6.33.6", "Typing_Extensions==4.12.2"]


def test_unpinned_or_missing_package_is_an_error() -> None:
    with pytest.raises(imagetool.ImageToolError, match="psutil, absent"):
        imagetool.read_pins(LOCK, ["grpcio", "psutil", "absent"])


# Section: kernel modules

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/crc16.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/crypto/crc32c_generic.ko.gz:
"""
SOFTDEP = "softdep ext4 pre: crypto-crc32c post: nothing\nsoftdep jbd2 pre: crypto-crc32c\n"
ALIAS = ("alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\n"
         "alias pci:v00001AF4d* virtio_pci\n")
BUILTIN = "kernel/fs/squashfs/squashfs.ko\n"


def _index():
    index = imagetool.ModuleIndex()
    index.parse_dep(MODULES_DEP)
    index.parse_softdep(SOFTDEP)
    index.parse_alias(ALIAS)
    index.parse_builtin(BUILTIN)
    return index


def test_dependencies_load_first_and_softdeps_are_optional() -> None:
    steps, builtin = imagetool.resolve_modules(_index(), ["virtio_blk", "virtio_pci", "ext4", "squashfs"])
    names = [s.name for s in steps]
    assert names == ["virtio_ring", "virtio", "virtio_blk", "virtio_pci",
                     "crc32c_intel", "crc32c_generic", "jbd2", "crc16", "ext4"]
    index = _index()
    for pos, name in enumerate(names):
        assert set(index.deps[name]) <= set(names[:pos]), f"{name} loads before its dependencies"
    assert {s.name for s in steps if s.optional} == {"crc32c_intel", "crc32c_generic"}
    assert builtin == ["squashfs"]
    # Paths point at the uncompressed copies the initramfs carries.
    assert steps[2].path == "kernel/drivers/block/virtio_blk.ko"
    assert steps[5].path == "kernel/crypto/crc32c_generic.ko"


def test_optional_module_becomes_required_when_asked_for() -> None:
    steps, _ = imagetool.resolve_modules(_index(), ["ext4", "crc32c_generic"])
    by_name = {s.name: s for s in steps}
    assert by_name["crc32c_generic"].optional is False
    assert by_name["crc32c_intel"].optional is True
    assert [s.name for s in steps].count("crc32c_generic") == 1


def test_dashes_and_underscores_name_the_same_module() -> None:
    steps, _ = imagetool.resolve_modules(_index(), ["crc32c-intel"])
    assert [s.name for s in steps] == ["crc32c_intel"]


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(imagetool.ImageToolError, match="no_such_mod"):
        imagetool.resolve_modules(_index(), ["no_such_mod"])


def test_install_modules_decompresses_and_writes_the_load_list(tmp_path: Path) -> None:
    kdir = tmp_path / "lib/modules/6.1.0-99-amd64"
    for rel in ("kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"):
        (kdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (kdir / rel).write_bytes(b"\x7fELF plain " + rel.encode())
    blk = kdir / "kernel/drivers/block/virtio_blk.ko.xz"
    blk.parent.mkdir(parents=True)
    blk.write_bytes(lzma.compress(b"\x7fELF virtio_blk"))
    (kdir / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n")
    dest = tmp_path / "initrd"

    imagetool.install_modules(kdir, ["virtio_blk"], dest)

    guest = "/lib/modules/6.1.0-99-amd64"
    assert (dest / "etc/husk/modules.load").read_text().splitlines() == [
        f"{guest}/kernel/drivers/virtio/virtio_ring.ko required",
        f"{guest}/kernel/drivers/virtio/virtio.ko required",
        f"{guest}/kernel/drivers/block/virtio_blk.ko required",
    ]
    assert (dest / guest.lstrip("/") / "kernel/drivers/block/virtio_blk.ko").read_bytes() == b"\x7fELF virtio_blk"


def test_missing_modules_dep_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(imagetool.ImageToolError, match="depmod"):
        imagetool.ModuleIndex.load(tmp_path)


# Section: kernel image

FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 64


def test_extract_vmlinux_from_xz_payload() -> None:
    # A decoy xz magic that does not start a valid stream comes first.
    bzimage = b"MZ setup code \xfd7zXZ\x00 junk" + lzma.compress(FAKE_ELF) + b"\x00trailer"
    assert imagetool.extract_vmlinux(bzimage) == FAKE_ELF


def test_extract_vmlinux_from_gzip_payload() -> None:
    bzimage = b"MZ setup" + gzip.compress(FAKE_ELF) + b"trailer"
    assert imagetool.extract_vmlinux(bzimage) == FAKE_ELF


def test_extract_vmlinux_without_payload_is_an_error() -> None:
    with pytest.raises(imagetool.ImageToolError, match="no xz"):
        imagetool.extract_vmlinux(b"MZ nothing compressed here" + lzma.compress(b"not an ELF"))


# Section: input hashing


def test_tree_hash_follows_content_names_and_exec_bits(tmp_path: Path) -> None:
    (tmp_path / "agent/__pycache__").mkdir(parents=True)
    (tmp_path / "agent/__main__.py").write_text("print('hi')\n")
    base = imagetool.tree_hash([tmp_path / "agent"], tmp_path)

    (tmp_path / "agent/__pycache__/__main__.cpython-311.pyc").write_bytes(b"bytecode")
    assert imagetool.tree_hash([tmp_path / "agent"], tmp_path) == base, "__pycache__ must not count"

    (tmp_path / "agent/__main__.py").write_text("print('bye')\n")
    changed = imagetool.tree_hash([tmp_path / "agent"], tmp_path)
    assert changed != base

    (tmp_path / "agent/__main__.py").chmod(0o755)
    assert imagetool.tree_hash([tmp_path / "agent"], tmp_path) != changed

    (tmp_path / "agent/__main__.py").rename(tmp_path / "agent/main.py")
    assert imagetool.tree_hash([tmp_path / "agent"], tmp_path) not in (base, changed)


def test_tree_hash_notes_missing_inputs(tmp_path: Path) -> None:
    (tmp_path / "proto").mkdir()
    with_missing = imagetool.tree_hash([tmp_path / "proto", tmp_path / "agent"], tmp_path)
    (tmp_path / "agent").mkdir()
    assert imagetool.tree_hash([tmp_path / "proto", tmp_path / "agent"], tmp_path) != with_missing


# Section: shell scripts


@pytest.mark.parametrize("script, shell", [
    ("build.sh", ["bash"]),
    ("initramfs-init.sh", ["busybox", "sh"]),  # the initramfs runs busybox ash
    ("rootfs-init.sh", ["sh"]),                 # the guest's /bin/sh is dash
    ("selftest.sh", ["sh"]),
])
def test_shell_scripts_parse(script: str, shell: list[str]) -> None:
    path = GUEST_IMAGE_DIR / script
    if shutil.which(shell[0]) is None:
        pytest.skip(f"{shell[0]} is not installed")
    proc = subprocess.run([*shell, "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_mode & 0o111, f"{script} must be executable"


def test_module_list_names_the_required_drivers() -> None:
    wanted = set(imagetool.read_list((GUEST_IMAGE_DIR / "modules.txt").read_text()))
    required = {"virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "vsock",
                "vmw_vsock_virtio_transport", "virtiofs", "9p", "9pnet_virtio", "overlay",
                "ext4", "squashfs", "loop"}
    assert required <= wanted


def test_kernel_pin_is_one_exact_package() -> None:
    lines = imagetool.read_list((GUEST_IMAGE_DIR / "kernel.pin").read_text())
    assert len(lines) == 1
    package, version = lines[0].split()
    assert package.startswith("linux-source-")  # built with kernel.config
    assert version[0].isdigit()


# Section: kernel configuration

def test_kconfig_reports_options_olddefconfig_dropped() -> None:
    fragment = ("# comment\nCONFIG_VIRTIO_FS=y\nCONFIG_VIRTIO_BALLOON=m\nCONFIG_DRM=n\n"
                'CONFIG_LSM="lockdown,yama"\nCONFIG_BTF=n\nCONFIG_FUSE_FS=y\n')
    config = ("CONFIG_VIRTIO_FS=y\nCONFIG_VIRTIO_BALLOON=y\n# CONFIG_DRM is not set\n"
              'CONFIG_LSM="lockdown,yama"\n')
    assert imagetool.kconfig_mismatches(fragment, config) == [
        "CONFIG_VIRTIO_BALLOON=m (got y)", "CONFIG_FUSE_FS=y (got n)"]


def test_the_guest_kernel_config_keeps_what_the_guest_relies_on() -> None:
    """Options whose loss would break a pod in ways a boot alone does not show."""
    asked = imagetool.kconfig_values((GUEST_IMAGE_DIR / "kernel.config").read_text())
    for name in ("CONFIG_PVH", "CONFIG_VIRTIO_FS", "CONFIG_HOTPLUG_PCI_PCIE",
                 "CONFIG_ACPI_HOTPLUG_MEMORY", "CONFIG_HOTPLUG_CPU", "CONFIG_PAGE_REPORTING",
                 "CONFIG_SECURITY_LOCKDOWN_LSM", "CONFIG_MODULE_SIG", "CONFIG_SECCOMP_FILTER",
                 "CONFIG_CGROUP_BPF", "CONFIG_MEMCG", "CONFIG_USER_NS", "CONFIG_OVERLAY_FS",
                 "CONFIG_VIRTIO_PMEM", "CONFIG_FS_DAX"):
        assert asked.get(name) == "y", name
    # Loaded on demand from the root filesystem, as modules.
    assert asked.get("CONFIG_VIRTIO_BALLOON") == "m"
    assert asked.get("CONFIG_DEBUG_INFO_BTF") == "n" and asked.get("CONFIG_UNWINDER_ORC") == "n"
