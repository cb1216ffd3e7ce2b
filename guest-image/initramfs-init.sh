#!/bin/sh
# husk initramfs /init (busybox sh): load the drivers, mount the read-only
# root image, put tmpfs/overlays on the writable places, mount the pseudo
# filesystems and cgroup2, and switch_root into the root image's /sbin/init.
#
# Kernel command line: root=DEV (default /dev/vda), rootfstype=TYPE (default:
# the type the image was built with), rootflags=OPTS (extra mount options, e.g.
# dax for a virtio-pmem root), init=PATH (default /sbin/init),
# husk.debug=1 (on failure open a shell instead of powering off).
# Any failure powers the VM off, so the host sees QEMU exit instead of a hang.

export PATH=/bin
ROOT_DEV=/dev/vda
ROOT_TYPE=$(cat /etc/husk/rootfstype 2>/dev/null)
ROOT_FLAGS=""
NEW_INIT=/sbin/init
NEW_ROOT=/newroot
DEBUG=0
# How long to wait for the root disk to appear (tenths of a second).
ROOT_WAIT_TENTHS=100
# Writable places on the read-only root: plain tmpfs, and overlays whose
# upper layer lives in /run (so the image's /etc and /var stay visible).
TMPFS_DIRS="run tmp"
OVERLAY_DIRS="etc var"

say() { echo "husk-initramfs: $*"; }

fail() {
	say "FATAL: $*"
	if [ "$DEBUG" = 1 ]; then
		say "husk.debug=1: starting a shell (exit it to power off)"
		setsid cttyhack sh || sh
	else
		say "powering off (boot with husk.debug=1 for a shell)"
	fi
	poweroff -f
	# Only reached if poweroff itself failed.
	echo o >/proc/sysrq-trigger
	while :; do sleep 60; done
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev"

read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	root=*) ROOT_DEV=${arg#root=} ;;
	rootfstype=*) ROOT_TYPE=${arg#rootfstype=} ;;
	rootflags=*) ROOT_FLAGS=,${arg#rootflags=} ;;
	init=*) NEW_INIT=${arg#init=} ;;
	husk.debug=1) DEBUG=1 ;;
	esac
done

while read -r mod kind; do
	[ -n "$mod" ] || continue
	if [ "$kind" = optional ]; then
		# e.g. crc32c-intel on a CPU without SSE4.2: the generic one serves.
		insmod "$mod" 2>/dev/null
	else
		insmod "$mod" || fail "cannot load kernel module $mod"
	fi
done </etc/husk/modules.load

tries=0
while [ ! -b "$ROOT_DEV" ]; do
	tries=$((tries + 1))
	[ "$tries" -le "$ROOT_WAIT_TENTHS" ] || fail "root device $ROOT_DEV did not appear (is the virtio-blk disk attached?)"
	sleep 0.1
done

mkdir -p "$NEW_ROOT"
mount -t "${ROOT_TYPE:-auto}" -o "ro$ROOT_FLAGS" "$ROOT_DEV" "$NEW_ROOT" ||
	fail "cannot mount $ROOT_DEV (${ROOT_TYPE:-auto}, ro$ROOT_FLAGS) on $NEW_ROOT"
[ -x "$NEW_ROOT$NEW_INIT" ] || [ -L "$NEW_ROOT$NEW_INIT" ] ||
	fail "$NEW_INIT is missing from the root image on $ROOT_DEV"

for dir in $TMPFS_DIRS; do
	mode=0755
	[ "$dir" = tmp ] && mode=1777
	mount -t tmpfs -o "nosuid,nodev,mode=$mode" tmpfs "$NEW_ROOT/$dir" ||
		fail "cannot mount tmpfs on /$dir"
done
for dir in $OVERLAY_DIRS; do
	rw="$NEW_ROOT/run/husk/rw/$dir"
	mkdir -p "$rw/upper" "$rw/work" || fail "cannot create $rw"
	mount -t overlay -o "lowerdir=$NEW_ROOT/$dir,upperdir=$rw/upper,workdir=$rw/work" \
		"husk-$dir" "$NEW_ROOT/$dir" || fail "cannot mount the overlay on /$dir"
done

# The kernel-facing setup the root's /sbin/init checks for: done here because
# busybox is already in memory, while each exec of a tool from the root image
# costs 0.1-0.3 s under TCG. /sbin/init does whatever is missing.
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fail "cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm || fail "cannot mount /dev/shm"
mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue || fail "cannot mount /dev/mqueue"
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2"
read -r available </sys/fs/cgroup/cgroup.controllers
enable=""
for c in $available; do enable="$enable +$c"; done
echo "$enable" >/sys/fs/cgroup/cgroup.subtree_control || fail "cannot enable cgroup controllers:$enable"
ip link set lo up || fail "cannot bring up the loopback interface"
# What udev would do: /dev/virtio-ports/NAME for each named virtio-serial
# port present now (ports the host adds later are only in /sys/class/virtio-ports).
for port in /sys/class/virtio-ports/*; do
	[ -r "$port/name" ] || continue
	read -r name <"$port/name"
	[ -n "$name" ] || continue
	mkdir -p /dev/virtio-ports
	ln -sf "../${port##*/}" "/dev/virtio-ports/$name"
done

# Moving a mount carries its submounts (/dev/pts, /sys/fs/cgroup) along.
for dir in dev proc sys; do
	mount --move "/$dir" "$NEW_ROOT/$dir" || fail "cannot move /$dir into the root image"
done

exec switch_root "$NEW_ROOT" "$NEW_INIT"
# switch_root replaces this shell; landing here means it failed. /proc has
# moved away, so poweroff through the kernel directly.
echo "husk-initramfs: FATAL: switch_root to $NEW_INIT failed; powering off"
poweroff -f
