"""Test images for the CRI harness, built locally from Debian packages.

Owns the `busybox` and `pause` images: their root filesystem (from the
`busybox-static` .deb), their OCI image-layout tarballs in a cache directory
(rebuilt only when an input changes), and importing them into a containerd.
Also owns stand-ins for the images cri-tools' critest runs (`make critest`),
under the names critest uses: busybox (Debian's dynamic `busybox`), nginx,
hostnet-nginx, httpd and nonewprivs (small C programs compiled with the host's
gcc, and shell scripts), and a pause for critest's pods.
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
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

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
    """A tar of `entries` in sorted order, owned by root, all stamped FIXED_MTIME.

    Hard links come last, so each one follows the file it names.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries, key=lambda p: (entries[p].kind == tarfile.LNKTYPE, p)):
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


@dataclass(frozen=True)
class Layer:
    """One image layer: its tar (whose digest is the diff_id), its gzip blob and its history line."""

    tar: bytes
    gz: bytes
    created_by: str

    @classmethod
    def of(cls, entries: dict[str, _Entry], created_by: str) -> Layer:
        tar = deterministic_tar(entries)
        return cls(tar, deterministic_gzip(tar), created_by)


def oci_image_layout(ref: str, image_config: Mapping[str, object], layers: Sequence[Layer]) -> tuple[bytes, str, str]:
    """The image-layout tarball of `layers` (bottom first), its manifest digest and its config digest."""
    config: dict[str, object] = {
        "created": FIXED_CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": dict(image_config),
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer.tar) for layer in layers]},
        "history": [{"created": FIXED_CREATED, "created_by": layer.created_by} for layer in layers],
    }
    config_bytes = _json_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": _digest(layer.gz), "size": len(layer.gz)}
                   for layer in layers],
    }
    manifest_bytes = _json_bytes(manifest)
    tag = ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {ANNOTATION_REF_NAME: tag, ANNOTATION_CONTAINERD_NAME: ref},
            }
        ],
    }
    files: dict[str, _Entry] = {
        "oci-layout": _Entry(tarfile.REGTYPE, 0o644, _json_bytes({"imageLayoutVersion": "1.0.0"})),
        "index.json": _Entry(tarfile.REGTYPE, 0o644, _json_bytes(index)),
        "blobs": _Entry(tarfile.DIRTYPE, 0o755),
        "blobs/sha256": _Entry(tarfile.DIRTYPE, 0o755),
    }
    for blob in (*(layer.gz for layer in layers), config_bytes, manifest_bytes):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = _Entry(tarfile.REGTYPE, 0o644, blob)
    return deterministic_tar(files), _digest(manifest_bytes), _digest(config_bytes)


def oci_layout_tar(defn: ImageDefinition, layer_tar: bytes, layer_gz: bytes) -> tuple[bytes, str, str]:
    """The image-layout tarball bytes, the manifest digest and the config digest."""
    image_config: dict[str, object] = {"Env": list(defn.env), "WorkingDir": defn.working_dir}
    if defn.entrypoint is not None:
        image_config["Entrypoint"] = list(defn.entrypoint)
    if defn.cmd is not None:
        image_config["Cmd"] = list(defn.cmd)
    layer = Layer(layer_tar, layer_gz, f"husk tests/cri/images.py ({BUSYBOX_PACKAGE})")
    return oci_image_layout(defn.ref, image_config, [layer])


# ----------------------------------------------------------------------------
# Cache


def _cache_key(pkg: DebPackage, defn: ImageDefinition) -> str:
    return hashlib.sha256(
        _json_bytes({"builder": BUILDER_VERSION, "deb": [pkg.name, pkg.version, pkg.sha256], "image": asdict(defn)})
    ).hexdigest()


class _Cacheable(Protocol):
    @property
    def ref(self) -> str: ...

    @property
    def file_stem(self) -> str: ...


def _read_cached(cache_dir: Path, defn: _Cacheable, key: str) -> BuiltImage | None:
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
        built = _store(cache_dir, defn, keys[defn.ref], oci_layout_tar(defn, layer_tar, layer_gz))
        cached[defn.ref] = built
        log.info("built %s (%s) from %s %s", defn.ref, built.manifest_digest, pkg.name, pkg.version)
    return [img for img in cached.values() if img is not None]


