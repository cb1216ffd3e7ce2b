"""make demo: a busybox pod in its own VM, through a private containerd's CRI.

Starts containerd (Debian's package) with the husk runtime handler, runs a
pod with runtimeClass handler `husk`, prints what its container saw (a
different kernel than the host's: it ran in a VM; the pod IP CNI gave it),
then removes everything.
"""
from __future__ import annotations

import logging
import platform
import sys
import time

from tests.conftest import write_test_config
from tests.cri.harness import Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

SCRIPT = ("echo \"hello from $(hostname), a husk pod\"; "
          "echo \"kernel inside the pod: $(uname -r)\"; "
          "echo \"memory seen by the pod: $(grep MemTotal /proc/meminfo)\"; "
          "echo \"the pod's network (CNI's, carried into the VM): "
          "$(ip -o -4 addr show eth0 | awk '{print $2, $4}')\"")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with scratch_dirs("demo") as (work, state):
        config = write_test_config(work / "husk.toml", state)
        print("building the busybox and pause images from Debian packages...", flush=True)
        images = build_images()
        with Containerd.started(ContainerdOptions(images=images, husk_config=config)) as cd:
            cri = cd.cri
            print(f"containerd is up ({cd.address}); running a pod with handler 'husk'...",
                  flush=True)
            started = time.monotonic()
            pod = cri.run_pod("husk-demo", handler="husk")
            booted = time.monotonic() - started
            cid = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", SCRIPT])
            status = cri.wait_container_exit(cid, timeout=120)
            log = cri.read_log(cid)
            print(f"pod sandbox ready in {booted:.1f}s (its VM booted), pod IP "
                  f"{cri.pod_status(pod.id).network.ip}; container output:")
            print("    " + log.stdout.rstrip().replace("\n", "\n    "))
            print(f"container exit code: {status.exit_code}; host kernel: {platform.release()}")
            cri.remove_container(cid)
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)
        print("pod removed, VM stopped, containerd stopped: nothing left behind.")
        return 0 if status.exit_code == 0 and "husk pod" in log.stdout and "eth0 10." in log.stdout \
            else 1


if __name__ == "__main__":
    sys.exit(main())
