"""Build-time helpers for guest-image/build.sh: the parts that are easier to
get right (and to unit-test) in Python than in shell.

Owns: picking the Debian mirrors out of the host's apt configuration,
reading exact pins from requirements.lock, resolving the initramfs kernel
modules (hard dependencies from modules.dep, soft "pre" dependencies from
modules.softdep) and copying them uncompressed, unpacking the ELF kernel
from a bzImage, and hashing input trees for the build cache. Standard library only: it runs under whatever
python3 the build host has.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# The Debian suites the guest root filesystem is built from, for a release.
SUITE_SUFFIXES = ("", "-updates", "-security")
DEFAULT_COMPONENT = "main"
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")

# Module file suffixes Debian kernels have used (bookworm ships plain .ko).
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# Directories skipped when hashing an input tree.
HASH_SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache"})
HASH_SKIP_SUFFIXES = (".pyc", ".pyo")


class ImageToolError(Exception):
    """A build input is missing or malformed; the message names it."""


# Section: apt mirrors


@dataclass(frozen=True)
class AptSource:
    """One 'deb' source: a URI with one suite and its components."""

    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self, component: str) -> str:
        return f"deb {self.uri} {self.suite} {component}"


def parse_deb822(text: str) -> list[AptSource]:
    """Parses a deb822 .sources file into one AptSource per (URI, suite)."""
    sources: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:  # continuation line
                fields[key] += " " + raw.strip()
                continue
            key, sep, value = raw.partition(":")
            if not sep:
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                sources.append(AptSource(uri.rstrip("/"), suite, components))
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """Parses classic one-line sources.list entries ('deb [opts] URI SUITE COMP...')."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Drop a '[ options ]' block, which may contain spaces.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        sources.append(AptSource(words[1].rstrip("/"), words[2], tuple(words[3:])))
    return sources


def host_sources(sources_dir: Path = APT_SOURCES_DIR,
                 sources_list: Path = APT_SOURCES_LIST) -> list[AptSource]:
    """Every 'deb' source the host's apt is configured with, in apt's order."""
    found: list[AptSource] = []
    if sources_list.is_file():
        found += parse_one_line(sources_list.read_text())
    if sources_dir.is_dir():
        for path in sorted(sources_dir.iterdir()):
            if path.suffix == ".sources":
                found += parse_deb822(path.read_text())
            elif path.suffix == ".list":
                found += parse_one_line(path.read_text())
    return found


def debian_mirror_lines(sources: list[AptSource], release: str,
                        component: str = DEFAULT_COMPONENT) -> list[str]:
    """The mmdebstrap mirror lines for `release` and its -updates/-security suites.

    Only sources whose suite is exactly one of those and that carry
    `component` are taken, so third-party repositories (other suite names)
    are ignored. Raises if the release suite itself has no source.
    """
    wanted = [release + suffix for suffix in SUITE_SUFFIXES]
    lines: list[str] = []
    for suite in wanted:
        for src in sources:
            if src.suite == suite and component in src.components:
                line = src.line(component)
                if line not in lines:
                    lines.append(line)
    if not any(f" {release} " in line for line in lines):
        raise ImageToolError(
            f"no apt source for Debian suite {release!r} with component {component!r} "
            f"in {APT_SOURCES_LIST} or {APT_SOURCES_DIR}/*.sources")
    return lines


# Section: pins


def read_pins(lock_text: str, names: list[str]) -> list[str]:
    """Returns 'name==version' for each of `names`, exactly as pinned in the lock file."""
    pins: dict[str, str] = {}
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([A-Za-z0-9_.+!\-]+)", line)
        if match:
            pins[_canonical(match.group(1))] = f"{match.group(1)}=={match.group(2)}"
    missing = [n for n in names if _canonical(n) not in pins]
    if missing:
        raise ImageToolError(f"requirements.lock has no exact '==' pin for: {', '.join(missing)}")
    return [pins[_canonical(n)] for n in names]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Section: kernel modules


