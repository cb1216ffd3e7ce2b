"""What a guest image was built from: the husk version and its agent's sources.

guest-image/build.sh runs this module (``python3 -m shim.ops.imageid DIR``, with
the checkout on PYTHONPATH) on the agent and proto packages it packed, and writes
its output into the image's manifest.txt; ``husk check`` computes the same hash
over the agent and proto packages installed beside it and compares. Standard
library only: the build runs it under the build host's python3.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from shim import __version__

# The packages the guest runs (proto/gen holds the agent's generated messages).
AGENT_PACKAGES = ("agent", "proto")
MANIFEST_NAME = "manifest.txt"
HUSK_KEY = "husk"
SOURCES_KEY = "agent-sources"
KERNEL_KEY = "kernel"
KERNEL_PATCHES_KEY = "kernel-patches"
# What guest_ram = "split" needs of the guest kernel (guest-image/kernel-patches/).
VIRTIO_FS_DMA_PATCH = "virtio-fs-dma-api"
INPUTS_KEY = "inputs"
# Hex digits kept of the sha256: plenty to tell two source trees apart.
HASH_CHARS = 16


def sources_hash(package_dirs: dict[str, Path]) -> str:
    """sha256 over the relative names and contents of the packages' .py files.

    Only .py files: an installed wheel may lack the .proto and .pyi files a
    checkout has, and they do not change what the guest runs.
    """
    digest = hashlib.sha256()
    for name in sorted(package_dirs):
        top = package_dirs[name]
        files = sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)
        for path in files:
            digest.update(f"{name}/{path.relative_to(top).as_posix()}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:HASH_CHARS]


def installed_package_dirs() -> dict[str, Path] | None:
    """Where this husk's agent and proto packages are, or None if one is missing."""
    dirs: dict[str, Path] = {}
    for name in AGENT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return None
        dirs[name] = Path(list(spec.submodule_search_locations)[0])
    return dirs


def manifest_lines(root: Path) -> list[str]:
    """The manifest's identity lines for the packages packed below ``root``."""
    digest = sources_hash({name: root / name for name in AGENT_PACKAGES})
    return [f"{HUSK_KEY}: {__version__}", f"{SOURCES_KEY}: {digest}"]


@dataclass(frozen=True)
class ImageIdentity:
    """The top-level ``key: value`` lines of a manifest ("" where absent)."""

    husk_version: str = ""
    agent_sources: str = ""
    kernel: str = ""
    inputs: str = ""
    kernel_patches: tuple[str, ...] = ()


def parse_manifest(text: str) -> ImageIdentity:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith((" ", "#")) or ": " not in line:
            continue  # indented lines list packages and modules
        key, _, value = line.partition(": ")
        values.setdefault(key, value.strip())
    return ImageIdentity(values.get(HUSK_KEY, ""), values.get(SOURCES_KEY, ""),
                         values.get(KERNEL_KEY, ""), values.get(INPUTS_KEY, ""),
                         tuple(values.get(KERNEL_PATCHES_KEY, "").split()))


def split_ram_problem(manifest: Path) -> str:
    """Why the guest image beside ``manifest`` cannot run split guest RAM ("" if it can,
    or if its manifest cannot be read: nothing to say then)."""
    try:
        ident = parse_manifest(manifest.read_text())
    except (OSError, UnicodeDecodeError):
        return ""
    if VIRTIO_FS_DMA_PATCH in ident.kernel_patches:
        return ""
    return (f"the guest kernel in {manifest.parent} lacks husk's {VIRTIO_FS_DMA_PATCH} patch, "
            'which [hypervisor] guest_ram = "split" needs: rebuild the guest image '
            '(make guest-image) or set guest_ram = "shared"')


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m shim.ops.imageid DIR  (DIR holds agent/ and proto/)",
              file=sys.stderr)
        return 2
    print("\n".join(manifest_lines(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