def _store(cache_dir: Path, defn: _Cacheable, key: str, layout: tuple[bytes, str, str]) -> BuiltImage:
    """Writes an image-layout tarball and its metadata (what _read_cached reads back)."""
    tar_bytes, manifest_digest, config_digest = layout
    tarball = cache_dir / f"{defn.file_stem}.tar"
    _write_atomic(tarball, tar_bytes)
    meta = {"key": key, "ref": defn.ref, "manifest_digest": manifest_digest, "config_digest": config_digest}
    _write_atomic(cache_dir / f"{defn.file_stem}.json", _json_bytes(meta))
    return BuiltImage(defn.ref, tarball, manifest_digest, config_digest)


# ----------------------------------------------------------------------------
# critest's images
#
# cri-tools' critest (tests/cri/critest.py) creates its containers from these
# names and pulls an image only when it is missing. What critest v1.31.1's
# pkg/validate needs of each, and so what the stand-ins do:
# - busybox: the usual applets as separate programs (the MaskedPaths spec masks
#   /bin/ls and expects `sh -c ls` to fail with "Permission denied"), plus the
#   pgrep and ipcs that Debian's busybox lacks.
# - nginx and hostnet-nginx: HTTP 200 on port 80 (12003), a master process whose
#   name is `nginx` (pidof), whose command line is nginx's and whose pid is in
#   /var/run/nginx.pid, and which exits on SIGTERM and SIGQUIT.
# - httpd: HTTP on port 80, and "Command line: 'httpd -D FOREGROUND'" in its log.
# - nonewprivs: a setuid-root /usr/local/bin/nnp that prints its effective uid.
# - the pods' sandbox image (the harness's pause name): no `sleep` process, which
#   critest would see in pods with a shared PID namespace (`pgrep sleep` must find nothing).

CRITEST_BUSYBOX_REF = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
CRITEST_NGINX_REF = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
CRITEST_HOSTNET_NGINX_REF = "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest"
CRITEST_HTTPD_REF = "registry.k8s.io/e2e-test-images/httpd:2.4.39-4"
CRITEST_NONEWPRIVS_REF = "registry.k8s.io/e2e-test-images/nonewprivs:1.3"

DEFAULT_CRITEST_CACHE_DIR = DEFAULT_CACHE_DIR / "critest"
# Bump when the critest image code changes in a way that alters the output bytes.
CRITEST_BUILDER_VERSION = "1"
# Debian's dynamic busybox: its shell runs each applet as a program. busybox-static's
# runs them in-process, so a masked /bin/ls would still run.
CRITEST_BUSYBOX_PACKAGE = "busybox"
LIBC_PACKAGE = "libc6"
# Debian's busybox has no ipcs; the HostIpc specs run `ipcs -m`.
IPCS_PACKAGE = "util-linux"
CRITEST_PACKAGES = (CRITEST_BUSYBOX_PACKAGE, LIBC_PACKAGE, IPCS_PACKAGE)
LIBC_DIR = "lib/x86_64-linux-gnu"
# What the dynamic busybox and ipcs load (ldd), from the libc6 .deb.
LIBC_FILES = (f"{LIBC_DIR}/ld-linux-x86-64.so.2", f"{LIBC_DIR}/libc.so.6", f"{LIBC_DIR}/libresolv.so.2")
LOADER_LINK = "lib64/ld-linux-x86-64.so.2"
IPCS_PATH = "usr/bin/ipcs"
CC = "gcc"
# Static: the programs do not depend on the image's libc. -s leaves out symbols and
# so the (random) build directory's file names.
CC_FLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
# The static libc that gcc -static links in.
LIBC_DEV_PACKAGE = "libc6-dev"
TOOLCHAIN_HINT = "install them with `apt-get install gcc libc6-dev`"

HTTPD_PATH_ENV = "PATH=/usr/local/apache2/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"

# Debian's busybox has no pgrep; critest's execSync-timeout spec runs `sh -c "pgrep sleep || true"`
# and expects nothing on stdout or stderr once the timed-out `sleep` is gone.
PGREP_SH = r"""#!/bin/sh
# pgrep NAME: the pids of the processes whose name contains NAME, as procps' pgrep
# prints them (a stand-in: NAME is plain text here, not a regular expression).
[ $# -eq 1 ] || { echo "usage: pgrep NAME" >&2; exit 2; }
status=1
for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" != "$$" ] || continue
    { read -r name < "$dir/comm"; } 2>/dev/null || continue
    case $name in
        *"$1"*) echo "$pid"; status=0 ;;
    esac
done
exit $status
"""