def module_name(path: str) -> str:
    """'kernel/net/9p/9pnet_virtio.ko.xz' -> '9pnet_virtio' (dashes folded to underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass
class ModuleIndex:
    """What depmod wrote for one kernel: paths, hard deps, soft deps, aliases, built-ins."""

    paths: dict[str, str] = field(default_factory=dict)           # name -> relative path
    deps: dict[str, list[str]] = field(default_factory=dict)      # name -> dep names
    softdeps_pre: dict[str, list[str]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)   # alias -> module names
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, kdir: Path) -> "ModuleIndex":
        dep_file = kdir / "modules.dep"
        if not dep_file.is_file():
            raise ImageToolError(f"{dep_file} is missing: run depmod for this kernel first")
        index = cls()
        index.parse_dep(dep_file.read_text())
        for name, parse in (("modules.softdep", index.parse_softdep),
                            ("modules.alias", index.parse_alias),
                            ("modules.builtin", index.parse_builtin)):
            if (kdir / name).is_file():
                parse((kdir / name).read_text())
        return index

    def parse_dep(self, text: str) -> None:
        for line in text.splitlines():
            target, sep, rest = line.partition(":")
            if not sep:
                continue
            name = module_name(target)
            self.paths[name] = target.strip()
            self.deps[name] = [module_name(p) for p in rest.split()]

    def parse_softdep(self, text: str) -> None:
        for line in text.splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "softdep":
                continue
            pre: list[str] = []
            section = ""
            for word in words[2:]:
                if word.endswith(":"):
                    section = word[:-1]
                elif section == "pre":
                    pre.append(word)
            if pre:
                self.softdeps_pre[module_name(words[1])] = pre

    def parse_alias(self, text: str) -> None:
        for line in text.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                self.aliases.setdefault(words[1], []).append(module_name(words[2]))

    def parse_builtin(self, text: str) -> None:
        self.builtin.update(module_name(line) for line in text.split())

    def lookup(self, wanted: str) -> list[str]:
        """Module names that provide `wanted` (a module name or an exact alias)."""
        name = wanted.replace("-", "_")
        if name in self.paths or name in self.builtin:
            return [name]
        return list(dict.fromkeys(self.aliases.get(wanted, [])))


@dataclass(frozen=True)
class LoadStep:
    """One insmod in the initramfs: `optional` ones may fail (e.g. a CPU-specific crc32c)."""

    name: str
    path: str
    optional: bool


def resolve_modules(index: ModuleIndex, wanted: list[str]) -> tuple[list[LoadStep], list[str]]:
    """Orders `wanted` and everything they need so each module follows its dependencies.

    Returns (load steps, names that are built into the kernel and need no
    loading). Soft "pre" dependencies are optional steps: a provider that
    does not fit the CPU must not stop the boot.
    """
    order: list[str] = []
    optional: dict[str, bool] = {}
    builtin: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, is_optional: bool) -> None:
        if name in index.builtin and name not in index.paths:
            if name not in builtin:
                builtin.append(name)
            return
        if name not in index.paths:
            raise ImageToolError(f"kernel module {name!r} is neither in modules.dep nor built in")
        if name in optional:
            # Already ordered; a required reference makes an optional step required.
            if not is_optional and optional[name]:
                optional[name] = False
                for dep in index.deps.get(name, []):
                    visit(dep, False)
            return
        if name in visiting:
            raise ImageToolError(f"dependency cycle through kernel module {name!r}")
        visiting.add(name)
        for soft in index.softdeps_pre.get(name, []):
            for provider in index.lookup(soft):
                visit(provider, True)
        # modules.dep lists the full closure, the deepest last: load it reversed.
        for dep in reversed(index.deps.get(name, [])):
            visit(dep, is_optional)
        visiting.discard(name)
        optional[name] = is_optional
        order.append(name)

    for want in wanted:
        providers = index.lookup(want)
        if not providers:
            raise ImageToolError(f"kernel module {want!r} is neither in modules.dep nor built in")
        visit(providers[0], False)
    steps = [LoadStep(n, _uncompressed(index.paths[n]), optional[n]) for n in order]
    return steps, builtin


def _uncompressed(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


def copy_module(src: Path, dest: Path) -> None:
    """Copies one module file, decompressing it: busybox insmod wants plain ELF."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = src.name
    if name.endswith(".ko.xz"):
        with lzma.open(src) as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    elif name.endswith(".ko.gz"):
        with gzip.open(src) as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    elif name.endswith(".ko.zst"):
        with open(dest, "wb") as fout:
            subprocess.run(["zstd", "-q", "-d", "-c", str(src)], stdout=fout, check=True)
    else:
        shutil.copyfile(src, dest)


def read_list(text: str) -> list[str]:
    """One item a line; '#' starts a comment."""
    items = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            items.append(line)
    return items


def install_modules(kdir: Path, wanted: list[str], dest_root: Path) -> list[LoadStep]:
    """Copies the resolved modules under dest_root/lib/modules/KVER and writes the load list.

    The load list (dest_root/etc/husk/modules.load) has one
    '/lib/modules/KVER/PATH required|optional' line per module, in load order.
    """
    index = ModuleIndex.load(kdir)
    steps, builtin = resolve_modules(index, wanted)
    kver = kdir.name
    guest_dir = f"/lib/modules/{kver}"
    lines = []
    for step in steps:
        copy_module(kdir / index.paths[step.name], dest_root / guest_dir.lstrip("/") / step.path)
        lines.append(f"{guest_dir}/{step.path} {'optional' if step.optional else 'required'}\n")
    load_list = dest_root / "etc/husk/modules.load"
    load_list.parent.mkdir(parents=True, exist_ok=True)
    load_list.write_text("".join(lines))
    if builtin:
        logger.info("built into the kernel, not loaded: %s", " ".join(builtin))
    return steps


