"""Choose QEMU's accelerator: KVM where it really works, TCG otherwise.

A /dev/kvm that opens is not enough: on nested PVM hosts /dev/kvm comes from
kvm_pvm, and QEMU aborts under ``-cpu host`` ("failed to set MSR 0x10a") or
hangs after the firmware. So the probe checks the kernel module behind
/dev/kvm and then starts QEMU once, paused, with ``-accel kvm -cpu host``: the
vCPU registers are written at machine reset, so a broken KVM fails right there.
The verdict is cached per host boot.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from shim.util import child

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# Modules that provide a /dev/kvm able to run a standard x86 guest.
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")
PROBE_TIMEOUT_S = 10.0
# See tcg_buffer_mib.
TCG_CODE_MIB = 50
TCG_REGION_MIB = 2
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class Accel(enum.Enum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str

    def qemu_args(self, possible_vcpus: int, tcg_buffer: int = 0) -> list[str]:
        """``tcg_buffer``: TCG's translation buffer in MiB; 0 = tcg_buffer_mib's size."""
        if self.accel is Accel.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", f"tcg,tb-size={tcg_buffer or tcg_buffer_mib(possible_vcpus)}",
                "-cpu", "max"]


def tcg_buffer_mib(possible_vcpus: int) -> int:
    """TCG's translation buffer for a VM (one per VM, and an idle guest fills it).

    Every vCPU thread takes a region of it at start (at least 2 MiB in QEMU 7.2)
    and an idle vCPU holds its region unused, so the running vCPUs get
    TCG_CODE_MIB plus one region per other possible vCPU: what the 64 MiB buffer
    left them when every VM had 8 possible vCPUs. Less made ExecSync and ten
    pods at once 2-3x slower (a smaller buffer is flushed and retranslated).
    """
    return TCG_CODE_MIB + TCG_REGION_MIB * (max(possible_vcpus, 1) - 1)


def _kvm_device_problem(sys_module: Path = Path("/sys/module")) -> str | None:
    """Why /dev/kvm cannot be used, or None when it looks usable."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} does not exist"
    except OSError as exc:
        return f"cannot open {KVM_DEVICE}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{KVM_DEVICE} speaks KVM API {version}, not {KVM_API_VERSION}"
    if not any((sys_module / m).exists() for m in HARDWARE_KVM_MODULES):
        found = sorted(p.name for p in sys_module.glob("kvm*")) if sys_module.exists() else []
        return (f"{KVM_DEVICE} is not provided by {' or '.join(HARDWARE_KVM_MODULES)} "
                f"(loaded: {', '.join(found) or 'none'}); a nested or paravirtual KVM "
                "cannot run a standard guest")
    return None


async def _kill_probe(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the probe's process group (it leads its own session) and reap it."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Shielded: a second cancel while reaping must not leave a zombie behind.
    await asyncio.shield(proc.wait())


async def _probe_qemu_kvm(qemu: str) -> str | None:
    """Start QEMU paused under KVM; None if it came up and quit cleanly.

    Cancelled (e.g. the shim is told to stop), it kills and reaps the probe QEMU.
    """
    commands = b"".join(json.dumps({"execute": c}).encode() + b"\n"
                        for c in ("qmp_capabilities", "query-kvm", "quit"))
    # Shielded: cancelled while its pipes connect, asyncio would kill only the
    # process it forked and then wait for everything holding the pipes to exit.
    spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
        qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-nodefaults",
        "-no-user-config", "-display", "none", "-S", "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
        preexec_fn=child.die_with_parent))
    try:
        proc = await asyncio.shield(spawn)
    except OSError as exc:
        return f"cannot run {qemu}: {exc.strerror}"
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            await _kill_probe(await asyncio.shield(spawn))
        raise
    try:
        out, err = await asyncio.wait_for(proc.communicate(commands), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        await _kill_probe(proc)
        return f"QEMU under KVM did not answer within {PROBE_TIMEOUT_S:.0f}s"
    except BaseException:  # cancelled: the probe QEMU must not outlive its caller
        await _kill_probe(proc)
        raise
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return f"QEMU under KVM exited with {proc.returncode}: {last[0]}"
    if b'"enabled": true' not in out:
        return "QEMU started but reports KVM disabled"
    return None


def _cache_path(state_dir: Path) -> Path:
    return state_dir / "accel-probe.json"


def _boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


async def choose_accel(mode: str, qemu: str, state_dir: Path) -> AccelChoice:
    """Pick the accelerator for ``mode`` ("auto", "kvm" or "tcg") and log why."""
    if mode == "tcg":
        choice = AccelChoice(Accel.TCG, "forced by config (accel = \"tcg\")")
    elif mode == "kvm":
        choice = AccelChoice(Accel.KVM, "forced by config (accel = \"kvm\")")
    else:
        choice = await _probe_cached(qemu, state_dir)
    log.info("accelerator: %s (%s)", choice.accel.value, choice.reason)
    return choice


async def _probe_cached(qemu: str, state_dir: Path) -> AccelChoice:
    cache = _cache_path(state_dir)
    boot_id = _boot_id()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id and cached.get("qemu") == qemu:
            return AccelChoice(Accel(cached["accel"]), cached["reason"] + " (cached probe)")
    except (OSError, ValueError, KeyError):
        pass
    choice = await probe(qemu)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"boot_id": boot_id, "qemu": qemu,
                                   "accel": choice.accel.value, "reason": choice.reason}))
        tmp.replace(cache)
    except OSError as exc:
        log.warning("cannot cache the accelerator probe in %s: %s", cache, exc)
    return choice


async def probe(qemu: str) -> AccelChoice:
    """Run the checks without the cache."""
    problem = _kvm_device_problem()
    if problem is None:
        problem = await _probe_qemu_kvm(qemu)
    if problem is None:
        return AccelChoice(Accel.KVM, "KVM probe passed")
    return AccelChoice(Accel.TCG, f"KVM unusable: {problem}")