NGINX_C = r"""/* nginx stand-in for critest's images (husk tests/cri/images.py).
 *
 * Looks like nginx's master process: its name is "nginx", its command line is
 * nginx's, and its pid is in /var/run/nginx.pid. Serves with Debian's busybox
 * httpd as its one worker, on port $NGINX_PORT (80 by default), and exits 0 on
 * SIGTERM, SIGQUIT or SIGINT.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define SELF "/usr/sbin/nginx"
#define TITLE "nginx: master process nginx -g daemon off;"
#define PID_FILE "/var/run/nginx.pid"
#define HTTPD "/usr/sbin/httpd"
#define DOCROOT "/usr/share/nginx/html"

static volatile sig_atomic_t stopping;
static volatile pid_t worker;

static void on_stop(int sig) {
    (void)sig;
    stopping = 1;
    if (worker > 0)
        kill(worker, SIGTERM);
}

int main(int argc, char **argv) {
    if (argc != 1 || strcmp(argv[0], TITLE) != 0) {
        /* Exec'ing SELF keeps "nginx" as the process name (pidof); argv[0] is the title. */
        char title[] = TITLE;
        char *args[] = {title, NULL};
        execv(SELF, args);
        perror("nginx: exec " SELF);
        return 1;
    }
    const char *port = getenv("NGINX_PORT");
    if (port == NULL || *port == '\0')
        port = "80";

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGQUIT, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    FILE *f = fopen(PID_FILE, "w");
    if (f == NULL) {
        perror("nginx: " PID_FILE);
        return 1;
    }
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);

    pid_t pid = fork();
    if (pid < 0) {
        perror("nginx: fork");
        return 1;
    }
    if (pid == 0) {
        execl(HTTPD, "httpd", "-f", "-p", port, "-h", DOCROOT, (char *)NULL);
        perror("nginx: exec " HTTPD);
        _exit(127);
    }
    worker = pid;
    if (stopping)
        kill(pid, SIGTERM);
    fprintf(stderr, "nginx: master %d, busybox httpd worker %d on port %s\n", (int)getpid(), (int)pid, port);
    for (;;) {
        int status;
        pid_t done = waitpid(-1, &status, 0);
        if (done == pid) {
            if (stopping)
                return 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        if (done < 0 && errno != EINTR) {
            perror("nginx: waitpid");
            return 1;
        }
    }
}
"""

PAUSE_C = r"""/* pause stand-in for critest's pods (husk tests/cri/images.py): waits for SIGTERM or
 * SIGINT, exits 0, and reaps the orphans a shared PID namespace hands it. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(void) {
    struct sigaction stop = {.sa_handler = on_stop};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGCHLD, &child, NULL);
    for (;;)
        pause();
}
"""

NNP_C = r"""/* nonewprivs stand-in for critest's images (husk tests/cri/images.py): installed
 * setuid root, it shows whether exec gave it root. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
"""

HTTPD_FOREGROUND_SH = """#!/bin/sh
# As in the httpd image: httpd in the foreground.
exec httpd -D FOREGROUND "$@"
"""

HTTPD_SH = """#!/bin/sh
# httpd stand-in: Debian's busybox httpd on port 80. It announces its command line
# the way Apache's httpd does, and exits 0 on the httpd image's stop signal (SIGWINCH).
echo "[core:notice] [pid $$] AH00094: Command line: '${0##*/} $*'"
/bin/busybox httpd -f -p 80 -h /usr/local/apache2/htdocs &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid"; exit 0' TERM INT WINCH
wait "$pid"
"""

NGINX_INDEX = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>" \
              "<body><h1>Welcome to nginx!</h1></body></html>\n"
HTTPD_INDEX = "<html><body><h1>It works!</h1></body></html>\n"

# Everything the critest images are made of besides the .debs and the compiler.
CRITEST_SOURCES: dict[str, str] = {
    "pgrep": PGREP_SH, "nginx.c": NGINX_C, "nnp.c": NNP_C, "pause.c": PAUSE_C, "httpd-foreground": HTTPD_FOREGROUND_SH,
    "httpd": HTTPD_SH, "nginx-index": NGINX_INDEX, "httpd-index": HTTPD_INDEX, "nsswitch": NSSWITCH,
    "passwd": PASSWD, "group": GROUP,
}


