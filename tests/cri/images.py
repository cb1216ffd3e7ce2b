"""Test images for the CRI harness, built locally from Debian packages.

Owns the `busybox` and `pause` images: their root filesystem (from the
`busybox-static` .deb), their OCI image-layout tarballs in a cache directory
(rebuilt only when an input changes), and importing them into a containerd.
No registry is reachable from the test machines, so nothing is ever pulled.
Every byte is deterministic (fixed mtimes, owners, gzip header, JSON key order),
so an image's digest only changes when its inputs do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / "build" / "images"

BUSYBOX_REF = "husk.test/busybox:1"
PAUSE_REF = "husk.test/pause:1"
BUSYBOX_PACKAGE = "busybox-static"

# Bump when the layout code changes in a way that alters the output bytes.
BUILDER_VERSION = "1"
# 2000-01-01T00:00:00Z: every file and the image config get this timestamp.
FIXED_MTIME = 946684800
FIXED_CREATED = "2000-01-01T00:00:00Z"
GZIP_LEVEL = 6
APT_TIMEOUT_S = 300
APT_LISTS_DIR = Path("/var/lib/apt/lists")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
CTR_IMPORT_TIMEOUT_S = 120

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# ctr import names images from this one (the OCI ref.name only holds the tag).
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Sleeps forever and exits 0 on SIGTERM/SIGINT; `wait` returns as soon as a
# trapped signal arrives, unlike a foreground `sleep`.
PAUSE_SCRIPT = "trap 'kill $! 2>/dev/null; exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class ImageBuildError(RuntimeError):
    """An input package could not be fetched or unpacked, or the layout is unusable."""


@dataclass(frozen=True)
class ImageDefinition:
    """What goes into the image config on top of the shared busybox layer."""

    ref: str
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH_ENV])
    working_dir: str = "/"

    @property
    def file_stem(self) -> str:
        # husk.test/busybox:1 -> husk.test_busybox_1
        return self.ref.replace("/", "_").replace(":", "_")


BUSYBOX = ImageDefinition(ref=BUSYBOX_REF, cmd=["sh"])
PAUSE = ImageDefinition(ref=PAUSE_REF, entrypoint=["/bin/sh", "-c", PAUSE_SCRIPT])
DEFAULT_IMAGES: tuple[ImageDefinition, ...] = (BUSYBOX, PAUSE)


@dataclass(frozen=True)
class BuiltImage:
    """An OCI image-layout tarball ready for `ctr images import`."""

    ref: str
    tarball: Path
    manifest_digest: str
    config_digest: str


# ----------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    sha256: str


def _apt_lists_signature() -> str:
    """Changes whenever `apt-get update` (or a sources change) may change a candidate."""
    stamps = []
    for d in (APT_LISTS_DIR, APT_SOURCES_DIR):
        with contextlib.suppress(OSError):
            stamps += [f"{e.name}:{e.stat().st_mtime_ns}:{e.stat().st_size}" for e in os.scandir(d)]
    return hashlib.sha256("\n".join(sorted(stamps)).encode()).hexdigest()


def candidate_package(name: str, cache_dir: Path | None = None) -> DebPackage:
    """The version apt would download now, with the archive's SHA256 of the .deb.

    apt-cache takes over a second here, so the answer is remembered in
    cache_dir until the apt lists change.
    """
    memo = cache_dir / f"apt-candidate-{name}.json" if cache_dir else None
    signature = _apt_lists_signature()
    if memo is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(memo.read_text())
            if data["signature"] == signature:
                return DebPackage(**data["package"])
    pkg = _query_candidate(name)
    if memo is not None:
        _write_atomic(memo, _json_bytes({"signature": signature, "package": asdict(pkg)}))
    return pkg


def _query_candidate(name: str) -> DebPackage:
    out = _run(["apt-cache", "show", "--no-all-versions", name], timeout=APT_TIMEOUT_S)
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key not in fields:
            fields[key] = value.strip()
    if "Version" not in fields or "SHA256" not in fields:
        raise ImageBuildError(f"apt-cache knows no candidate for {name!r}; run apt-get update")
    return DebPackage(name=name, version=fields["Version"], sha256=fields["SHA256"])


def download_deb(pkg: DebPackage, dest: Path) -> Path:
    """`apt-get download` with the host's apt configuration, checked against the index SHA256."""
    # The sandbox user _apt cannot write into a root-only temp dir.
    _run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg.name}={pkg.version}"],
        cwd=dest,
        timeout=APT_TIMEOUT_S,
    )
    debs = sorted(dest.glob(f"{pkg.name}_*.deb"))
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {pkg.name} left {len(debs)} .deb files in {dest}")
    digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
    if digest != pkg.sha256:
        raise ImageBuildError(f"{debs[0].name}: sha256 {digest} differs from the archive's {pkg.sha256}")
    return debs[0]


