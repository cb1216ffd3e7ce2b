"""OCI spec validation and rewriting for the guest (agent/spec.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import InvalidArgumentError
from agent.spec import check_absolute_path, check_id, rewrite_process, rewrite_spec


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    (tmp_path / "shared" / "c1" / "rootfs").mkdir(parents=True)
    (tmp_path / "shared" / "c1" / "vol").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "shared"


def base_spec(shared: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "env": ["A=1"], "cwd": "/", "terminal": False,
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
                    "apparmorProfile": "p", "selinuxLabel": "l",
                    "capabilities": {"bounding": ["CAP_KILL"]}, "noNewPrivileges": True,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 10}]},
        "root": {"path": str(shared / "c1" / "rootfs")},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "hooks": {"createRuntime": [{"path": "/usr/bin/hook"}]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                           {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}],
            "cgroupsPath": "kubepods-besteffort:cri-containerd:abc",
            "mountLabel": "system_u", "resources": {"pids": {"limit": 10}},
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"},
            "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
        },
    }
    spec.update(overrides)
    return spec


def rewrite(shared: Path, spec: dict[str, Any] | str, volumes: tuple[str, ...] = ()) -> dict[str, Any]:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return rewrite_spec(text, container_id="c1", shared_root=str(shared), volume_roots=volumes,
                        cgroup_parent="husk")


def test_rewrite_drops_host_parts_and_keeps_the_rest(shared: Path) -> None:
    out = rewrite(shared, base_spec(shared))
    assert "hooks" not in out
    # The pod's IPC namespace (a host path) becomes the guest's own; network is dropped.
    assert out["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "ipc", "path": f"/proc/{os.getpid()}/ns/ipc"},
        {"type": "mount"}]
    assert out["linux"]["cgroupsPath"] == "/husk/c1"
    assert "mountLabel" not in out["linux"]
    # Sharing the pod's PID namespace (a host path) means the guest's.
    shared_pid = base_spec(shared)
    shared_pid["linux"]["namespaces"][0] = {"type": "pid", "path": "/proc/42/ns/pid"}
    assert rewrite(shared, shared_pid)["linux"]["namespaces"][0] == {
        "type": "pid", "path": f"/proc/{os.getpid()}/ns/pid"}
    proc = out["process"]
    assert "apparmorProfile" not in proc and "selinuxLabel" not in proc
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [5]}
    assert proc["env"] == ["A=1"] and proc["noNewPrivileges"] is True
    assert proc["rlimits"][0]["hard"] == 10 and proc["capabilities"] == {"bounding": ["CAP_KILL"]}
    for key in ("resources", "seccomp", "maskedPaths", "readonlyPaths"):
        assert out["linux"][key] == base_spec(shared)["linux"][key]
    assert out["root"]["path"] == str((shared / "c1" / "rootfs").resolve())


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    (json.dumps({"root": {"path": "/x"}}), "process must be a JSON object"),
    (json.dumps({"process": {"args": []}, "root": {"path": "/x"}}), "must not be empty"),
    (json.dumps({"process": {"args": "sh"}, "root": {"path": "/x"}}), "list of strings"),
    (json.dumps({"process": {"args": ["sh", None]}, "root": {"path": "/x"}}), "list of strings"),
    (json.dumps({"process": {"args": ["sh"]}}), "root must be a JSON object"),
    (json.dumps({"process": {"args": ["sh"]}, "root": {}}), "root.path must be an absolute"),
    (json.dumps({"process": {"args": ["sh"]}, "root": {"path": "rootfs"}}), "absolute"),
    (json.dumps({"process": {"args": ["sh"], "user": {"uid": -1}}, "root": {"path": "/x"}}),
     "non-negative"),
])
def test_malformed_specs(shared: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        rewrite(shared, text)


@pytest.mark.parametrize("root", ["../outside", "c1/../../outside", "/etc", "", "."])
def test_root_path_must_stay_in_the_shared_mount(shared: Path, root: str) -> None:
    path = str(shared / root) if root else str(shared)
    with pytest.raises(InvalidArgumentError, match="path escaping the rootfs"):
        rewrite(shared, base_spec(shared, root={"path": path}))
    out = rewrite(shared, base_spec(shared, root={"path": f"{shared}/c1/./x/../rootfs"}))
    assert out["root"]["path"] == str((shared / "c1" / "rootfs").resolve())


def test_root_path_symlink_escape(shared: Path) -> None:
    (shared / "c1" / "escape").symlink_to("/")
    with pytest.raises(InvalidArgumentError, match="path escaping the rootfs"):
        rewrite(shared, base_spec(shared, root={"path": str(shared / "c1" / "escape")}))
    (shared / "c1" / "ok").symlink_to(shared / "c1" / "rootfs")
    out = rewrite(shared, base_spec(shared, root={"path": str(shared / "c1" / "ok")}))
    assert out["root"]["path"] == str((shared / "c1" / "rootfs").resolve())


@pytest.mark.parametrize("destination", ["data", "/a/../b", "/a/./b", "/a//b", "/a/", 5])
def test_mount_destinations_absolute_and_normalized(shared: Path, destination: Any) -> None:
    mounts = [{"destination": destination, "type": "tmpfs", "source": "tmpfs"}]
    with pytest.raises(InvalidArgumentError):
        rewrite(shared, base_spec(shared, mounts=mounts))


def test_bind_sources(shared: Path, tmp_path: Path) -> None:
    def bind(source: str, kind: str = "bind") -> dict[str, Any]:
        return {"destination": "/data", "type": kind, "source": source, "options": ["rbind"]}

    # Inside the shared mount, a container volume, or a well-known guest path: fine.
    out = rewrite(shared, base_spec(shared, mounts=[bind(str(shared / "c1" / "vol"))]))
    assert out["mounts"][0]["source"] == str((shared / "c1" / "vol").resolve())
    vol = tmp_path / "blockvol"
    vol.mkdir()
    rewrite(shared, base_spec(shared, mounts=[bind(str(vol))]), volumes=(str(vol),))
    for ok in ("/dev", "/dev/fuse", "/sys/fs/cgroup", "/proc"):
        rewrite(shared, base_spec(shared, mounts=[bind(ok)]))
    # Sourceless filesystems need no check.
    rewrite(shared, base_spec(shared, mounts=[
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}]))
    # Anything else is rejected, also through a symlink and with type "none".
    (shared / "c1" / "link").symlink_to(tmp_path / "outside")
    for bad in (str(tmp_path / "outside"), str(shared / "c1" / "link"), "/etc", "/proc/1/root",
                str(shared / ".." / "outside"), "relative"):
        with pytest.raises(InvalidArgumentError):
            rewrite(shared, base_spec(shared, mounts=[bind(bad)]))
        with pytest.raises(InvalidArgumentError):
            rewrite(shared, base_spec(shared, mounts=[bind(bad, "none")]))


def test_exec_process() -> None:
    proc = rewrite_process(json.dumps({"args": ["ls"], "apparmorProfile": "x", "terminal": True}))
    assert proc == {"args": ["ls"], "terminal": True, "cwd": "/"}
    for bad in ("{}", '{"args": [1]}', '{"args": ["ls"], "cwd": "rel"}',
                '{"args": ["ls"], "terminal": "yes"}', "null"):
        with pytest.raises(InvalidArgumentError):
            rewrite_process(bad)


def test_ids_and_paths() -> None:
    assert check_id("container id", "abc-1.2_3") == "abc-1.2_3"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129):
        with pytest.raises(InvalidArgumentError):
            check_id("container id", bad)
    assert check_absolute_path("/", "p") == "/"
    with pytest.raises(InvalidArgumentError):
        check_absolute_path("/a\0b", "p")


def test_sysctls_are_written_below_proc_sys_only(tmp_path: Path) -> None:
    from agent.errors import InvalidArgumentError as Invalid
    from agent.sandbox import apply_sysctls
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "shm_rmid_forced").write_text("0\n")
    (tmp_path / "net").mkdir()
    os.symlink("/etc/hostname", tmp_path / "net" / "evil")
    apply_sysctls({"kernel.shm_rmid_forced": "1"}, tmp_path)
    assert (tmp_path / "kernel" / "shm_rmid_forced").read_text() == "1"
    for bad, message in (({"kernel.nope": "1"}, "does not exist in the guest kernel"),
                         ({"..kernel.x": "1"}, "invalid sysctl name"),
                         ({"kernel": "1"}, "invalid sysctl name"),
                         ({"kernel.shm_rmid_forced": "1\n2"}, "invalid value"),
                         ({"net.evil": "x"}, "cannot be set")):
        with pytest.raises(Invalid, match=message):
            apply_sysctls(bad, tmp_path)


@pytest.mark.parametrize("version, given", [
    ("1.0.2-dev", "1.0.2-dev"),  # containerd 1.6: crun takes it as it is
    ("1.1.0", "1.1.0"),          # containerd 1.7: contains "1.0", crun takes it too
    ("1.2.1", "1.0.2"),          # containerd 2.0/2.1
    ("1.3.0", "1.0.2"),          # containerd 2.3
    ("2.0.0", "2.0.0"),          # not 1.x: crun's own refusal says so
])
def test_a_newer_spec_version_is_one_crun_accepts(shared: Path, version: str, given: str) -> None:
    assert rewrite(shared, base_spec(shared, ociVersion=version))["ociVersion"] == given
    assert "ociVersion" not in rewrite(shared, {k: v for k, v in base_spec(shared).items()
                                                if k != "ociVersion"})


@pytest.mark.parametrize("path, value", [
    (("process", "scheduler"), {"policy": "SCHED_FIFO", "priority": 1}),
    (("process", "ioPriority"), {"class": "IOPRIO_CLASS_IDLE"}),
    (("linux", "timeOffsets"), {"monotonic": {"secs": 10}}),
    (("linux", "resources", "cpu", "burst"), 1000),
])
def test_a_newer_spec_using_what_crun_would_ignore_is_refused(
        shared: Path, path: tuple[str, ...], value: Any) -> None:
    spec = base_spec(shared, ociVersion="1.3.0")
    parent = spec
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    parent[path[-1]] = value
    with pytest.raises(InvalidArgumentError, match=f"sets {'.'.join(path)}, which the guest's crun"):
        rewrite(shared, spec)
    # The same field in a spec crun's version check lets through is not ours to judge.
    spec["ociVersion"] = "1.1.0"
    assert rewrite(shared, spec)["ociVersion"] == "1.1.0"
    # Present but empty sets nothing.
    parent[path[-1]] = {}
    spec["ociVersion"] = "1.3.0"
    assert rewrite(shared, spec)["ociVersion"] == "1.0.2"
