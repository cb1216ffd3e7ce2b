"""The KVM/TCG choice: forced modes, the module check, the cached probe."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shim.vm import accel
from shim.vm.accel import Accel, _kvm_device_problem, choose_accel

HAS_KVM_DEVICE = os.access(accel.KVM_DEVICE, os.R_OK | os.W_OK)


async def test_forced_modes_skip_the_probe(tmp_path: Path) -> None:
    assert (await choose_accel("tcg", "/nonexistent/qemu", tmp_path)).accel is Accel.TCG
    kvm = await choose_accel("kvm", "/nonexistent/qemu", tmp_path)
    assert kvm.accel is Accel.KVM and "forced" in kvm.reason
    assert kvm.qemu_args[:2] == ["-accel", "kvm"]


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
