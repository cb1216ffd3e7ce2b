#!/bin/bash
# husk guest image builder.
#
#   guest-image/build.sh OUTDIR
#
# Writes OUTDIR/vmlinuz (built from Debian bookworm's kernel source, pinned in
# kernel.pin, with kernel.config) and OUTDIR/vmlinux (the same kernel
# uncompressed, for QEMU's faster PVH boot),
# OUTDIR/initrd.img (busybox-static + the modules in modules.txt, /init from
# initramfs-init.sh), OUTDIR/rootfs.img (read-only Debian root with python3,
# crun, the agent and the pinned grpcio/protobuf; /sbin/init from
# rootfs-init.sh) and OUTDIR/manifest.txt.
#
# The slow inputs (mmdebstrap base, kernel package, pip wheels) are cached in
# OUTDIR/cache/, keyed on what they are made from; the image itself is
# rebuilt only when agent/, proto/, guest-image/, the husk version or the pins change.
# Runs as root on Debian bookworm. HUSK_ROOTFS_FORMAT overrides the root
# image format (squashfs-lz4, squashfs-zstd, squashfs-none, ext4).
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
RELEASE=bookworm
# Chosen by measuring boot-to-`import grpc` under TCG with boottest.py: an
# uncompressed ext4 beat squashfs lz4/zstd/uncompressed by ~0.5-1 s.
ROOTFS_FORMAT=${HUSK_ROOTFS_FORMAT:-ext4}
# Compressor of the initramfs cpio ("cat" = none).
INITRD_COMPRESS=(cat)
# Python distributions baked into the guest, at requirements.lock's pins.
PIP_PACKAGES=(grpcio protobuf typing_extensions)
PIP_TARGET_OPTS=(--only-binary=:all: --implementation cp --python-version 3.11
	--platform manylinux2014_x86_64)
GUEST_LIB=usr/lib/husk
SECONDS=0

