"""`husk run`: the embedded demo, end to end as a user runs it (each test boots a VM)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import mounts_below, our_processes, write_test_config

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

HUSK = [sys.executable, "-m", "shim.cli"]


def _husk(config: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HUSK, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=240, **kw)  # type: ignore[call-overload]


def _assert_clean(state: Path) -> None:
    assert our_processes(str(state)) == []
    assert mounts_below(state) == []
    sandboxes = state / "sb"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == []


def test_run_streams_output_and_exit_code(guest_image: Path, busybox_rootfs: Path,
                                          husk_state_dir: Path, tmp_path: Path) -> None:
    config = write_test_config(tmp_path / "husk.toml", husk_state_dir)
    result = _husk(config, "run", "--timings", "--rootfs", str(busybox_rootfs), "--",
                   "sh", "-c", "echo hello from husk; echo oops >&2; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout == "hello from husk\n"
    assert "oops\n" in result.stderr
    _assert_clean(husk_state_dir)


def test_run_over_9p(guest_image: Path, busybox_rootfs: Path, husk_state_dir: Path,
                     tmp_path: Path) -> None:
    config = write_test_config(tmp_path / "husk.toml", husk_state_dir)
    config.write_text(config.read_text() + '[shared_fs]\ntype = "9p"\n')
    result = _husk(config, "run", "--rootfs", str(busybox_rootfs), "--",
                   "sh", "-c", "head -1 /etc/passwd; grep -c ' / 9p ' /proc/mounts || true")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "root:x:0:0:root:/root:/bin/sh"
    _assert_clean(husk_state_dir)


@pytest.mark.parametrize("root_device, device, not_device",
                         [("pmem", "pmem0", "vda"), ("virtio-blk", "vda", "pmem0")])
def test_the_guest_root_device(root_device: str, device: str, not_device: str, guest_image: Path,
                               busybox_rootfs: Path, husk_state_dir: Path, tmp_path: Path) -> None:
    """The root image goes in as pmem (the default) or as a read-only disk; the guest
    boots from either (cold for the disk: no template of that shape is built here)."""
    config = write_test_config(tmp_path / "husk.toml", husk_state_dir, root_device=root_device,
                               templates=None if root_device == "pmem" else False)
    result = _husk(config, "run", "--rootfs", str(busybox_rootfs), "--", "ls", "/sys/block")
    assert result.returncode == 0, result.stderr
    devices = result.stdout.split()
    assert device in devices and not_device not in devices, devices
    _assert_clean(husk_state_dir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_cleans_up(sig: int, guest_image: Path, busybox_rootfs: Path,
                             husk_state_dir: Path, tmp_path: Path) -> None:
    config = write_test_config(tmp_path / "husk.toml", husk_state_dir)
    # Its log goes to a file: a pipe nobody reads would stall it once full.
    log = tmp_path / "husk-run.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen([*HUSK, "--config", str(config), "run", "--rootfs",
                                 str(busybox_rootfs), "--", "sh", "-c", "echo up; sleep 600"],
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "up\n", log.read_text()  # the container runs in its VM
        assert our_processes(str(husk_state_dir)), "expected QEMU to be running"
        proc.send_signal(sig)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"husk run still running 60 s after signal {sig}; its log:\n"
                        f"{log.read_text()[-6000:]}")
        assert status == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_clean(husk_state_dir)


def test_missing_guest_image_is_a_clear_error(busybox_rootfs: Path, husk_state_dir: Path,
                                              tmp_path: Path) -> None:
    config = tmp_path / "husk.toml"
    config.write_text(f'[hypervisor]\nguest_dir = "{tmp_path}/nowhere"\n'
                      f'[runtime]\nstate_dir = "{husk_state_dir}"\n')
    result = _husk(config, "run", "--rootfs", str(busybox_rootfs), "--", "true")
    assert result.returncode == 125
    assert "guest image file" in result.stderr and "make guest-image" in result.stderr
    _assert_clean(husk_state_dir)


def test_qemu_failure_is_reported_at_once(busybox_rootfs: Path, husk_state_dir: Path,
                                          tmp_path: Path) -> None:
    garbage = tmp_path / "not-a-kernel"
    garbage.write_bytes(b"\0" * 4096)
    config = write_test_config(tmp_path / "husk.toml", husk_state_dir, kernel=str(garbage))
    started = time.monotonic()
    result = _husk(config, "run", "--rootfs", str(busybox_rootfs), "--", "true")
    assert result.returncode == 125
    assert "QEMU exited with status" in result.stderr
    assert time.monotonic() - started < 30, "a dead QEMU must not wait for the agent timeout"
    _assert_clean(husk_state_dir)