# ----------------------------------------------------------------------------
# Layer


@dataclass
class _Entry:
    kind: bytes  # tarfile.REGTYPE / DIRTYPE / SYMTYPE
    mode: int
    data: bytes = b""
    linkname: str = ""


def busybox_rootfs_entries(busybox_binary: bytes, applets: list[str]) -> dict[str, _Entry]:
    """The file tree of the busybox layer: the binary, one symlink per applet, /etc basics."""
    entries: dict[str, _Entry] = {}

    def add(path: str, entry: _Entry) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, _Entry(tarfile.DIRTYPE, 0o755))
        entries[path] = entry

    add("bin/busybox", _Entry(tarfile.REGTYPE, 0o755, busybox_binary))
    for applet in applets:
        # `busybox --list-full` prints paths like usr/bin/awk; "linuxrc" has no dir.
        if "/" not in applet or applet == "bin/busybox":
            continue
        add(applet, _Entry(tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
    add("etc/passwd", _Entry(tarfile.REGTYPE, 0o644, PASSWD.encode()))
    add("etc/group", _Entry(tarfile.REGTYPE, 0o644, GROUP.encode()))
    for d in ("proc", "sys", "dev", "run", "var", "home", "mnt"):
        add(d, _Entry(tarfile.DIRTYPE, 0o755))
    add("root", _Entry(tarfile.DIRTYPE, 0o700))
    add("tmp", _Entry(tarfile.DIRTYPE, 0o1777))
    return entries


def deterministic_tar(entries: dict[str, _Entry]) -> bytes:
    """A tar of `entries` in sorted order, owned by root, all stamped FIXED_MTIME."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            e = entries[path]
            info = tarfile.TarInfo(path)
            info.type = e.kind
            info.mode = e.mode
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.linkname = e.linkname
            info.size = len(e.data) if e.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def deterministic_gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and an empty file name keep the gzip header constant.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=GZIP_LEVEL) as gz:
        gz.write(data)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# OCI layout


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_layout_tar(defn: ImageDefinition, layer_tar: bytes, layer_gz: bytes) -> tuple[bytes, str, str]:
    """The image-layout tarball bytes, the manifest digest and the config digest."""
    config: dict[str, object] = {
        "created": FIXED_CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": list(defn.env), "WorkingDir": defn.working_dir},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
        "history": [{"created": FIXED_CREATED, "created_by": f"husk tests/cri/images.py ({BUSYBOX_PACKAGE})"}],
    }
    image_config = config["config"]
    assert isinstance(image_config, dict)
    if defn.entrypoint is not None:
        image_config["Entrypoint"] = list(defn.entrypoint)
    if defn.cmd is not None:
        image_config["Cmd"] = list(defn.cmd)
    config_bytes = _json_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": _digest(layer_gz), "size": len(layer_gz)}],
    }
    manifest_bytes = _json_bytes(manifest)
    tag = defn.ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {ANNOTATION_REF_NAME: tag, ANNOTATION_CONTAINERD_NAME: defn.ref},
            }
        ],
    }
    files: dict[str, _Entry] = {
        "oci-layout": _Entry(tarfile.REGTYPE, 0o644, _json_bytes({"imageLayoutVersion": "1.0.0"})),
        "index.json": _Entry(tarfile.REGTYPE, 0o644, _json_bytes(index)),
        "blobs": _Entry(tarfile.DIRTYPE, 0o755),
        "blobs/sha256": _Entry(tarfile.DIRTYPE, 0o755),
    }
    for blob in (layer_gz, config_bytes, manifest_bytes):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = _Entry(tarfile.REGTYPE, 0o644, blob)
    return deterministic_tar(files), _digest(manifest_bytes), _digest(config_bytes)


# ----------------------------------------------------------------------------
# Cache


def _cache_key(pkg: DebPackage, defn: ImageDefinition) -> str:
    return hashlib.sha256(
        _json_bytes({"builder": BUILDER_VERSION, "deb": [pkg.name, pkg.version, pkg.sha256], "image": asdict(defn)})
    ).hexdigest()


def _read_cached(cache_dir: Path, defn: ImageDefinition, key: str) -> BuiltImage | None:
    meta_path = cache_dir / f"{defn.file_stem}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    tarball = cache_dir / f"{defn.file_stem}.tar"
    if meta.get("key") != key or not tarball.is_file():
        return None
    return BuiltImage(defn.ref, tarball, meta["manifest_digest"], meta["config_digest"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_images(
    cache_dir: Path = DEFAULT_CACHE_DIR, images: tuple[ImageDefinition, ...] = DEFAULT_IMAGES
) -> list[BuiltImage]:
    """Builds (or reuses from `cache_dir`) the image-layout tarballs for `images`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    pkg = candidate_package(BUSYBOX_PACKAGE, cache_dir)
    keys = {d.ref: _cache_key(pkg, d) for d in images}
    cached = {d.ref: _read_cached(cache_dir, d, keys[d.ref]) for d in images}
    missing = [d for d in images if cached[d.ref] is None]
    if not missing:
        log.debug("test images up to date in %s", cache_dir)
        return [img for img in cached.values() if img is not None]

    with tempfile.TemporaryDirectory(prefix="husk-img-") as tmp:
        tmpdir = Path(tmp)
        deb = download_deb(pkg, tmpdir)
        extract = tmpdir / "x"
        _run(["dpkg-deb", "-x", str(deb), str(extract)], timeout=APT_TIMEOUT_S)
        busybox = extract / "bin" / "busybox"
        if not busybox.is_file():
            raise ImageBuildError(f"{deb.name} has no bin/busybox")
        # The static binary runs on the host too, so it can list its own applets.
        applets = _run([str(busybox), "--list-full"], timeout=30).split()
        layer_tar = deterministic_tar(busybox_rootfs_entries(busybox.read_bytes(), applets))
    layer_gz = deterministic_gzip(layer_tar)

    for defn in missing:
        tar_bytes, manifest_digest, config_digest = oci_layout_tar(defn, layer_tar, layer_gz)
        tarball = cache_dir / f"{defn.file_stem}.tar"
        _write_atomic(tarball, tar_bytes)
        meta = {
            "key": keys[defn.ref], "ref": defn.ref,
            "manifest_digest": manifest_digest, "config_digest": config_digest,
        }
        _write_atomic(cache_dir / f"{defn.file_stem}.json", _json_bytes(meta))
        cached[defn.ref] = BuiltImage(defn.ref, tarball, manifest_digest, config_digest)
        log.info("built %s (%s) from %s %s", defn.ref, manifest_digest, pkg.name, pkg.version)
    return [img for img in cached.values() if img is not None]


def import_images(containerd_address: str | Path, images: list[BuiltImage], namespace: str = "k8s.io") -> None:
    """`ctr images import` of every tarball into `namespace` (k8s.io is the CRI's namespace)."""
    for img in images:
        out = _run(
            ["ctr", "--address", str(containerd_address), "--namespace", namespace,
             "images", "import", "--all-platforms", str(img.tarball)],
            timeout=CTR_IMPORT_TIMEOUT_S,
        )
        log.debug("ctr import %s: %s", img.ref, out.strip())


def _run(argv: list[str], *, timeout: float, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{argv[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for built in build_images():
        print(built.ref, built.manifest_digest, built.tarball)
