"""The guest is hostile: attacks from an escaped guest root, against the real shim.

The attacker is a privileged hostPID container in a husk pod: in the guest's
PID namespace, `nsenter -t 1 -m` puts it in the agent's mount namespace, where
the shared directory is mounted and every guest device is. That is a
container that has escaped into the guest, for real. What it cannot do
without a kernel exploit (make the agent lie) it does through the agent's
test hooks, which the `husk-hostile` handler turns on (husk.test_hooks=1 on
the guest's kernel command line; see agent/testhooks.py).

After each attack: no host mount outside the pod changed, nothing was written
outside the pod's run directory, the shim's memory and the pod's files stayed
bounded, the shim log says what happened, and the pod still stops and is
removed cleanly (the `cri` fixture fails a test that leaves anything behind).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import psutil
import pytest

from shim.vm import guestlog
from tests.conftest import GUEST_DIR, HOSTILE_HANDLER
from tests.conftest import HUSK_CRI_STATE as HUSK_STATE
from tests.cri.cri import CriClient, CriError, ExecResult, Pod
from cri_api.v1 import api_pb2 as api
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(900)]

SHIM_LOG_DIR = Path("/var/log/husk")
# The state dirs of test instances and VMs that may run beside this test.
TEST_MOUNTS = ("/husk-cri-", "/husk-test-", "/pytest-of-")
HOOKS = "/run/husk/test-hooks"
GUEST_SHARED = "/run/husk/shared"
# What a flood may cost the shim on top of where it started.
SHIM_RSS_GROWTH_MAX = 64 << 20
# More than the console file's cap: the guest's UART is slow under TCG (a VM
# exit per byte), so not much more.
CONSOLE_FLOOD_BYTES = guestlog.FILE_CAP_BYTES + (256 << 10)


def _mounts() -> set[tuple[str, str]]:
    """(mount id, mount point) of every host mount."""
    with open("/proc/self/mountinfo") as f:
        return {(line.split()[0], line.split()[4]) for line in f}


def _outside(mounts: set[tuple[str, str]], run_dir: Path) -> set[tuple[str, str]]:
    """The mounts that are not this pod's, nor any test instance's (tests run in parallel:
    other pods and VMs come and go under their own state dirs)."""
    return {m for m in mounts
            if not m[1].startswith(f"{run_dir}/") and not any(t in m[1] for t in TEST_MOUNTS)}


class Attacker:
    """Root in the guest: an exec in the privileged hostPID container, moved into
    the agent's mount namespace."""

    def __init__(self, cri: CriClient, pod: Pod) -> None:
        self.cri = cri
        self.pod = pod
        self.cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], privileged=True,
                                     host_pid=True)

    def run(self, script: str, timeout: int = 60) -> ExecResult:
        # Out of the container's cgroup too (its device rules), into the guest's root one.
        escape = ("for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/*/cgroup.procs; do "
                  "echo $$ > $f 2>/dev/null; done; ")
        return self.cri.exec_sync(self.cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c",
                                             escape + script], timeout=timeout)

    def hook(self, command: str) -> None:
        result = self.run(f"echo '{command}' > {HOOKS}")
        assert result.exit_code == 0, f"test hook {command!r}: {result}"

    def hook_later(self, *steps: str) -> None:
        """Run hook commands (and `sleep N` steps) in the background, detached from the exec:
        an exec is itself an agent request, and some hooks stop the agent answering it."""
        body = "; ".join(s if s.startswith("sleep ") else f"echo '{s}' > {HOOKS}" for s in steps)
        result = self.run(f"setsid sh -c \"{body}\" </dev/null >/dev/null 2>&1 &")
        assert result.exit_code == 0, result


def _hostile_pod(cri: CriClient, name: str) -> Pod:
    return cri.run_pod(name, handler=HOSTILE_HANDLER, privileged=True, host_pid=True)


def _run_dir(pod: Pod) -> Path:
    return HUSK_STATE / "sb" / pod.id


def _shim_log(pod: Pod) -> str:
    return (SHIM_LOG_DIR / f"{pod.id}.log").read_text(errors="replace")


def _shim(pod: Pod) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "serve" in cmdline and pod.id in cmdline and any("shim" in a for a in cmdline[:3]):
            return proc
    raise AssertionError(f"no shim process for pod {pod.id}")


def _remove_pod(cri: CriClient, pod: Pod) -> None:
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    assert not _run_dir(pod).exists(), "the pod's run dir survived its removal"


