"""The VM's host processes join the pod's cgroup, and the cgroup goes away with them."""
from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from shim.cgroups.host import CGROUP_ROOT, SandboxCgroup, _hierarchies


def test_systemd_and_hostile_paths_are_not_used() -> None:
    assert SandboxCgroup.from_spec_path("") is None
    assert SandboxCgroup.from_spec_path("kubepods-besteffort.slice:cri-containerd:abc") is None
    assert SandboxCgroup.from_spec_path("relative/path") is None
    # ".." cannot climb out of the cgroup tree: the path is normalized first.
    escaped = SandboxCgroup.from_spec_path("/kubepods/../../etc")
    assert escaped is not None and escaped.path == "/etc"


@pytest.mark.skipif(not _hierarchies(), reason="no writable cgroup hierarchy")
def test_join_and_remove() -> None:
    top = f"husk-unit-{secrets.token_hex(3)}"
    cgroup = SandboxCgroup.from_spec_path(f"/{top}/pod1/sandbox")
    assert cgroup is not None
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cgroup.join([sleeper.pid])
        membership = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"/{top}/pod1/sandbox" in membership
    finally:
        sleeper.kill()
        sleeper.wait()
    cgroup.remove()
    assert not any((h / top).exists() for h in _hierarchies()), "cgroup dirs left behind"
    assert CGROUP_ROOT.exists()
