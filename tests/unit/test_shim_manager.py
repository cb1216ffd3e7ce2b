"""The shim binary's start/delete actions and Go-style flags."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from proto.gen.containerd.task.v2 import shim_pb2
from shim import manager
from shim.__main__ import UsageError, parse_args
from shim.sandbox import leftovers
from shim.storage.share import SharedDir
from shim.util.mount import mounts_under


def test_go_style_flags() -> None:
    args = parse_args(["-namespace", "k8s.io", "-address=/run/c.sock", "-publish-binary",
                       "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert (args.action, args.namespace, args.address, args.id, args.debug) == (
        "start", "k8s.io", "/run/c.sock", "abc", True)
    assert parse_args(["-debug=false", "-id", "x", "delete"]).debug is False
    with pytest.raises(UsageError, match="unknown flag -bogus"):
        parse_args(["-bogus", "1", "start"])
    with pytest.raises(UsageError, match="needs a value"):
        parse_args(["start", "-id"])
    with pytest.raises(UsageError, match="unknown action"):
        parse_args(["-id", "x", "explode"])


def test_group_and_address_follow_containerd() -> None:
    sandbox = {"io.kubernetes.cri.container-type": "sandbox"}
    container = {"io.kubernetes.cri.container-type": "container",
                 "io.kubernetes.cri.sandbox-id": "pod1"}
    assert manager.group_id("pod1", sandbox) == "pod1"
    assert manager.group_id("c1", container) == "pod1"
    assert manager.group_id("solo", {}) == "solo"
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert manager.socket_address("/run/containerd/containerd.sock", "k8s.io", "pod1") == \
        f"unix:///run/containerd/s/{digest}"


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short socket dir (sun_path limit), removed whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="s", dir="/run"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_second_container_reuses_the_pods_daemon(tmp_path: Path, sockets: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(manager, "SOCKET_DIR", str(sockets))
    address = manager.socket_address("/c.sock", "k8s.io", "pod1")
    path = address.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as daemon:
        daemon.bind(path)
        daemon.listen(1)
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"}}))
        monkeypatch.chdir(bundle)
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
        args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "c1", "start"])
        assert manager.start(args) == 0
    assert capsys.readouterr().out == address
    assert (bundle / "address").read_text() == address


def test_delete_cleans_up_without_a_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    run_dir = tmp_path / "sb" / "pod1"
    share = SharedDir(run_dir)
    share.create()
    image = tmp_path / "image"
    image.mkdir()
    share.bind_rootfs("c1", image)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / manager.RUN_DIR_FILE).write_text(str(run_dir))
    stale = tmp_path / "s" / "dead.sock"
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening: nobody answers
    monkeypatch.setattr(manager, "SOCKET_DIR", str(stale.parent))
    (bundle / manager.ADDRESS_FILE).write_text(f"unix://{stale}")
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "c1",
                       "-bundle", str(bundle), "delete"])
    assert manager.delete(args) == 0
    response = shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out)
    assert response.exit_status == 137 and response.pid != 0
    assert mounts_under(share.mounts_dir / "c1") == []
    assert not (share.mounts_dir / "c1").exists() and run_dir.exists()
    assert not stale.exists()
    # The sandbox's own delete: the rest of the share and the run dir go.
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "pod1",
                       "-bundle", str(bundle), "delete"])
    assert manager.delete(args) == 0
    assert mounts_under(tmp_path) == [] and not run_dir.exists()


def _fake_helper(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([argv0, "-c", "import time; time.sleep(60)", *args],
                            executable=sys.executable)


def test_delete_kills_only_the_processes_it_started(tmp_path: Path) -> None:
    run_dir = tmp_path / "sb" / "pod1"
    run_dir.mkdir(parents=True)
    qemu = _fake_helper("qemu-system-x86_64", "-pidfile", f"{run_dir}/qemu.pid")
    # Its pid file names a process that is not ours: a program of another name...
    stranger = _fake_helper("sleepy", f"{run_dir}/fs.sock")
    # ...and one that merely mentions the pod id is never looked for.
    bystander = _fake_helper("virtiofsd", "--socket-path=/elsewhere/pod1/fs.sock")
    try:
        (run_dir / "qemu.pid").write_text(f"{qemu.pid}\n")
        (run_dir / "virtiofsd.pid").write_text(str(stranger.pid))
        result = leftovers.clean_up(run_dir, "pod1")
        assert result.vm_pid == qemu.pid
        qemu.wait(5)  # psutil may have reaped it already
        assert not psutil.pid_exists(qemu.pid)
        assert stranger.poll() is None and bystander.poll() is None
        assert not run_dir.exists()
    finally:
        for proc in (qemu, stranger, bystander):
            proc.kill()
            proc.wait()


def test_pid_files_are_read_strictly(tmp_path: Path) -> None:
    for text, pid in (("123\n", 123), ("\u00b2", 0), ("1" * 40, 0), ("-5", 0), ("", 0)):
        (tmp_path / "p").write_text(text)
        assert leftovers.read_pid(tmp_path / "p") == pid


def test_group_annotation_must_be_an_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("../../../etc/x", "a/b", "..", "", "x" * 200):
        if bad:
            with pytest.raises(manager.StartError, match="invalid pod id"):
                manager.group_id("c1", {manager.GROUP_LABEL: bad})
    (tmp_path / "config.json").write_text(json.dumps(
        {"annotations": {manager.GROUP_LABEL: "../../../etc/x"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "c1", "start"])
    assert manager.start(args) == 1
    assert "invalid pod id" in capsys.readouterr().err
    assert not (tmp_path / "address").exists()


def test_socket_is_private_and_the_daemon_is_named_like_a_shim(
        sockets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = manager._bind(str(sockets / "x.sock"))
    try:
        assert stat.S_IMODE(os.stat(sockets / "x.sock").st_mode) == 0o600
    finally:
        sock.close()
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "pod1", "start"])
    script = sockets / "containerd-shim-husk-v2"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(manager.sys, "argv", [str(script)])
    argv = manager.daemon_argv(args, "pod1", 7)
    assert argv[0] == str(script) and argv[1:5] == ["-namespace", "k8s.io", "-id", "pod1"]
    assert argv[-1] == "serve" and "-socket" in argv
    monkeypatch.setattr(manager.sys, "argv", ["/some/python/-m"])
    assert manager.daemon_argv(args, "pod1", 7)[:3] == [manager.sys.executable, "-m", "shim"]


@pytest.mark.parametrize("pid, status, ns", [(1, 137, 1_796_000_000_123_456_789), (0, 0, 0),
                                             (2**32 - 1, 255, 5_000_000_000)])
def test_delete_response_is_what_protobuf_reads(pid: int, status: int, ns: int) -> None:
    """delete writes DeleteResponse without protobuf (its import doubles the command's time)."""
    response = shim_pb2.DeleteResponse.FromString(manager.delete_response(pid, status, ns))
    assert (response.pid, response.exit_status, response.exited_at.ToNanoseconds()) == (pid, status, ns)
    expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    expected.exited_at.FromNanoseconds(ns)
    assert manager.delete_response(pid, status, ns) == expected.SerializeToString()


@pytest.mark.parametrize("bundle_names_a_run_dir", [False, True])
def test_delete_imports_neither_protobuf_nor_openssl(tmp_path: Path,
                                                     bundle_names_a_run_dir: bool) -> None:
    """containerd waits for delete twice per pod stop: it imports only what it needs.
    A sandbox's bundle names its run dir; once the daemon has removed it (a clean
    stop) there is nothing to clean up, and nothing of the clean-up is imported."""
    if bundle_names_a_run_dir:
        (tmp_path / manager.RUN_DIR_FILE).write_text(str(tmp_path / "sb" / "c1"))
    code = ("import sys; from shim.__main__ import main; main(['-namespace', 'k8s.io', '-address',"
            f" '/c.sock', '-id', 'c1', '-bundle', {str(tmp_path)!r}, 'delete']);"
            " print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('google', '_hashlib', 'subprocess', 'psutil', 'dataclasses', 'pyroute2')"
            " or m == 'shim.sandbox.leftovers'), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    assert done.stderr.decode().strip() == "[]"
    assert shim_pb2.DeleteResponse.FromString(done.stdout).exit_status == 137
