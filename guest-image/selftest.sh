#!/bin/sh
# husk guest self-test, run by /sbin/init instead of the agent when the kernel
# command line has husk.selftest=1. It checks what the agent relies on and
# prints one line per check, then "husk-selftest: PASS" or "... FAIL (N)",
# and powers the VM off. guest-image/boottest.py drives it from the host.

HUSK_LIB=/usr/lib/husk
failures=0

ok() { echo "husk-selftest: ok   $*"; }
bad() {
	echo "husk-selftest: FAIL $*"
	failures=$((failures + 1))
}
uptime_s() {
	read -r up _ </proc/uptime
	echo "$up"
}

echo "husk-selftest: init reached, uptime $(uptime_s)s"

# Python, the pinned gRPC/protobuf runtime and the generated API.
if python3 - <<'EOF'; then ok "python imports"; else bad "python imports"; fi
import time
t0 = time.monotonic()
import grpc
import google.protobuf
t1 = time.monotonic()
with open("/proc/uptime") as f:
    up = f.read().split()[0]
print(f"husk-selftest: import grpc, google.protobuf done in {t1 - t0:.2f}s, uptime {up}s")
import sys
print(f"husk-selftest: python {sys.version.split()[0]} grpc {grpc.__version__} "
      f"protobuf {google.protobuf.__version__}")
pins = {}
with open("/usr/lib/husk/pins.txt") as f:
    for line in f:
        name, _, version = line.strip().partition("==")
        pins[name.lower()] = version
assert pins["grpcio"] == grpc.__version__, (pins["grpcio"], grpc.__version__)
assert pins["protobuf"] == google.protobuf.__version__, (pins["protobuf"], google.protobuf.__version__)
from proto.gen import agent_pb2, agent_pb2_grpc
assert agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
try:
    import agent  # noqa: F401  (the agent may not exist yet in early builds)
    print("husk-selftest: agent package imports")
except ModuleNotFoundError as exc:
    print(f"husk-selftest: agent package not importable: {exc}")
EOF

# crun and cgroup2 with the controllers delegated.
if v=$(crun --version 2>&1 | head -n 1); then ok "$v"; else bad "crun --version: $v"; fi
if grep -q '^cgroup2 /sys/fs/cgroup cgroup2 ' /proc/self/mounts; then ok "cgroup2 on /sys/fs/cgroup"; else bad "cgroup2 not mounted"; fi
read -r enabled </sys/fs/cgroup/cgroup.subtree_control
missing=""
for c in cpu memory pids io; do
	case " $enabled " in *" $c "*) ;; *) missing="$missing $c" ;; esac
done
if [ -z "$missing" ]; then ok "controllers: $enabled"; else bad "controllers missing:$missing (have: $enabled)"; fi

# Every required module of the initramfs is loaded.
missing=""
for name in $(sed -n 's|.*/\([^/]*\)\.ko required$|\1|p' $HUSK_LIB/modules.load | tr - _); do
	[ -d "/sys/module/$name" ] || missing="$missing $name"
done
if [ -z "$missing" ]; then ok "modules loaded: $(wc -l <$HUSK_LIB/modules.load) listed"; else bad "modules not loaded:$missing"; fi

# Read-only root, writable places.
if awk '$2 == "/" && $4 ~ /(^|,)ro(,|$)/ { found = 1 } END { exit !found }' /proc/self/mounts; then
	ok "root is read-only"
else
	bad "root is not mounted read-only"
fi
for dir in /run /tmp /etc /var /var/tmp /dev/shm; do
	if touch "$dir/.husk-selftest" && rm "$dir/.husk-selftest"; then :; else bad "$dir is not writable"; fi
done
# Informational: the virtio-serial ports the initramfs linked by name.
echo "husk-selftest: virtio ports: $(ls /dev/virtio-ports 2>/dev/null | tr '\n' ' ')"
if ip -o link show lo | grep -q 'state UNKNOWN\|UP'; then ok "lo is up"; else bad "lo is down"; fi

# A real container: crun with a memory and pids limit, rootfs = the image.
bundle=/run/husk-selftest-bundle
mkdir -p $bundle/rootfs
# pivot_root needs the container root on a mount of its own.
mount --bind -o ro / $bundle/rootfs
python3 - $bundle <<'EOF'
import json, sys
bundle = sys.argv[1]
spec = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                "args": ["/bin/sh", "-c", "echo container says hello; cat /sys/fs/cgroup/memory.max"],
                "env": ["PATH=/usr/bin:/bin"], "noNewPrivileges": True},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "selftest",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
    ],
    "linux": {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup")],
        "cgroupsPath": "/husk-selftest",
        "resources": {"memory": {"limit": 64 << 20}, "pids": {"limit": 64},
                      "cpu": {"shares": 512}},
    },
}
with open(f"{bundle}/config.json", "w") as f:
    json.dump(spec, f)
EOF
# 67108864 = the 64 MiB limit, seen through the container's cgroup namespace.
if out=$(crun run --bundle $bundle husk-selftest 2>&1) && echo "$out" | grep -q 'container says hello' &&
	echo "$out" | grep -qx 67108864; then
	ok "crun ran a container: $(echo "$out" | tr '\n' ' ')"
else
	bad "crun run: $out"
fi
umount $bundle/rootfs
rm -rf $bundle

if [ "$failures" = 0 ]; then
	echo "husk-selftest: PASS (uptime $(uptime_s)s)"
else
	echo "husk-selftest: FAIL ($failures)"
fi
sync
poweroff -f