@dataclass(frozen=True)
class CritestImage:
    """One of critest's images: its name, its layers (names in critest_layers(), bottom first), its config."""

    ref: str
    layers: tuple[str, ...]
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = (DEFAULT_PATH_ENV,)
    working_dir: str = "/"
    stop_signal: str | None = None
    exposed_ports: tuple[str, ...] = ()

    @property
    def file_stem(self) -> str:
        # registry.k8s.io/e2e-test-images/busybox:1.29-2 -> registry.k8s.io_e2e-test-images_busybox_1.29-2
        return self.ref.replace("/", "_").replace(":", "_")

    def image_config(self) -> dict[str, object]:
        config: dict[str, object] = {"Env": list(self.env), "WorkingDir": self.working_dir}
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.stop_signal is not None:
            config["StopSignal"] = self.stop_signal
        if self.exposed_ports:
            config["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        return config


NGINX_CMD = ("nginx", "-g", "daemon off;")
CRITEST_IMAGES: tuple[CritestImage, ...] = (
    CritestImage(CRITEST_BUSYBOX_REF, ("busybox",), cmd=("sh",)),
    # nginx 1.14's image stops with SIGTERM, the 1.25 one hostnet-nginx is built from with SIGQUIT.
    CritestImage(CRITEST_NGINX_REF, ("busybox", "nginx"), cmd=NGINX_CMD, stop_signal="SIGTERM",
                 exposed_ports=("80/tcp",)),
    CritestImage(CRITEST_HOSTNET_NGINX_REF, ("busybox", "nginx"), cmd=NGINX_CMD,
                 env=(DEFAULT_PATH_ENV, "NGINX_PORT=12003"), stop_signal="SIGQUIT", exposed_ports=("12003/tcp",)),
    CritestImage(CRITEST_HTTPD_REF, ("busybox", "httpd"), cmd=("httpd-foreground",), env=(HTTPD_PATH_ENV,),
                 working_dir="/usr/local/apache2", stop_signal="SIGWINCH", exposed_ports=("80/tcp",)),
    CritestImage(CRITEST_NONEWPRIVS_REF, ("busybox", "nonewprivs"), entrypoint=("/usr/local/bin/nnp",)),
    # containerd's sandbox image: the harness names it PAUSE_REF in containerd's config.
    CritestImage(PAUSE_REF, ("pause",), entrypoint=("/pause",)),
)


@dataclass(frozen=True)
class CritestInputs:
    """The bytes the critest layers are made from (unpacked .debs, compiled programs)."""

    busybox: bytes
    applets: tuple[str, ...]  # `busybox --list-full`: bin/ls, usr/bin/awk, ...
    libc: Mapping[str, tuple[bytes, int]]  # path in the image -> (contents, mode)
    ipcs: bytes
    nginx: bytes
    nnp: bytes
    pause: bytes


def _add_entry(entries: dict[str, _Entry], path: str, entry: _Entry) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        entries.setdefault("/".join(parts[:i]), _Entry(tarfile.DIRTYPE, 0o755))
    entries[path] = entry


def _regular(data: str | bytes, mode: int = 0o644) -> _Entry:
    return _Entry(tarfile.REGTYPE, mode, data.encode() if isinstance(data, str) else data)


def critest_busybox_entries(inputs: CritestInputs) -> dict[str, _Entry]:
    """busybox with libc, every applet a hard link to it (as in busybox's own image), pgrep, ipcs, /etc basics."""
    entries: dict[str, _Entry] = {}
    _add_entry(entries, "bin/busybox", _regular(inputs.busybox, 0o755))
    for applet in inputs.applets:
        if "/" not in applet or applet == "bin/busybox":
            continue
        # Hard links, not symlinks: masking /bin/ls must not mask the /bin/busybox behind /bin/sh.
        _add_entry(entries, applet, _Entry(tarfile.LNKTYPE, 0o755, linkname="bin/busybox"))
    for path, (data, mode) in inputs.libc.items():
        _add_entry(entries, path, _regular(data, mode))
    _add_entry(entries, LOADER_LINK, _Entry(tarfile.SYMTYPE, 0o777, linkname=f"/{LIBC_DIR}/ld-linux-x86-64.so.2"))
    _add_entry(entries, IPCS_PATH, _regular(inputs.ipcs, 0o755))
    _add_entry(entries, "usr/bin/pgrep", _regular(PGREP_SH, 0o755))
    _add_entry(entries, "etc/passwd", _regular(PASSWD))
    _add_entry(entries, "etc/group", _regular(GROUP))
    _add_entry(entries, "etc/nsswitch.conf", _regular(NSSWITCH))
    for d in ("proc", "sys", "dev", "run", "var/run", "home", "mnt"):
        _add_entry(entries, d, _Entry(tarfile.DIRTYPE, 0o755))
    _add_entry(entries, "root", _Entry(tarfile.DIRTYPE, 0o700))
    _add_entry(entries, "tmp", _Entry(tarfile.DIRTYPE, 0o1777))
    return entries


def critest_layers(inputs: CritestInputs) -> dict[str, Layer]:
    """The layers CritestImage.layers name."""
    nginx: dict[str, _Entry] = {}
    _add_entry(nginx, "usr/sbin/nginx", _regular(inputs.nginx, 0o755))
    _add_entry(nginx, "usr/share/nginx/html/index.html", _regular(NGINX_INDEX))
    httpd: dict[str, _Entry] = {}
    _add_entry(httpd, "usr/local/bin/httpd-foreground", _regular(HTTPD_FOREGROUND_SH, 0o755))
    _add_entry(httpd, "usr/local/apache2/bin/httpd", _regular(HTTPD_SH, 0o755))
    _add_entry(httpd, "usr/local/apache2/htdocs/index.html", _regular(HTTPD_INDEX))
    nonewprivs: dict[str, _Entry] = {}
    _add_entry(nonewprivs, "usr/local/bin/nnp", _regular(inputs.nnp, 0o4755))  # setuid root
    pause = {"pause": _regular(inputs.pause, 0o755)}
    origin = "husk tests/cri/images.py"
    return {
        "busybox": Layer.of(critest_busybox_entries(inputs), f"{origin} ({', '.join(CRITEST_PACKAGES)})"),
        "nginx": Layer.of(nginx, f"{origin} (nginx stand-in, busybox httpd)"),
        "httpd": Layer.of(httpd, f"{origin} (httpd stand-in, busybox httpd)"),
        "nonewprivs": Layer.of(nonewprivs, f"{origin} (nnp)"),
        "pause": Layer.of(pause, f"{origin} (pause)"),
    }


def _toolchain_id() -> str:
    """gcc's version and the static libc's package version: what the compiled programs depend on."""
    if shutil.which(CC) is None:
        raise ImageBuildError(f"critest's nginx and nonewprivs images need {CC} and {LIBC_DEV_PACKAGE}: "
                              f"{TOOLCHAIN_HINT}")
    gcc = _run([CC, "--version"], timeout=30).splitlines()[0]
    try:
        libc_dev = _run(["dpkg-query", "-W", "-f=${Version}", LIBC_DEV_PACKAGE], timeout=30)
    except ImageBuildError:
        raise ImageBuildError(f"{LIBC_DEV_PACKAGE} is not installed (gcc -static needs its libc.a): "
                              f"{TOOLCHAIN_HINT}") from None
    return f"{gcc}; {LIBC_DEV_PACKAGE} {libc_dev}"


def compile_static(name: str, source: str, workdir: Path) -> bytes:
    """A static, stripped executable of the C `source`."""
    src = workdir / f"{name}.c"
    src.write_text(source)
    out = workdir / name
    _run([CC, *CC_FLAGS, "-o", str(out), str(src)], timeout=300, cwd=workdir)
    return out.read_bytes()


def _critest_key(debs: Sequence[DebPackage], toolchain: str, defn: CritestImage) -> str:
    return hashlib.sha256(_json_bytes({
        "builder": CRITEST_BUILDER_VERSION,
        "debs": [[p.name, p.version, p.sha256] for p in debs],
        "toolchain": toolchain,
        "sources": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in CRITEST_SOURCES.items()},
        "image": asdict(defn),
    })).hexdigest()


