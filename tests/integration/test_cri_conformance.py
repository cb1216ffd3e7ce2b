"""What critest checks, reproduced in seconds (the full suite is `make critest`).

Each test stands for one or more critest specs husk used to fail; runc passes
them all on the same containerd.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api

from tests.cri.cri import CriClient
from tests.cri.images import BUSYBOX_REF
from tests.cri.harness import mounts_under

pytestmark = [pytest.mark.cri, pytest.mark.timeout(600)]

# critest's stop specs fail after 60 s; runc stops such a container at once.
PROMPT_STOP_S = 10.0


@pytest.mark.parametrize("handler", ["runc", "husk"])
def test_a_pod_shared_pid_namespace_has_an_init_of_its_own(cri: CriClient, handler: str) -> None:
    """critest "runtime should support removing stopped container", "Idempotence
    StopContainer ... already stopped", "PodPID": in a pod whose PID mode is POD (what a
    config that says nothing gets), `sh` is not PID 1, so SIGTERM ends it at once, and
    the pod's containers see each other's processes."""
    pod = cri.run_pod(f"podpid-{handler}", handler=handler, pid_mode=api.NamespaceMode.POD)
    top = cri.create_container(pod, BUSYBOX_REF, ["sh", "-c", "top"],
                               pid_mode=api.NamespaceMode.POD)
    cri.start_container(top)
    started = time.monotonic()
    cri.stop_container(top, timeout=60)
    assert time.monotonic() - started < PROMPT_STOP_S, "SIGTERM was dropped: sh is an init"
    assert cri.container_status(top).exit_code != 137
    first = cri.run_container(pod, BUSYBOX_REF, ["sleep", "1001"], pid_mode=api.NamespaceMode.POD)
    second = cri.run_container(pod, BUSYBOX_REF, ["sleep", "1002"],
                               pid_mode=api.NamespaceMode.POD)
    assert "sleep 1001" in cri.exec_sync(second, ["ps", "-o", "args"]).out
    assert "sleep 1002" in cri.exec_sync(first, ["ps", "-o", "args"]).out
    assert cri.exec_sync(first, ["sh", "-c", "echo $$"]).out.strip() != "1"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


@pytest.mark.parametrize("handler", ["runc", "husk"])
def test_containers_of_a_pod_keep_their_own_pid_namespaces(cri: CriClient, handler: str) -> None:
    """The kubelet's default (CONTAINER): each container its own PID namespace."""
    pod = cri.run_pod(f"ctrpid-{handler}", handler=handler)
    first = cri.run_container(pod, BUSYBOX_REF, ["sleep", "1001"])
    second = cri.run_container(pod, BUSYBOX_REF, ["sleep", "1002"])
    assert "sleep 1001" not in cri.exec_sync(second, ["ps", "-o", "args"]).out
    assert cri.exec_sync(first, ["cat", "/proc/1/cmdline"]).out == "sleep\x001001\x00"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


@pytest.mark.parametrize("handler", ["runc", "husk"])
def test_read_only_is_not_recursive(cri: CriClient, handler: str, tmp_path: Path) -> None:
    """critest "should support non-recursive readonly mounts": a tmpfs below a read-only
    host-path volume stays writable in the container."""
    volume = tmp_path / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    import subprocess
    subprocess.run(["mount", "-t", "tmpfs", "none", str(volume / "tmpfs")], check=True)
    try:
        pod = cri.run_pod(f"nonrro-{handler}", handler=handler)
        cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[
            api.Mount(container_path="/mnt", host_path=str(volume), readonly=True,
                      propagation=api.MountPropagation.PROPAGATION_PRIVATE)])
        assert cri.exec_sync(cid, ["touch", "/mnt/tmpfs/file"]).exit_code == 0, \
            "the tmpfs below the read-only volume is read-only"
        assert cri.exec_sync(cid, ["touch", "/mnt/file"]).exit_code != 0, \
            "the read-only volume is writable"
        assert (volume / "tmpfs" / "file").exists()
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
    finally:
        subprocess.run(["umount", "-l", str(volume / "tmpfs")], check=False)
    assert mounts_under(tmp_path) == []


@pytest.mark.parametrize("handler", ["runc", "husk"])
def test_pod_sysctls_are_applied(cri: CriClient, handler: str) -> None:
    """critest "should support safe sysctls" and "unsafe sysctls": the pod's (namespaced)
    sysctls are what its containers see."""
    pod = cri.run_pod(f"sysctl-{handler}", handler=handler,
                      sysctls={"kernel.shm_rmid_forced": "1", "kernel.msgmax": "10000"})
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    out = cri.exec_sync(cid, ["cat", "/proc/sys/kernel/shm_rmid_forced",
                              "/proc/sys/kernel/msgmax"]).out
    assert out.split() == ["1", "10000"]
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def test_a_sysctl_the_guest_kernel_lacks_is_refused(cri: CriClient) -> None:
    from tests.cri.cri import CriError
    with pytest.raises(CriError) as exc:
        cri.run_pod("sysctl-bad", handler="husk", sysctls={"net.no_such.thing": "1"})
    assert "does not exist in the guest kernel" in str(exc.value)
    cri.remove_all_pods()


def test_a_privileged_container_gets_the_kernel_features_of_a_node(cri: CriClient) -> None:
    """critest "Privileged is true" and "adding capability": `brctl addbr` needs the
    bridge module, which the guest kernel loads on demand from its root filesystem."""
    pod = cri.run_pod("privileged-husk", handler="husk", privileged=True)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], privileged=True)
    result = cri.exec_sync(cid, ["sh", "-c", "brctl addbr foobar && ip link show foobar"])
    assert result.exit_code == 0 and "foobar" in result.out, result
    # The module came from the guest's root filesystem, not the host's kernel.
    assert "bridge" in cri.exec_sync(cid, ["cat", "/proc/modules"]).out
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


@pytest.mark.parametrize("handler", ["runc", "husk"])
def test_the_host_can_remove_a_volume_the_pod_still_uses(cri: CriClient, handler: str,
                                                         tmp_path: Path) -> None:
    """critest's non-recursive readonly spec cleans its host path up while the pod
    runs: the tmpfs below it must not be pinned by a mount in the host's namespace."""
    import subprocess
    volume = tmp_path / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(volume / "tmpfs")], check=True)
    pod = cri.run_pod(f"rmvol-{handler}", handler=handler)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[
        api.Mount(container_path="/mnt", host_path=str(volume), readonly=True)])
    assert cri.exec_sync(cid, ["touch", "/mnt/tmpfs/file"]).exit_code == 0
    subprocess.run(["umount", "-l", str(volume / "tmpfs")], check=True)
    import shutil
    shutil.rmtree(volume)  # EBUSY if a host-namespace mount sits on volume/tmpfs
    assert not volume.exists()
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