# Section: kernel image


# Magic numbers of the payloads a bzImage may carry, and how to unpack them.
_KERNEL_PAYLOADS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x1f\x8b\x08", "gzip"),
)
ELF_MAGIC = b"\x7fELF"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage.

    QEMU boots that ELF through its PVH entry point, skipping the
    decompressor, which takes seconds under TCG.
    """
    for magic, kind in _KERNEL_PAYLOADS:
        start = bzimage.find(magic)
        while start != -1:
            try:
                elf = _decompress(bzimage[start:], kind)
            except (lzma.LZMAError, OSError, zlib.error, subprocess.CalledProcessError):
                elf = b""
            if elf.startswith(ELF_MAGIC):
                return elf
            start = bzimage.find(magic, start + 1)
    raise ImageToolError("no xz, zstd or gzip compressed ELF kernel found in the bzImage")


def _decompress(data: bytes, kind: str) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    # zstd: the CLI stops at the frame end but complains about trailing bytes.
    proc = subprocess.run(["zstd", "-q", "-d", "-c"], input=data, capture_output=True)
    return proc.stdout


# Section: kernel configuration


def kconfig_values(text: str) -> dict[str, str]:
    """CONFIG_* name -> value ("n" for "# CONFIG_X is not set") of a .config or fragment."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:-len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def kconfig_mismatches(fragment: str, config: str) -> list[str]:
    """Options of ``fragment`` that ``config`` does not have as asked (kconfig drops
    an option whose dependencies are off, without a word)."""
    have = kconfig_values(config)
    return [f"{name}={want} (got {have.get(name, 'n')})"
            for name, want in kconfig_values(fragment).items() if have.get(name, "n") != want]


# Section: input hashing


def tree_hash(paths: list[Path], root: Path) -> str:
    """sha256 over the relative names, exec bits, symlink targets and contents of files."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for top in paths:
        if top.is_file() or top.is_symlink():
            files.append(top)
            continue
        if not top.is_dir():
            digest.update(f"missing {top.relative_to(root)}\n".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in HASH_SKIP_DIRS)
            files += [Path(dirpath) / f for f in filenames if not f.endswith(HASH_SKIP_SUFFIXES)]
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"link {rel} {os.readlink(path)}\n".encode())
            continue
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"file {rel} {mode}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# Section: command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagetool.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("mirrors", help="print mmdebstrap mirror lines for a Debian release")
    p.add_argument("release")
    p.add_argument("--sources-dir", type=Path, default=APT_SOURCES_DIR)
    p.add_argument("--sources-list", type=Path, default=APT_SOURCES_LIST)

    p = sub.add_parser("pins", help="print exact pins from a requirements lock file")
    p.add_argument("lockfile", type=Path)
    p.add_argument("names", nargs="+")

    p = sub.add_parser("modules", help="copy resolved kernel modules and write the load list")
    p.add_argument("--kdir", type=Path, required=True, help="lib/modules/KVER with modules.dep")
    p.add_argument("--list", type=Path, required=True, help="file naming the wanted modules")
    p.add_argument("--dest", type=Path, required=True, help="initramfs root directory")

    p = sub.add_parser("vmlinux", help="write the uncompressed ELF kernel of a bzImage")
    p.add_argument("bzimage", type=Path)
    p.add_argument("output", type=Path)

    p = sub.add_parser("kconfig", help="check that a .config has every option of a fragment")
    p.add_argument("fragment", type=Path)
    p.add_argument("config", type=Path)

    p = sub.add_parser("hash", help="print a hash of files/trees (relative to --root)")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("paths", nargs="+")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="imagetool: %(message)s")
    try:
        if args.cmd == "mirrors":
            sources = host_sources(args.sources_dir, args.sources_list)
            print("\n".join(debian_mirror_lines(sources, args.release)))
        elif args.cmd == "pins":
            print("\n".join(read_pins(args.lockfile.read_text(), args.names)))
        elif args.cmd == "modules":
            steps = install_modules(args.kdir, read_list(args.list.read_text()), args.dest)
            logger.info("%d modules for the initramfs: %s", len(steps),
                        " ".join(s.name + ("?" if s.optional else "") for s in steps))
        elif args.cmd == "vmlinux":
            args.output.write_bytes(extract_vmlinux(args.bzimage.read_bytes()))
        elif args.cmd == "kconfig":
            missing = kconfig_mismatches(args.fragment.read_text(), args.config.read_text())
            for line in missing:
                print(f"imagetool: kernel option not as asked: {line}", file=sys.stderr)
            return 1 if missing else 0
        elif args.cmd == "hash":
            root = args.root.resolve()
            print(tree_hash([root / p for p in args.paths], root))
    except (ImageToolError, OSError, subprocess.CalledProcessError) as exc:
        print(f"imagetool: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