def _unpack(pkg: DebPackage, tmpdir: Path) -> Path:
    dest = tmpdir / pkg.name
    dest.mkdir()
    deb = download_deb(pkg, dest)
    tree = dest / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=APT_TIMEOUT_S)
    return tree


def _read_member(tree: Path, path: str, pkg: DebPackage) -> tuple[bytes, int]:
    file = tree / path
    if file.is_symlink() or not file.is_file():
        raise ImageBuildError(f"{pkg.name} {pkg.version} has no regular file {path}")
    return file.read_bytes(), file.stat().st_mode & 0o7777


def critest_inputs(debs: Mapping[str, DebPackage], tmpdir: Path) -> CritestInputs:
    """Downloads and unpacks the .debs, lists busybox's applets and compiles the C programs."""
    trees = {name: _unpack(pkg, tmpdir) for name, pkg in debs.items()}
    busybox, _ = _read_member(trees[CRITEST_BUSYBOX_PACKAGE], "bin/busybox", debs[CRITEST_BUSYBOX_PACKAGE])
    libc_tree = trees[LIBC_PACKAGE]
    libc = {path: _read_member(libc_tree, path, debs[LIBC_PACKAGE]) for path in LIBC_FILES}
    # Run the dynamic busybox with the unpacked libc, whatever the host's is.
    applets = _run([str(libc_tree / LIBC_FILES[0]), "--library-path", str(libc_tree / LIBC_DIR),
                    str(trees[CRITEST_BUSYBOX_PACKAGE] / "bin" / "busybox"), "--list-full"], timeout=30).split()
    ipcs, _ = _read_member(trees[IPCS_PACKAGE], IPCS_PATH, debs[IPCS_PACKAGE])
    build = tmpdir / "cc"
    build.mkdir()
    return CritestInputs(busybox=busybox, applets=tuple(applets), libc=libc, ipcs=ipcs,
                         nginx=compile_static("nginx", NGINX_C, build), nnp=compile_static("nnp", NNP_C, build),
                         pause=compile_static("pause", PAUSE_C, build))