log() { echo "guest-image: $*"; }
die() {
	echo "guest-image: error: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, chroot, mknod)"
for tool in mmdebstrap mksquashfs mkfs.ext4 cpio depmod dpkg-deb apt-get chroot flock python3 \
	gcc make bc bison flex openssl xz; do
	command -v "$tool" >/dev/null || die "$tool is missing (make deps installs what the build needs)"
done
BUSYBOX=/bin/busybox
# The list is read whole first: under pipefail, `busybox --list | grep -q` fails
# whenever grep exits at its match before busybox has written the rest (SIGPIPE).
applets=$("$BUSYBOX" --list 2>/dev/null) || applets=""
grep -qx switch_root <<<"$applets" ||
	die "$BUSYBOX (Debian package busybox-static) is missing or has no switch_root"
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked: install busybox-static"

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE=$OUT/cache
mkdir -p "$CACHE"
exec 9>"$OUT/.lock"
flock 9 || die "cannot lock $OUT/.lock"

imagetool() { python3 "$HERE/imagetool.py" "$@"; }
sha() { sha256sum | cut -c1-16; }
list() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$1"; }

if [ -x "$REPO/.venv/bin/python" ]; then PIP=("$REPO/.venv/bin/python" -m pip); else PIP=(python3 -m pip); fi

# --- The slow steps (their results are cached) -----------------------------

# Builds the guest kernel from Debian's source package (pinned in kernel.pin):
# x86_64_defconfig plus kernel.config, which keeps what a pod VM uses and drops
# the rest. Debian's generic kernel left ~30 MiB more of every guest's RAM to
# its own image (BTF, ORC tables, drivers for hardware a VM never has).
# Outputs the same files the image steps take: vmlinuz, vmlinux, config, kver
# and lib/modules/KVER.
build_kernel() {
	local tmp=$KERNEL_DIR.tmp deb tarball src obj kver jobs
	rm -rf "$tmp" && mkdir -p "$tmp/deb" "$tmp/x" "$tmp/out"
	log "downloading $KERNEL_PKG=$KERNEL_VERSION"
	if ! (cd "$tmp/deb" && apt-get download -q -o APT::Sandbox::User=root "$KERNEL_PKG=$KERNEL_VERSION" >/dev/null); then
		log "not in the package lists; running apt-get update once"
		apt-get update -q >/dev/null
		(cd "$tmp/deb" && apt-get download -q -o APT::Sandbox::User=root "$KERNEL_PKG=$KERNEL_VERSION" >/dev/null) ||
			die "Debian's archive no longer serves $KERNEL_PKG=$KERNEL_VERSION: update guest-image/kernel.pin (see its comment)"
	fi
	deb=$(echo "$tmp"/deb/*.deb)
	dpkg-deb -x "$deb" "$tmp/x"
	tarball=$(echo "$tmp"/x/usr/src/linux-source-*.tar.xz)
	[ -f "$tarball" ] || die "$deb has no /usr/src/linux-source-*.tar.xz"
	tar -C "$tmp" -xJf "$tarball"
	rm -rf "$tmp/deb" "$tmp/x"
	src=$(echo "$tmp"/linux-source-*)
	local patch
	for patch in "$HERE"/kernel-patches/*.patch; do
		log "applying kernel-patches/${patch##*/}"
		patch -d "$src" -p1 --forward --quiet <"$patch" || die "kernel-patches/${patch##*/} does not apply to $KERNEL_PKG $KERNEL_VERSION"
	done
	obj=$tmp/obj
	jobs=$(nproc)
	log "configuring the kernel (x86_64_defconfig + kernel.config)"
	make -s -C "$src" O="$obj" x86_64_defconfig >"$tmp/merge.log" 2>&1 || die "x86_64_defconfig failed (see $tmp/merge.log)"
	"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$HERE/kernel.config" >>"$tmp/merge.log" 2>&1 ||
		die "cannot merge kernel.config (see $tmp/merge.log)"
	make -s -C "$src" O="$obj" olddefconfig >>"$tmp/merge.log" 2>&1 || die "olddefconfig failed (see $tmp/merge.log)"
	imagetool kconfig "$HERE/kernel.config" "$obj/.config" || die "kernel.config asks for options olddefconfig dropped (above)"
	log "building the kernel with $jobs jobs (10-20 minutes on two cores)"
	make -s -C "$src" O="$obj" -j"$jobs" bzImage modules >"$tmp/build.log" 2>&1 ||
		{ tail -40 "$tmp/build.log" >&2; die "the kernel build failed (the last lines above)"; }
	make -s -C "$src" O="$obj" INSTALL_MOD_PATH="$tmp/mods" INSTALL_MOD_STRIP=1 modules_install >/dev/null ||
		die "modules_install failed"
	kver=$(ls "$tmp/mods/lib/modules")
	cp "$obj/arch/x86/boot/bzImage" "$tmp/out/vmlinuz"
	# The uncompressed ELF kernel: QEMU boots it via PVH, skipping the decompressor.
	imagetool vmlinux "$tmp/out/vmlinuz" "$tmp/out/vmlinux" || die "cannot unpack the ELF kernel from bzImage"
	cp "$obj/.config" "$tmp/out/config"
	rm -f "$tmp/mods/lib/modules/$kver/build" "$tmp/mods/lib/modules/$kver/source"
	mv "$tmp/mods/lib/modules/$kver" "$tmp/out/$kver"
	echo "$kver" >"$tmp/out/kver"
	rm -rf "$KERNEL_DIR"
	mv "$tmp/out" "$KERNEL_DIR"
	rm -rf "$tmp"
}

# Builds the Debian base root filesystem with mmdebstrap.
build_base() {
	local tmp=$BASE_DIR.tmp
	rm -rf "$tmp" && mkdir -p "$tmp"
	log "mmdebstrap $RELEASE base with $PACKAGES (takes a minute)"
	if ! mmdebstrap "${MM_OPTS[@]}" "$RELEASE" "$tmp/rootfs" "${MIRRORS[@]}" >"$tmp/mmdebstrap.log" 2>&1; then
		tail -n 30 "$tmp/mmdebstrap.log" >&2
		die "mmdebstrap failed (log: $tmp/mmdebstrap.log)"
	fi
	# Leftovers of the build that the read-only guest never uses.
	rm -rf "$tmp/rootfs"/var/cache/apt/* "$tmp/rootfs"/var/lib/apt/lists/* "$tmp/rootfs"/var/log/*
	# busybox's applets fill in the commands Debian's packages do not provide.
	local applet dir
	for applet in $(chroot "$tmp/rootfs" /bin/busybox --list); do
		for dir in usr/bin usr/sbin usr/local/bin; do
			[ -e "$tmp/rootfs/$dir/$applet" ] && continue 2
		done
		ln -s /usr/bin/busybox "$tmp/rootfs/usr/local/bin/$applet"
	done
	dpkg-query --admindir="$tmp/rootfs/var/lib/dpkg" -W -f='${Package} ${Version}\n' >"$tmp/packages.txt"
	rm -rf "$BASE_DIR"
	mv "$tmp" "$BASE_DIR"
}

# Installs the pinned wheels for the guest's Python.
build_site() {
	local tmp=$SITE_DIR.tmp
	rm -rf "$tmp" && mkdir -p "$tmp"
	log "pip: ${PINS[*]} for the guest"
	"${PIP[@]}" install -q --disable-pip-version-check --no-compile --target "$tmp/site" \
		"${PIP_TARGET_OPTS[@]}" "${PINS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
	[ -d "$tmp/site/grpc" ] && [ -d "$tmp/site/google/protobuf" ] || die "pip did not install ${PINS[*]}"
	rm -rf "$tmp/site/bin"
	rm -rf "$SITE_DIR"
	mv "$tmp" "$SITE_DIR"
}

# --- Inputs and cache keys -------------------------------------------------

read -r KERNEL_PKG KERNEL_VERSION < <(list "$HERE/kernel.pin") ||
	die "$HERE/kernel.pin has no 'PACKAGE VERSION' line"
[ -n "${KERNEL_VERSION:-}" ] || die "$HERE/kernel.pin: expected 'PACKAGE VERSION'"
mapfile -t MIRRORS < <(imagetool mirrors "$RELEASE") || die "cannot find the Debian mirror in the apt configuration"
[ ${#MIRRORS[@]} -gt 0 ] || die "no Debian mirror in the apt configuration"
PACKAGES=$(list "$HERE/packages.txt" | tr -s ' \n' ',,' | sed 's/,$//')
mapfile -t PINS < <(imagetool pins "$REPO/requirements.lock" "${PIP_PACKAGES[@]}") ||
	die "cannot read the ${PIP_PACKAGES[*]} pins from requirements.lock"
[ ${#PINS[@]} -eq ${#PIP_PACKAGES[@]} ] || die "cannot read the ${PIP_PACKAGES[*]} pins from requirements.lock"

MM_OPTS=(
	--variant=essential
	--include="$PACKAGES"
	--aptopt='APT::Install-Recommends "false"'
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
	# Documentation, manuals and translations never reach the image.
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-exclude=/usr/share/lintian/*'
)

KERNEL_KEY=$(printf '%s\n' "$KERNEL_PKG" "$KERNEL_VERSION" "$(declare -f build_kernel)" |
	cat - "$HERE/kernel.config" "$HERE"/kernel-patches/*.patch | sha)
BASE_KEY=$(printf '%s\n' "$RELEASE" "${MIRRORS[@]}" "${MM_OPTS[@]}" "$(declare -f build_base)" | sha)
SITE_KEY=$(printf '%s\n' "${PINS[@]}" "${PIP_TARGET_OPTS[@]}" "$(declare -f build_site)" | sha)
# shim/__init__.py (the husk version) and shim/ops/imageid.py write manifest lines.
TREES_KEY=$(imagetool hash --root "$REPO" agent proto guest-image shim/__init__.py shim/ops/imageid.py) ||
	die "cannot hash the inputs"
INPUTS_KEY=$(printf '%s\n' "$KERNEL_KEY" "$BASE_KEY" "$SITE_KEY" "$TREES_KEY" "$ROOTFS_FORMAT" \
	"${INITRD_COMPRESS[*]}" "$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)" | sha)

if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/rootfs.img" ] &&
	[ -f "$OUT/manifest.txt" ] && [ "$(cat "$OUT/.inputs" 2>/dev/null)" = "$INPUTS_KEY" ]; then
	log "up to date in $OUT (no input changed)"
	exit 0
fi
rm -f "$OUT/.inputs"

KERNEL_DIR=$CACHE/kernel-$KERNEL_KEY
BASE_DIR=$CACHE/base-$BASE_KEY
SITE_DIR=$CACHE/site-$SITE_KEY

# Drops cache entries of one kind that the current inputs no longer use.
prune() {
	local kind=$1 keep=$2 dir
	for dir in "$CACHE/$kind"-*; do
		[ -e "$dir" ] && [ "$dir" != "$keep" ] && rm -rf "$dir"
	done
	return 0
}

# --- Slow part: reuse the cache or fill it -------------------------------------

if [ -f "$KERNEL_DIR/kver" ]; then
	log "kernel $KERNEL_PKG $KERNEL_VERSION (cached)"
else
	# A failed build keeps its logs, not its ~2 GB of source and objects.
	trap 'rm -rf "$KERNEL_DIR.tmp"/linux-source-* "$KERNEL_DIR.tmp/obj" "$KERNEL_DIR.tmp/mods"' EXIT
	build_kernel
	trap - EXIT
	prune kernel "$KERNEL_DIR"
fi
KVER=$(cat "$KERNEL_DIR/kver")

if [ -f "$BASE_DIR/packages.txt" ]; then
	log "base root filesystem (cached)"
else
	build_base
	prune base "$BASE_DIR"
fi

if [ -d "$SITE_DIR/site" ]; then
	log "python packages ${PINS[*]} (cached)"
else
	build_site
	prune site "$SITE_DIR"
fi

# --- Fast part: the three files ----------------------------------------------

STAGE=$CACHE/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
ROOT=$STAGE/rootfs
INITRD=$STAGE/initrd

case "$ROOTFS_FORMAT" in
squashfs-lz4 | squashfs-zstd | squashfs-none) ROOT_FSTYPE=squashfs ;;
ext4) ROOT_FSTYPE=ext4 ;;
*) die "unknown HUSK_ROOTFS_FORMAT $ROOTFS_FORMAT (squashfs-lz4, squashfs-zstd, squashfs-none, ext4)" ;;
esac

# initramfs: busybox, the modules (with their dependencies), /init.
mkdir -p "$INITRD"/{bin,dev,proc,sys,newroot,etc/husk}
cp "$BUSYBOX" "$INITRD/bin/busybox"
for applet in $("$BUSYBOX" --list); do
	[ "$applet" = busybox ] || ln -s busybox "$INITRD/bin/$applet"
done
mknod -m 600 "$INITRD/dev/console" c 5 1
install -m 0755 "$HERE/initramfs-init.sh" "$INITRD/init"
echo "$ROOT_FSTYPE" >"$INITRD/etc/husk/rootfstype"
imagetool modules --kdir "$KERNEL_DIR/$KVER" --list "$HERE/modules.txt" --dest "$INITRD" 2>&1 ||
	die "cannot assemble the initramfs modules"
(cd "$INITRD" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	"${INITRD_COMPRESS[@]}" >"$STAGE/initrd.img"

# Root filesystem: the cached base plus husk's files.
cp -a "$BASE_DIR/rootfs" "$ROOT"
mkdir -p "$ROOT/$GUEST_LIB"
[ -d "$REPO/proto/gen" ] || die "$REPO/proto/gen is missing (generate it: .venv/bin/python -m proto.generate)"
# agent/ may not exist yet; /sbin/init then reports the missing agent at boot.
packages=(proto)
[ -d "$REPO/agent" ] && packages+=(agent)
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - "${packages[@]}" | tar -C "$ROOT/$GUEST_LIB" -xf -
cp -a "$SITE_DIR/site" "$ROOT/$GUEST_LIB/site"
# The husk version and a hash of the agent sources just packed, for the manifest
# (`husk check` compares them with the husk installed on the node).
mapfile -t IMAGE_ID < <(PYTHONPATH="$REPO" python3 -P -B -m shim.ops.imageid "$ROOT/$GUEST_LIB") ||
	die "cannot hash the packed agent sources"
[ ${#IMAGE_ID[@]} -eq 2 ] || die "cannot hash the packed agent sources"
printf '%s\n' "${PINS[@]}" >"$ROOT/$GUEST_LIB/pins.txt"
cp "$INITRD/etc/husk/modules.load" "$ROOT/$GUEST_LIB/modules.load"
# Modules the kernel loads on demand (a bridge, nftables...): the root's own
# /lib/modules with a modules.dep for its modprobe.
ondemand=$STAGE/ondemand
imagetool modules --kdir "$KERNEL_DIR/$KVER" --list "$HERE/modules-on-demand.txt" --dest "$ondemand" 2>&1 ||
	die "cannot assemble the on-demand modules"
mkdir -p "$ROOT/usr/lib/modules"
cp -a "$ondemand/lib/modules/$KVER" "$ROOT/usr/lib/modules/$KVER"
cp "$KERNEL_DIR/$KVER"/modules.builtin* "$KERNEL_DIR/$KVER/modules.order" "$ROOT/usr/lib/modules/$KVER/"
depmod -b "$ROOT" "$KVER" || die "depmod failed for the on-demand modules"
install -m 0755 "$HERE/selftest.sh" "$ROOT/$GUEST_LIB/selftest.sh"
rm -f "$ROOT/usr/sbin/init"
install -m 0755 "$HERE/rootfs-init.sh" "$ROOT/usr/sbin/init"
# The root is read-only, so bytecode must be in the image. The guest's own
# python compiles it; unchecked-hash pycs skip the per-import source stat.
chroot "$ROOT" /usr/bin/python3 -m compileall -q -f --invalidation-mode unchecked-hash "/$GUEST_LIB" >/dev/null ||
	die "compiling the agent's Python files in the guest root failed"

case "$ROOTFS_FORMAT" in
squashfs-lz4 | squashfs-zstd)
	mksquashfs "$ROOT" "$STAGE/rootfs.img" -noappend -quiet -no-progress -comp "${ROOTFS_FORMAT#squashfs-}" \
		-b 131072 -mkfs-time 0 >/dev/null
	;;
squashfs-none)
	mksquashfs "$ROOT" "$STAGE/rootfs.img" -noappend -quiet -no-progress -noI -noId -noD -noF -noX \
		-b 131072 -mkfs-time 0 >/dev/null
	;;
ext4)
	kib=$(du -sk "$ROOT" | cut -f1)
	inodes=$(find "$ROOT" | wc -l)
	# Room for block/inode overhead only: nothing is ever written to it.
	# 4 KiB blocks (mke2fs picks 1 KiB for small images), no journal and no
	# metadata checksums: the image is never written, and every checksum
	# is crc32c work under TCG.
	mkfs.ext4 -q -F -L husk-root -b 4096 -m 0 -O ^has_journal,^resize_inode,^metadata_csum -N $((inodes + 1024)) \
		-E root_owner=0:0 -d "$ROOT" "$STAGE/rootfs.img" $((kib * 11 / 10 + 8192))K >/dev/null
	;;
esac
# The shim maps the image into the guest as a virtio-pmem device (the guest reads
# it in place, DAX): its size must be whole 128 MiB memory blocks (a hole, no disk).
truncate -s %128M "$STAGE/rootfs.img" || die "cannot pad rootfs.img to 128 MiB"

cp "$KERNEL_DIR/vmlinuz" "$KERNEL_DIR/vmlinux" "$STAGE/"

{
	echo "# husk guest image manifest"
	printf '%s\n' "${IMAGE_ID[@]}"
	echo "kernel: $KERNEL_PKG $KERNEL_VERSION (release $KVER)"
	# shim.ops.imageid reads this (guest_ram = "split" needs virtio-fs-dma-api).
	echo "kernel-patches: $(for p in "$HERE"/kernel-patches/*.patch; do b=${p##*/}; printf '%s ' "${b%.patch}"; done)"
	echo "initramfs: busybox-static $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown), $(wc -l <"$INITRD/etc/husk/modules.load") modules:"
	sed 's/^/  /' "$INITRD/etc/husk/modules.load"
	echo "rootfs: $ROOTFS_FORMAT, Debian $RELEASE ($(wc -l <"$BASE_DIR/packages.txt") packages):"
	sed 's/^/  /' "$BASE_DIR/packages.txt"
	echo "python packages in /$GUEST_LIB/site:"
	for dist in "$ROOT/$GUEST_LIB/site"/*.dist-info; do
		awk -F': ' '$1 == "Name" { n = $2 } $1 == "Version" { v = $2 } END { print "  " n " " v }' "$dist/METADATA"
	done
	echo "inputs: $INPUTS_KEY"
} >"$STAGE/manifest.txt"

for f in vmlinuz vmlinux initrd.img rootfs.img manifest.txt; do
	mv -f "$STAGE/$f" "$OUT/$f"
done
rm -rf "$STAGE"
echo "$INPUTS_KEY" >"$OUT/.inputs"

log "built in ${SECONDS}s:"
for f in vmlinuz vmlinux initrd.img rootfs.img; do
	printf '  %-11s %6s  %s\n' "$f" "$(du -h --apparent-size "$OUT/$f" | cut -f1)" "$OUT/$f"
done
