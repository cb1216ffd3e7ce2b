#!/bin/sh
# husk guest /sbin/init: make sure the kernel-facing setup is in place
# (pseudo filesystems, cgroup2 with controllers delegated, loopback up), then
# exec the agent as PID 1.
#
# The husk initramfs has already done that setup with its resident busybox
# (cheaper under TCG); this script checks with shell builtins only and does
# what is missing, so it also works after another initramfs.
#
# Kernel command line: husk.selftest=1 runs /usr/lib/husk/selftest.sh instead
# of the agent; husk.debug=1 runs the agent as a child and opens a shell on
# the console when it exits. Any failure before the agent starts powers off.

HUSK_LIB=/usr/lib/husk
AGENT_MODULE=agent
SELFTEST=$HUSK_LIB/selftest.sh
# Controllers crun needs in the containers' cgroups; all the kernel has are
# enabled.
CGROUP_REQUIRED="cpu memory pids io"
CGROUP=/sys/fs/cgroup
IFF_UP=1

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
export PYTHONPATH=$HUSK_LIB:$HUSK_LIB/site
# The image is read-only and ships compiled bytecode.
export PYTHONDONTWRITEBYTECODE=1

say() { echo "husk-init: $*"; }

fail() {
	say "FATAL: $*; powering off"
	sync
	poweroff -f
	echo o >/proc/sysrq-trigger
	while :; do sleep 60; done
}

[ -r /proc/self/mounts ] || mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
read -r uptime _ </proc/uptime
say "started (uptime ${uptime}s)"

[ -d /sys/kernel ] || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
[ -c /dev/null ] || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount /dev"
if [ ! -c /dev/pts/ptmx ]; then
	mkdir -p /dev/pts
	mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fail "cannot mount /dev/pts"
fi
if [ ! -d /dev/shm ]; then
	mkdir -p /dev/shm
	mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm || fail "cannot mount /dev/shm"
fi
if [ ! -d /dev/mqueue ]; then
	mkdir -p /dev/mqueue
	mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue || fail "cannot mount /dev/mqueue"
fi
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr

if [ ! -f $CGROUP/cgroup.subtree_control ]; then
	mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 $CGROUP || fail "cannot mount cgroup2 on $CGROUP"
fi
read -r enabled <$CGROUP/cgroup.subtree_control
read -r available <$CGROUP/cgroup.controllers
if [ "$enabled" != "$available" ]; then
	enable=""
	for c in $available; do enable="$enable +$c"; done
	# One write: the kernel applies the whole list or none of it.
	echo "$enable" >$CGROUP/cgroup.subtree_control || fail "cannot enable cgroup controllers:$enable"
	read -r enabled <$CGROUP/cgroup.subtree_control
fi
for c in $CGROUP_REQUIRED; do
	case " $enabled " in *" $c "*) ;; *) fail "cgroup controller $c is not available (have: $enabled)" ;; esac
done

read -r lo_flags </sys/class/net/lo/flags
if [ $((lo_flags & IFF_UP)) = 0 ]; then
	ip link set lo up || fail "cannot bring up the loopback interface"
fi

DEBUG=0
read -r cmdline </proc/cmdline
for arg in $cmdline; do
	case "$arg" in
	husk.selftest=1) exec "$SELFTEST" ;;
	husk.debug=1) DEBUG=1 ;;
	esac
done

[ -f "$HUSK_LIB/$AGENT_MODULE/__main__.py" ] || fail "no agent in the image ($HUSK_LIB/$AGENT_MODULE/__main__.py)"
read -r uptime _ </proc/uptime
say "starting the agent (uptime ${uptime}s)"
if [ "$DEBUG" = 1 ]; then
	/usr/bin/python3 -m $AGENT_MODULE
	say "agent exited with status $?; husk.debug=1: starting a shell (exit it to power off)"
	sh
	poweroff -f
fi
exec /usr/bin/python3 -m $AGENT_MODULE