def build_critest_images(
    cache_dir: Path = DEFAULT_CRITEST_CACHE_DIR, images: tuple[CritestImage, ...] = CRITEST_IMAGES
) -> list[BuiltImage]:
    """Builds (or reuses from `cache_dir`) the image-layout tarballs of critest's images, sandbox image included."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = {name: candidate_package(name, cache_dir) for name in CRITEST_PACKAGES}
    toolchain = _toolchain_id()
    keys = {d.ref: _critest_key(list(debs.values()), toolchain, d) for d in images}
    cached = {d.ref: _read_cached(cache_dir, d, keys[d.ref]) for d in images}
    missing = [d for d in images if cached[d.ref] is None]
    if not missing:
        log.debug("critest images up to date in %s", cache_dir)
        return [img for img in cached.values() if img is not None]

    with tempfile.TemporaryDirectory(prefix="husk-critest-img-") as tmp:
        layers = critest_layers(critest_inputs(debs, Path(tmp)))
    for defn in missing:
        built = _store(cache_dir, defn, keys[defn.ref],
                       oci_image_layout(defn.ref, defn.image_config(), [layers[name] for name in defn.layers]))
        cached[defn.ref] = built
        log.info("built %s (%s)", defn.ref, built.manifest_digest)
    return [img for img in cached.values() if img is not None]


# ----------------------------------------------------------------------------
# fio's image (make bench-io)
#
# The busybox image's layer (for sh), read back from its tarball so both images
# share it, and a layer with the host's fio (Debian's package, which
# `make bench-io` installs) and every shared library it loads, at the paths the
# host's loader finds them (ldd). Debian links all of fio's engines in (rbd,
# gluster, nbd, pmem, rdma): ~60 libraries and ~40 MB, all of them already on
# the host, where resolving and downloading that package closure again would
# buy nothing. The cache key hashes every file, so a host upgrade rebuilds it.

FIO_REF = "husk.test/fio:1"
FIO_BINARY = Path("/usr/bin/fio")
FIO_ENTRYPOINT = (str(FIO_BINARY),)
FIO_CMD = ("--version",)
FIO = ImageDefinition(ref=FIO_REF, entrypoint=list(FIO_ENTRYPOINT), cmd=list(FIO_CMD))
# Bump when the fio image code changes in a way that alters the output bytes.
FIO_BUILDER_VERSION = "1"
FIO_HINT = "install Debian's fio (`apt-get install fio`; `make bench-io` does)"
LDD_TIMEOUT_S = 30


def shared_libraries(binary: Path) -> list[Path]:
    """What `binary` loads, its loader included, where the host's loader finds it (ldd).

    :raise ImageBuildError: the host lacks one of them.
    """
    out = _run(["ldd", str(binary)], timeout=LDD_TIMEOUT_S)
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise ImageBuildError(f"{binary} needs {', '.join(missing)}, missing on the host: {FIO_HINT}")
    # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)";
    # linux-vdso.so.1 is the kernel's, no file.
    found = {next((f for f in line.split() if f.startswith("/")), "") for line in out.splitlines()}
    return sorted(Path(p) for p in found if p)


def fio_layer_entries(binary: Path, libraries: Sequence[Path]) -> dict[str, _Entry]:
    """The binary and its libraries, each a regular file at the path the loader asks for
    (the host's symlinks, such as merged /usr's lib -> usr/lib, are resolved, not copied)."""
    entries: dict[str, _Entry] = {}
    for path in (binary, *libraries):
        real = path.resolve()
        _add_entry(entries, path.as_posix().lstrip("/"), _regular(real.read_bytes(), real.stat().st_mode & 0o777))
    return entries


def image_layers(image: BuiltImage) -> list[Layer]:
    """A built image's layers, read back from its tarball, to build another image on."""
    with tarfile.open(image.tarball) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            if member is None:
                raise ImageBuildError(f"{image.tarball} has no blob {digest}")
            return member.read()

        manifest = json.loads(blob(image.manifest_digest))
        history = json.loads(blob(image.config_digest))["history"]
        blobs = [blob(entry["digest"]) for entry in manifest["layers"]]
    return [Layer(gzip.decompress(gz), gz, step["created_by"]) for gz, step in zip(blobs, history, strict=True)]


