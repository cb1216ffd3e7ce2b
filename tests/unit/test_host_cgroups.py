"""The VM's host processes join the pod's cgroup, and the cgroup goes away with them."""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path, PurePosixPath

import pytest

from shim.cgroups import host
from shim.cgroups.host import (CgroupPathError, SandboxCgroup, _hierarchies, expand_slice,
                               expand_systemd_path)

SANDBOX_ID = "0123456789abcdef" * 4


@pytest.mark.parametrize(("slice_name", "expanded"), [
    ("system.slice", "/system.slice"),
    ("kubepods.slice", "/kubepods.slice"),
    ("kubepods-besteffort.slice", "/kubepods.slice/kubepods-besteffort.slice"),
    ("kubepods-burstable-pod1234.slice",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"),
    ("kubepods-pod12_34.slice", "/kubepods.slice/kubepods-pod12_34.slice"),
    ("a-b-c-d.slice", "/a.slice/a-b.slice/a-b-c.slice/a-b-c-d.slice"),
    ("-.slice", "/"),
])
def test_expand_slice(slice_name: str, expanded: str) -> None:
    assert expand_slice(slice_name) == PurePosixPath(expanded)


@pytest.mark.parametrize("slice_name", [
    "", ".slice", "kubepods", "kubepods.scope", "kubepods.slice.d", "-kubepods.slice",
    "kubepods-.slice", "kubepods--pod1.slice", "kube/pods.slice", "../x.slice", "a..b.slice",
    "kube pods.slice", "kube\npods.slice", "kübepods.slice", "a" * 250 + ".slice",
])
def test_invalid_slices_are_refused(slice_name: str) -> None:
    with pytest.raises(CgroupPathError):
        expand_slice(slice_name)


@pytest.mark.parametrize(("cgroups_path", "expanded"), [
    (f"kubepods-burstable-pod1234.slice:cri-containerd:{SANDBOX_ID}",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/"
     f"cri-containerd-{SANDBOX_ID}.scope"),
    ("kubepods-besteffort-podab_cd.slice:cri-containerd:abc",
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podab_cd.slice/"
     "cri-containerd-abc.scope"),
    ("kubepods-pod1.slice:crio:abc", "/kubepods.slice/kubepods-pod1.slice/crio-abc.scope"),
    (":cri-containerd:abc", "/system.slice/cri-containerd-abc.scope"),  # empty slice
    ("-.slice:husk:abc", "/husk-abc.scope"),
    ("user-1000.slice:x:my-app.slice", "/user.slice/user-1000.slice/my-app.slice"),
])
def test_expand_systemd_path(cgroups_path: str, expanded: str) -> None:
    assert expand_systemd_path(cgroups_path) == PurePosixPath(expanded)
    cgroup = SandboxCgroup.from_spec_path(cgroups_path)
    assert cgroup is not None and cgroup.path == expanded


@pytest.mark.parametrize("cgroups_path", [
    "kubepods.slice:cri-containerd",            # two parts
    "kubepods.slice:cri-containerd:abc:def",    # four parts
    "kubepods:cri-containerd:abc",              # the slice is not a .slice
    "kubepods--x.slice:cri-containerd:abc",     # empty slice component
    "kubepods.slice:cri-containerd:",           # empty name
    "kubepods.slice::abc",                      # empty prefix
    "kubepods.slice:cri-containerd:../../etc",  # climbing out
    "kubepods.slice:cri-containerd:a/b",
    "kubepods.slice:cri/containerd:abc",
    "kubepods.slice:..:abc",
    "kubepods.slice:cri-containerd:a b",
    "kubepods.slice:cri-containerd:-.slice",
    "kubepods.slice:cri-containerd:" + "a" * 250,  # the scope's unit name is too long
])
def test_invalid_systemd_paths_are_skipped(cgroups_path: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CgroupPathError):
        expand_systemd_path(cgroups_path)
    with caplog.at_level(logging.WARNING, logger="shim.cgroups.host"):
        assert SandboxCgroup.from_spec_path(cgroups_path) is None
    assert "invalid systemd cgroup path" in caplog.text


def test_hostile_cgroupfs_paths_are_not_used() -> None:
    assert SandboxCgroup.from_spec_path("") is None
    assert SandboxCgroup.from_spec_path("relative/path") is None
    assert SandboxCgroup.from_spec_path("/") is None
    assert SandboxCgroup.from_spec_path("/kubepods/..") is None
    # ".." cannot climb out of the cgroup tree: the path is normalized first.
    escaped = SandboxCgroup.from_spec_path("/kubepods/../../etc")
    assert escaped is not None and escaped.path == "/etc"


def test_mkdirs_never_follows_a_symlink(tmp_path: Path) -> None:
    hierarchy = tmp_path / "hierarchy"
    outside = tmp_path / "outside"
    hierarchy.mkdir()
    outside.mkdir()
    (hierarchy / "kubepods.slice").symlink_to(outside)
    cgroup = SandboxCgroup("/kubepods.slice/kubepods-pod1.slice/x.scope")
    with pytest.raises(OSError, match="not following"):
        cgroup._mkdirs(hierarchy, PurePosixPath("kubepods.slice/kubepods-pod1.slice/x.scope"))
    assert list(outside.iterdir()) == []
    # A symlink deeper down, below an existing directory.
    (hierarchy / "a").mkdir()
    (hierarchy / "a" / "b").symlink_to(outside)
    with pytest.raises(OSError, match="not following"):
        cgroup._mkdirs(hierarchy, PurePosixPath("a/b/c"))
    assert list(outside.iterdir()) == [] and cgroup._created == []
    with pytest.raises(OSError):
        cgroup._mkdirs(hierarchy, PurePosixPath("a/../../outside"))
    assert list(outside.iterdir()) == []
    cgroup._mkdirs(hierarchy, PurePosixPath("a/n1/n2"))
    assert cgroup._created == [hierarchy / "a" / "n1", hierarchy / "a" / "n1" / "n2"]
    cgroup.remove()
    assert not (hierarchy / "a" / "n1").exists() and (hierarchy / "a").exists()


def _join_and_remove(cgroup: SandboxCgroup, top: str) -> None:
    """Join a sleeper to ``cgroup`` in every hierarchy, then remove what was made."""
    hierarchies = host._hierarchies()
    assert hierarchies and not any((h / top).exists() for h in hierarchies)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cgroup.join([sleeper.pid])
        lines = Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines()
        joined = {line.split(":")[1] for line in lines if line.split(":", 2)[2] == cgroup.path}
        for hierarchy in hierarchies:
            # A v1 line names its controllers ("4:memory:/path"); v2's is "0::/path".
            name = "" if hierarchy == host.CGROUP_ROOT else hierarchy.name
            assert any(name in j.split(",") for j in joined), (hierarchy, lines)
            assert (hierarchy / cgroup.path.lstrip("/")).is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    cgroup.remove()
    assert not any((h / top).exists() for h in hierarchies), "cgroup dirs left behind"


@pytest.mark.skipif(os.geteuid() != 0 or not _hierarchies(), reason="no writable cgroup hierarchy")
def test_join_and_remove_cgroupfs_path() -> None:
    top = f"husk-unit-{secrets.token_hex(3)}"
    cgroup = SandboxCgroup.from_spec_path(f"/{top}/pod1/sandbox")
    assert cgroup is not None
    _join_and_remove(cgroup, top)


@pytest.mark.skipif(os.geteuid() != 0 or not _hierarchies(), reason="no writable cgroup hierarchy")
def test_join_and_remove_systemd_path() -> None:
    top = f"huskunit{secrets.token_hex(3)}"
    cgroup = SandboxCgroup.from_spec_path(
        f"{top}-burstable-pod1234.slice:cri-containerd:{SANDBOX_ID}")
    assert cgroup is not None
    assert cgroup.path == (f"/{top}.slice/{top}-burstable.slice/{top}-burstable-pod1234.slice/"
                           f"cri-containerd-{SANDBOX_ID}.scope")
    _join_and_remove(cgroup, f"{top}.slice")


UNIFIED = Path("/sys/fs/cgroup/unified")


@pytest.mark.skipif(os.geteuid() != 0 or not (UNIFIED / "cgroup.controllers").exists(),
                    reason="no cgroup2 mount of a hybrid host to try v2 on")
def test_join_and_remove_on_cgroup_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hybrid host's cgroup2 mount stands in for a unified host's root."""
    monkeypatch.setattr(host, "CGROUP_ROOT", UNIFIED)
    assert host._hierarchies() == [UNIFIED]
    top = f"huskunit{secrets.token_hex(3)}"
    for path in (f"/{top}/pod1/sandbox", f"{top}-besteffort-pod1.slice:cri-containerd:abc"):
        cgroup = SandboxCgroup.from_spec_path(path)
        assert cgroup is not None
        _join_and_remove(cgroup, top if path.startswith("/") else f"{top}.slice")


@pytest.mark.skipif(os.geteuid() != 0 or not _hierarchies(), reason="no writable cgroup hierarchy")
def test_existing_parents_are_kept() -> None:
    """Only what join() made goes: the kubelet's pod slice stays."""
    top = f"huskunit{secrets.token_hex(3)}"
    hierarchies = _hierarchies()
    pod_slice = PurePosixPath(f"{top}.slice/{top}-pod1.slice")
    kubelet = SandboxCgroup(f"/{pod_slice}")
    for h in hierarchies:
        kubelet._mkdirs(h, pod_slice)
    try:
        cgroup = SandboxCgroup.from_spec_path(f"{top}-pod1.slice:cri-containerd:abc")
        assert cgroup is not None
        cgroup.join([])
        assert all((h / pod_slice / "cri-containerd-abc.scope").is_dir() for h in hierarchies)
        cgroup.remove()
        assert all((h / pod_slice).is_dir() for h in hierarchies)
        assert not any((h / pod_slice / "cri-containerd-abc.scope").exists()
                       for h in hierarchies)
    finally:
        kubelet.remove()
    assert not any((h / f"{top}.slice").exists() for h in hierarchies)


# In a fresh process (it moves itself): write 16 MiB into a memfd while charging the
# pod's cgroup, then report that cgroup's memory usage and where the process is after.
CHARGE_AND_REPORT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from shim.cgroups import host
    from shim.cgroups.host import SandboxCgroup

    cgroup = SandboxCgroup.from_spec_path(sys.argv[1])
    hierarchy, own_before = host._memory_hierarchy()
    fd = os.memfd_create("charged")
    with cgroup.charging_memory():
        os.write(fd, b"\\1" * (16 << 20))
    _, own_after = host._memory_hierarchy()
    target = hierarchy / cgroup.path.lstrip("/")
    usage = target / ("memory.current" if hierarchy == host.CGROUP_ROOT and
                      (hierarchy / "cgroup.controllers").exists() else "memory.usage_in_bytes")
    print(json.dumps({"usage": int(usage.read_text()), "before": own_before, "after": own_after}))
    os.close(fd)
    cgroup.remove()
""")


@pytest.mark.skipif(os.geteuid() != 0 or host._memory_hierarchy() is None,
                    reason="no writable memory cgroup")
def test_memory_written_while_charging_is_the_pods() -> None:
    """The guest RAM the shim writes for a restored VM is charged to the pod's cgroup,
    and the shim goes back to its own cgroup after."""
    top = f"huskunit{secrets.token_hex(3)}"
    out = subprocess.run([sys.executable, "-c", CHARGE_AND_REPORT, f"/{top}/pod1/sandbox"],
                         check=True, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    report = json.loads(out)
    assert report["usage"] >= 16 << 20, report
    assert report["after"] == report["before"], report
    memory = host._memory_hierarchy()
    assert memory is not None and not (memory[0] / top).exists(), "cgroup left behind"


# The move back after the copy fails once (as a kernel refusing it would): the
# process stays in the pod's cgroup, and remove() moves it back before removing.
STUCK_THEN_REMOVE = textwrap.dedent("""
    import json, sys
    from shim.cgroups import host
    from shim.cgroups.host import SandboxCgroup

    real_move, refused = host._move_self, []
    def move_refused_once(cgroup):
        if not refused:
            refused.append(cgroup)
            return False
        return real_move(cgroup)
    host._move_self = move_refused_once
    cgroup = SandboxCgroup.from_spec_path(sys.argv[1])
    _, before = host._memory_hierarchy()
    with cgroup.charging_memory():
        pass
    _, stuck = host._memory_hierarchy()
    cgroup.remove()
    _, after = host._memory_hierarchy()
    print(json.dumps({"before": before, "stuck": stuck, "after": after}))
""")


@pytest.mark.skipif(os.geteuid() != 0 or host._memory_hierarchy() is None,
                    reason="no writable memory cgroup")
def test_remove_takes_the_shim_out_of_the_pods_memory_cgroup_first() -> None:
    top = f"huskunit{secrets.token_hex(3)}"
    out = subprocess.run([sys.executable, "-c", STUCK_THEN_REMOVE, f"/{top}/pod1/sandbox"],
                         check=True, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    report = json.loads(out)
    assert report["stuck"] == f"/{top}/pod1/sandbox", report
    assert report["after"] == report["before"], report
    memory = host._memory_hierarchy()
    assert memory is not None and not (memory[0] / top).exists(), "cgroup left behind"


@pytest.mark.skipif(os.geteuid() != 0 or host._memory_hierarchy() is None,
                    reason="no writable memory cgroup")
def test_memory_headroom_is_the_tightest_limit_above() -> None:
    top = f"huskunit{secrets.token_hex(3)}"
    memory = host._memory_hierarchy()
    assert memory is not None
    pod = memory[0] / top / "pod1"
    pod.mkdir(parents=True)
    try:
        cgroup = SandboxCgroup.from_spec_path(f"/{top}/pod1/sandbox")  # not made yet
        assert cgroup is not None
        assert cgroup.memory_headroom() is None, "no limit anywhere above"
        limit_file = "memory.max" if memory[0] == host.CGROUP_ROOT else "memory.limit_in_bytes"
        (pod / limit_file).write_text(str(64 << 20))
        headroom = cgroup.memory_headroom()
        assert headroom is not None and (60 << 20) < headroom <= (64 << 20), headroom
    finally:
        pod.rmdir()
        pod.parent.rmdir()



@pytest.mark.skipif(os.geteuid() != 0 or not _hierarchies(), reason="no writable cgroup hierarchy")
def test_a_parent_another_pod_now_uses_is_left_at_once() -> None:
    """remove() does not wait on a parent it made that holds another pod's cgroup
    (it used to retry for a second per hierarchy, and the pod's Delete outlasted
    containerd's patience)."""
    top = f"huskunit{secrets.token_hex(3)}"
    hierarchies = _hierarchies()
    ours = SandboxCgroup.from_spec_path(f"/{top}/pod1/sandbox")
    assert ours is not None
    ours.join([])
    other = SandboxCgroup(f"/{top}/pod2")
    for h in hierarchies:
        other._mkdirs(h, PurePosixPath(top) / "pod2")
    try:
        began = time.monotonic()
        ours.remove()
        assert time.monotonic() - began < 0.5 * len(hierarchies) / 4, "waited on the parent"
        assert all((h / top / "pod2").is_dir() for h in hierarchies)
        assert not any((h / top / "pod1").exists() for h in hierarchies)
    finally:
        for h in hierarchies:
            (h / top / "pod2").rmdir()
            if (h / top).exists():
                (h / top).rmdir()
