"""The KVM/TCG choice: forced modes, the module check, the cached probe."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import psutil
import pytest

from shim.vm import accel
from shim.vm.accel import Accel, _kvm_device_problem, choose_accel

HAS_KVM_DEVICE = os.access(accel.KVM_DEVICE, os.R_OK | os.W_OK)


async def test_forced_modes_skip_the_probe(tmp_path: Path) -> None:
    assert (await choose_accel("tcg", "/nonexistent/qemu", tmp_path)).accel is Accel.TCG
    kvm = await choose_accel("kvm", "/nonexistent/qemu", tmp_path)
    assert kvm.accel is Accel.KVM and "forced" in kvm.reason
    assert kvm.qemu_args(8)[:2] == ["-accel", "kvm"]


async def test_the_tcg_buffer_leaves_the_running_vcpu_the_same_room(tmp_path: Path) -> None:
    """Each idle possible vCPU holds a region: 8 of them got 64 MiB (50 for the running one)."""
    tcg = await choose_accel("tcg", "/nonexistent/qemu", tmp_path)
    assert tcg.qemu_args(8)[:2] == ["-accel", "tcg,tb-size=64"]
    assert tcg.qemu_args(2)[1] == "tcg,tb-size=52"
    assert tcg.qemu_args(1)[1] == "tcg,tb-size=50"


@pytest.mark.skipif(not HAS_KVM_DEVICE, reason="needs a /dev/kvm to talk to")
def test_paravirtual_kvm_module_is_recognised(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm_pvm").mkdir()
    problem = _kvm_device_problem(tmp_path)
    assert problem is not None and "kvm_pvm" in problem
    (tmp_path / "kvm_intel").mkdir()
    assert _kvm_device_problem(tmp_path) is None


async def test_this_host_gets_a_working_choice(tmp_path: Path) -> None:
    choice = await choose_accel("auto", "/usr/bin/qemu-system-x86_64", tmp_path)
    assert choice.reason
    if Path("/sys/module/kvm_pvm").exists() or not HAS_KVM_DEVICE:
        assert choice.accel is Accel.TCG
    cached = json.loads((tmp_path / "accel-probe.json").read_text())
    assert cached["accel"] == choice.accel.value
    again = await choose_accel("auto", "/usr/bin/qemu-system-x86_64", tmp_path)
    assert again.accel is choice.accel and "cached" in again.reason


async def test_broken_qemu_means_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_kvm_device_problem", lambda: None)
    choice = await accel.probe("/bin/false")
    assert choice.accel is Accel.TCG and "exited with 1" in choice.reason


def _fake_qemu(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _gone(pid: int) -> bool:
    """Reaped, or at least dead (a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _started(pid_file: Path) -> int:
    for _ in range(500):
        if pid_file.exists() and pid_file.read_text().strip():
            return int(pid_file.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError("the fake QEMU did not start")


async def test_cancelled_probe_kills_and_reaps_its_qemu(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    qemu = _fake_qemu(tmp_path, f"echo $$ > {pid_file}; exec sleep 600")
    probe = asyncio.create_task(accel._probe_qemu_kvm(str(qemu)))
    pid = await _started(pid_file)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    # Reaped by the time the cancelled probe returns: no process, not even a zombie.
    assert not Path(f"/proc/{pid}").exists()


async def test_cancelled_probe_kills_what_its_qemu_started(tmp_path: Path) -> None:
    """A wrapper script that forks: the whole process group goes."""
    pid_file = tmp_path / "pid"
    qemu = _fake_qemu(tmp_path, f"sleep 600 & echo $! > {pid_file}; wait")
    probe = asyncio.create_task(accel._probe_qemu_kvm(str(qemu)))
    grandchild = await _started(pid_file)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    for _ in range(200):
        if _gone(grandchild):
            break
        await asyncio.sleep(0.01)
    assert _gone(grandchild)


async def test_a_probe_cancelled_while_it_spawns_leaves_nothing(tmp_path: Path) -> None:
    """Cancelled at any point of its start (before, during and after the fork), the probe
    returns at once and its wrapper's children go with it."""
    marker = f"600.{os.getpid()}"
    qemu = _fake_qemu(tmp_path, f"sleep {marker} & wait")
    for delay_ms in range(0, 40, 2):
        probe = asyncio.create_task(accel._probe_qemu_kvm(str(qemu)))
        await asyncio.sleep(delay_ms / 1000)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(probe, 5)
    for _ in range(200):
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if marker in " ".join(p.info["cmdline"] or []) and p.status() != "zombie"]
        if not left:
            break
        await asyncio.sleep(0.01)
    assert not left


async def test_probe_that_never_answers_times_out(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(accel, "PROBE_TIMEOUT_S", 0.3)
    qemu = _fake_qemu(tmp_path, f"echo $$ > {pid_file}; exec sleep 600")
    problem = await accel._probe_qemu_kvm(str(qemu))
    assert problem is not None and "did not answer" in problem
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()