def _check_fio_layer(layer_tar: bytes, workdir: Path) -> str:
    """`fio --version` chrooted into the layer alone: every library is there. Returns the version."""
    root = workdir / "fio-root"
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        tar.extractall(root, filter="data")
    return _run(["chroot", str(root), str(FIO_BINARY), "--version"], timeout=LDD_TIMEOUT_S).strip()


def _fio_key(base: BuiltImage, entries: Mapping[str, _Entry]) -> str:
    return hashlib.sha256(_json_bytes({
        "builder": FIO_BUILDER_VERSION,
        "base": base.manifest_digest,
        "files": {path: [e.kind.decode(), e.mode, hashlib.sha256(e.data).hexdigest()] for path, e in entries.items()},
        "image": asdict(FIO),
    })).hexdigest()


def build_fio_image(cache_dir: Path = DEFAULT_CACHE_DIR) -> BuiltImage:
    """Builds (or reuses from `cache_dir`) fio's image-layout tarball: busybox's layer, then fio's."""
    if not FIO_BINARY.is_file():
        raise ImageBuildError(f"{FIO_BINARY} is missing: {FIO_HINT}")
    [base] = build_images(cache_dir, (BUSYBOX,))
    entries = fio_layer_entries(FIO_BINARY, shared_libraries(FIO_BINARY))
    key = _fio_key(base, entries)
    cached = _read_cached(cache_dir, FIO, key)
    if cached is not None:
        log.debug("fio image up to date in %s", cache_dir)
        return cached
    layer = Layer.of(entries, f"husk tests/cri/images.py (the host's {FIO_BINARY} and its libraries)")
    with tempfile.TemporaryDirectory(prefix="husk-fio-img-") as tmp:
        version = _check_fio_layer(layer.tar, Path(tmp))
    config = {"Env": list(FIO.env), "WorkingDir": FIO.working_dir, "Entrypoint": list(FIO_ENTRYPOINT),
              "Cmd": list(FIO_CMD)}
    built = _store(cache_dir, FIO, key, oci_image_layout(FIO.ref, config, [*image_layers(base), layer]))
    files = sum(e.kind == tarfile.REGTYPE for e in entries.values())
    log.info("built %s (%s) from %s, %d files", FIO.ref, built.manifest_digest, version, files)
    return built


def import_images(containerd_address: str | Path, images: list[BuiltImage], namespace: str = "k8s.io",
                  ctr: str = "ctr") -> None:
    """`ctr images import` of every tarball into `namespace` (k8s.io is the CRI's namespace);
    `ctr` is the client of the containerd build at that address."""
    for img in images:
        out = _run(
            [ctr, "--address", str(containerd_address), "--namespace", namespace,
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
    # `python -m tests.cri.images critest` builds critest's images as well.
    for built in [*build_images(), *(build_critest_images() if sys.argv[1:] == ["critest"] else [])]:
        print(built.ref, built.manifest_digest, built.tarball)
