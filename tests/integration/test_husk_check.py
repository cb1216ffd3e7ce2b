"""``husk check`` and ``husk env`` on this machine, as an operator runs them (no VM boots).

containerd's own config here does not register husk (the CRI tests run a private
containerd), so each test points --containerd-config at one that does, as a node
installed by the README would have.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shim import __version__
from tests.conftest import write_test_config

HUSK = [sys.executable, "-m", "shim.cli"]
# The checks run a few --version queries and, with KVM, one paused QEMU (10 s at most).
CHECK_TIMEOUT_S = 120


def _containerd_config(tmp_path: Path, husk_config: Path) -> Path:
    path = tmp_path / "containerd.toml"
    path.write_text(f'''version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
  pod_annotations = ["io.husk.*"]
  privileged_without_host_devices = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
    ConfigPath = "{husk_config}"
''')
    return path


def _husk(husk_config: Path, containerd_config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # containerd would find the shim beside this Python (the venv's bin).
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return subprocess.run([*HUSK, "--config", str(husk_config), *args, "--containerd-config",
                           str(containerd_config)], capture_output=True, text=True,
                          timeout=CHECK_TIMEOUT_S, env={**os.environ, "PATH": path})


def _checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_check_passes_here_and_says_why_tcg(guest_image: Path, tmp_path: Path) -> None:
    husk_config = write_test_config(tmp_path / "husk.toml", tmp_path / "state")
    containerd = _containerd_config(tmp_path, husk_config)
    result = _husk(husk_config, containerd, "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = _checks(result)
    assert all(c["status"] != "fail" for c in checks.values()), checks
    accel = checks["accelerator"]
    if Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        assert accel["status"] in ("pass", "warn")
    else:  # this machine: a nested PVM /dev/kvm, refused by the probe
        assert accel["status"] == "warn", accel
        assert accel["detail"].startswith("TCG: KVM unusable: "), accel
        assert "slower" in accel["detail"] and accel["fix"]
    assert checks["guest-image"]["status"] == "pass", checks["guest-image"]
    assert checks["containerd-config"]["status"] == "pass", checks["containerd-config"]
    human = _husk(husk_config, containerd, "check")
    assert human.returncode == 0 and "pods can run" in human.stdout


def test_check_fails_naming_the_fix_without_qemu(guest_image: Path, tmp_path: Path) -> None:
    husk_config = write_test_config(tmp_path / "husk.toml", tmp_path / "state",
                                    qemu_path=str(tmp_path / "no-such-qemu"))
    result = _husk(husk_config, _containerd_config(tmp_path, husk_config), "check")
    assert result.returncode == 1, result.stdout
    assert "FAIL  qemu" in result.stdout
    assert "fix: apt-get install qemu-system-x86" in result.stdout
    assert "pods cannot run" in result.stdout


def test_check_fails_naming_the_fix_for_a_broken_config(guest_image: Path,
                                                        tmp_path: Path) -> None:
    husk_config = tmp_path / "husk.toml"
    husk_config.write_text("[hypervisor]\nmemory_mib = 64\n")
    result = _husk(husk_config, _containerd_config(tmp_path, husk_config), "check", "--json")
    assert result.returncode == 1
    config = _checks(result)["config"]
    assert config["status"] == "fail" and "memory_mib" in config["detail"]
    assert str(husk_config) in config["fix"]


def test_env_parses_as_the_documented_toml(guest_image: Path, tmp_path: Path) -> None:
    husk_config = write_test_config(tmp_path / "husk.toml", tmp_path / "state", vcpus=2)
    result = _husk(husk_config, _containerd_config(tmp_path, husk_config), "env")
    assert result.returncode == 0, result.stderr
    doc = tomllib.loads(result.stdout)
    assert set(doc) == {"format_version", "husk", "config", "host", "qemu", "virtiofsd",
                        "containerd", "guest"}
    assert doc["format_version"] == 1
    assert doc["husk"]["version"] == __version__
    assert doc["config"]["file"] == str(husk_config)
    assert doc["config"]["hypervisor"]["vcpus"] == 2
    assert doc["config"]["hypervisor"]["guest_dir"] == str(guest_image)
    assert doc["qemu"]["version"].startswith("QEMU emulator version ")
    assert "version" in doc["virtiofsd"]["version"]
    assert doc["containerd"]["version"][0].isdigit()
    assert doc["containerd"]["husk_handlers"] == ["husk"]
    assert doc["host"]["accel"] in ("kvm", "tcg") and doc["host"]["accel_reason"]
    assert doc["host"]["agent_transport"] in ("vsock", "serial")
    guest = doc["guest"]
    assert guest["husk_version"] == __version__
    assert guest["agent_sources"] == guest["agent_sources_installed"]
    assert guest["kernel"].startswith("linux-source-6.1 ")  # built with kernel.config