def test_the_share_structure_cannot_be_changed_from_the_guest(cri: CriClient,
                                                              tmp_path: Path) -> None:
    pod = _hostile_pod(cri, "hostile-fs")
    run_dir = _run_dir(pod)
    attacker = Attacker(cri, pod)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data").write_text("host data\n")
    victim = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], mounts=[
        api.Mount(container_path="/data", host_path=str(volume), readonly=True)])
    share = f"{GUEST_SHARED}/{victim}"
    # The attacker really is where virtiofsd's requests come from: it sees the
    # victim's volume and rootfs, and may write inside the rootfs, as the victim may.
    found = attacker.run(f"for v in {share}/volumes/*; do [ -f $v/data ] && echo $v; done")
    data_volume = found.out.strip()
    assert data_volume.startswith(f"{share}/volumes/"), found
    assert attacker.run(f"cat {data_volume}/data").out == "host data\n"
    assert attacker.run(f"touch {share}/rootfs/tmp/mine && echo ok").out == "ok\n"
    before = _mounts()

    # CVE-2020-2024's move: rename the container's share dir away, put a symlink
    # to / in its place, then let the container be removed. And everything else
    # that would change the structure the host mounts into.
    attacks = {
        "swap": f"mv {share} {GUEST_SHARED}/moved && ln -s / {share}",
        "symlink at the next target": f"ln -s /etc {GUEST_SHARED}/next-container",
        "file in the share root": f"echo x > {GUEST_SHARED}/planted",
        "dir in the share root": f"mkdir {GUEST_SHARED}/planted-dir",
        "replace a volume": f"mv {data_volume} {share}/volumes/gone",
        "new volume slot": f"ln -s /etc {share}/volumes/99",
        "remove the rootfs mount point": f"rmdir {share}/rootfs",
        "write a read-only volume": f"echo owned > {data_volume}/data",
    }
    for name, script in attacks.items():
        result = attacker.run(script)
        assert result.exit_code != 0, f"attack {name!r} succeeded: {result}"
        assert "Read-only file system" in result.err or "Device or resource busy" in result.err, \
            f"attack {name!r} failed for another reason: {result}"
    # The attacker shares the guest's PID namespace: the agent, its init, takes no signal.
    attacker.run("kill -TERM 1; kill -INT 1; kill -HUP 1; kill -USR1 1")
    assert cri.exec_sync(victim, ["echo", "agent alive"]).out == "agent alive\n"
    assert (volume / "data").read_text() == "host data\n"
    assert _mounts() >= {m for m in before if m[1].startswith(f"{run_dir}/")}, \
        "an attack changed a mount of the pod"
    assert _outside(_mounts(), run_dir) == _outside(before, run_dir), \
        "an attack changed a host mount"

    # The victim goes: its mounts (and only those) go with it.
    cri.stop_container(victim, timeout=1)
    cri.remove_container(victim)
    after = _mounts()
    assert _outside(after, run_dir) == _outside(before, run_dir), \
        "removing the container changed a mount outside the pod"
    assert not [m for m in after if victim in m[1]], "the victim's mounts survived it"
    assert (volume / "data").read_text() == "host data\n"

    # The next container's mounts are made where the host meant them.
    nxt = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], mounts=[
        api.Mount(container_path="/data", host_path=str(volume), readonly=False)])
    assert cri.exec_sync(nxt, ["sh", "-c", "echo new > /data/new; cat /data/data"]).out == \
        "host data\n"
    assert (volume / "new").read_text() == "new\n"
    assert not list(Path("/etc").glob("planted*")) and not Path("/planted").exists()
    _remove_pod(cri, pod)
    assert _outside(_mounts(), run_dir) <= _outside(before, run_dir) | _outside(after, run_dir)


def test_floods_from_the_guest_are_bounded(cri: CriClient) -> None:
    pod = _hostile_pod(cri, "hostile-flood")
    run_dir = _run_dir(pod)
    attacker = Attacker(cri, pod)
    shim = _shim(pod)
    rss_before = shim.memory_info().rss

    # The serial console: a guest root writes to it directly.
    started = time.monotonic()
    flood = attacker.run(f"head -c {CONSOLE_FLOOD_BYTES} /dev/zero | tr '\\0' x > /dev/ttyS0; "
                         "echo done", timeout=300)
    assert flood.out == "done\n" and not flood.err, flood
    # The agent's log port and its OOM events, through the test hooks.
    attacker.hook("log-flood 100000000")
    attacker.hook(f"oom-flood {attacker.cid} 300000")
    time.sleep(15)
    assert cri.exec_sync(attacker.cid, ["echo", "still here"]).out == "still here\n"

    for name in ("console.log", "guest.log"):
        size = (run_dir / name).stat().st_size
        assert size <= guestlog.FILE_CAP_BYTES, f"{name} grew to {size} bytes"
    assert "dropped" in (run_dir / "console.log").read_text(errors="replace")
    assert "dropped" in (run_dir / "guest.log").read_text(errors="replace")
    growth = shim.memory_info().rss - rss_before
    assert growth < SHIM_RSS_GROWTH_MAX, f"the shim grew by {growth >> 20} MiB"
    text = _shim_log(pod)
    assert "console log: the guest wrote more than" in text
    assert "guestlog log: the guest wrote more than" in text
    assert text.count("the guest's OOM killer took a process") <= 2 + 15 + 60, \
        "one OOM line per event: the log is not bounded"
    assert "OOM events" in text and "suppressed" in text
    assert len(text) < 4 << 20
    _remove_pod(cri, pod)


