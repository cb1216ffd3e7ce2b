"""The shim binary's start/delete actions and Go-style flags."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.gen.containerd.task.v2 import shim_pb2
from shim import manager
from shim.__main__ import UsageError, parse_args
from shim.util.mount import mount, mounts_under


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
        monkeypatch.setattr(manager.subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
        args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "c1", "start"])
        assert manager.start(args) == 0
    assert capsys.readouterr().out == address
    assert (bundle / "address").read_text() == address


def test_delete_cleans_up_without_a_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    run_dir = tmp_path / "sb" / "pod1"
    shared = run_dir / "shared" / "c1" / "rootfs"
    shared.mkdir(parents=True)
    mount("tmpfs", shared, "tmpfs")
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
    assert mounts_under(tmp_path) == []
    assert not (run_dir / "shared" / "c1").exists() and run_dir.exists()
    assert not stale.exists()