def test_a_lying_or_silent_agent_is_contained(cri: CriClient) -> None:
    pod = _hostile_pod(cri, "hostile-agent")
    attacker = Attacker(cri, pod)
    victim = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"])
    shim = _shim(pod)
    rss_before = shim.memory_info().rss

    for mode, expected in (("garbage", "agent"), ("oversized", "agent")):
        # The hook waits a second: the exec that starts it must get its own replies.
        attacker.hook_later("sleep 1", f"replies {mode}", "sleep 8", "replies normal")
        time.sleep(2)
        with pytest.raises(CriError) as exc:
            cri.exec_sync(victim, ["echo", "hi"])
        assert expected in str(exc.value), exc.value
        time.sleep(9)
        assert cri.exec_sync(victim, ["echo", "hi"]).out == "hi\n", f"after {mode} replies"
    assert shim.memory_info().rss - rss_before < SHIM_RSS_GROWTH_MAX

    # An agent that stops answering altogether: the keepalive (3 s, 3 misses in
    # this handler's config) declares it dead and the pod's processes exit 255.
    attacker.hook_later("sleep 1", "stall")
    started = time.monotonic()
    status = cri.wait_container_exit(victim, timeout=60)
    assert status.exit_code == 255
    assert time.monotonic() - started < 30
    assert cri.wait_container_exit(attacker.cid, timeout=30).exit_code == 255
    assert "did not answer 3 checks in a row" in _shim_log(pod)
    _remove_pod(cri, pod)


def test_the_root_image_cannot_be_written_from_the_guest(cri: CriClient) -> None:
    """The guest's root is the node's rootfs.img mapped into every VM (virtio-pmem, DAX):
    a guest root writing to that device must change nothing on the host."""
    image = GUEST_DIR / "rootfs.img"
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    pod = _hostile_pod(cri, "hostile-pmem")
    attacker = Attacker(cri, pod)
    root = attacker.run("grep ' / ' /proc/mounts")
    assert root.out.startswith("/dev/pmem0 / ext4 ro,") and "dax" in root.out, root
    # Through the page cache with a flush, and straight to the device (over the
    # superblock). Detached: the guest kernel may hang on it (seen under TCG: the
    # direct write's flush never completes), which is the attacker's own loss.
    result = attacker.run(
        "setsid sh -c 'dd if=/dev/zero of=/dev/pmem0 bs=4096 count=256 seek=64 "
        "conv=notrunc,fsync; dd if=/dev/zero of=/dev/pmem0 bs=4096 count=1 conv=notrunc "
        "oflag=direct; echo written > /run/pmem-attack' </dev/null >/dev/null 2>&1 &")
    assert result.exit_code == 0, result
    time.sleep(10)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, \
        "a guest changed the node's root image"
    # Whatever became of the guest, the pod stops and goes (the fixture checks the rest).
    _remove_pod(cri, pod)


def test_the_guest_kernel_is_locked_down(cri: CriClient) -> None:
    """Root in the guest cannot read the guest kernel's memory nor change its code:
    the guest boots with lockdown=confidentiality (which also spares every guest
    tracefs's ~10 MiB of inodes)."""
    pod = _hostile_pod(cri, "hostile-lockdown")
    attacker = Attacker(cri, pod)
    state = attacker.run("mkdir -p /run/sec && mount -t securityfs none /run/sec && "
                         "cat /run/sec/lockdown; umount /run/sec")
    assert state.exit_code == 0 and "[confidentiality]" in state.out, state
    # Root may read kernel memory through /proc/kcore or /dev/mem on a kernel that is
    # not locked down (CAP_SYS_RAWIO). The guest kernel has no /proc/kcore at all;
    # /dev/mem is made here if missing, so that lockdown is what refuses it.
    for path in ("/proc/kcore", "/dev/mem"):
        read = attacker.run(f"[ -e {path} ] || [ {path} != /dev/mem ] || mknod /dev/mem c 1 1; "
                            f"head -c 4096 {path} > /dev/null")
        assert read.exit_code != 0, (path, read)
        assert "not permitted" in read.err or (
            path == "/proc/kcore" and "No such file" in read.err), (path, read)
    # No trace events for a guest root to attach to.
    tracing = attacker.run("mkdir -p /run/tr && mount -t tracefs none /run/tr && "
                           "ls /run/tr | wc -l; umount /run/tr")
    assert tracing.out.strip() in ("", "0"), tracing
    _remove_pod(cri, pod)
