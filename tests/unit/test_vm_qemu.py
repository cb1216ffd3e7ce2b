"""Vm with stand-in processes: guest output, pid files, virtiofsd dying, teardown.

The stand-in QEMU reads its real command line: it connects to the console and
log sockets the shim listens on (as ``server=off`` chardevs do), writes its
-pidfile, holds the vhost-user socket and serves enough QMP for Vm. The
stand-in virtiofsd listens on --socket-path and, like the real one, exits
when QEMU hangs up; either can be told to fail.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.vm.accel import Accel, AccelChoice
from shim.vm.cmdline import AgentTransport, SharedFsType, VmPaths, VmSpec
from shim.vm.qemu import Vm, VmError
from tests.conftest import open_files

pytestmark = pytest.mark.timeout(60)
STEP_S = 10.0

FAKE_QEMU = r'''
import json, os, select, socket, sys, time
args = sys.argv[1:]
def values(flag):
    return [args[i + 1] for i, a in enumerate(args) if a == flag]
def options(text):
    kind, *rest = text.split(",")
    return dict(kv.split("=", 1) for kv in rest)
chardevs = {d["id"]: d for d in map(options, values("-chardev"))}
mode = os.environ.get("FAKE_QEMU", "serve")
def dial(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return s
console, guestlog = dial(chardevs["console"]["path"]), dial(chardevs["guestlog"]["path"])
vhost = dial(chardevs["fs"]["path"]) if "fs" in chardevs else None
with open(values("-pidfile")[0], "w") as f:
    f.write(f"{os.getpid()}\n")
console.sendall(b"fake console: booting\r\n")
guestlog.sendall(b"fake agent: up\n")
if mode == "die":
    console.sendall(b"Kernel panic - not syncing: fake\r\n")
    print("qemu: fake failure", file=sys.stderr)
    sys.exit(3)
qmp = socket.socket(socket.AF_UNIX)
qmp.bind(values("-qmp")[0].removeprefix("unix:").split(",")[0])
qmp.listen(1)
conn, _ = qmp.accept()
conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                             "package": ""}, "capabilities": []}}).encode()
             + b"\r\n")
decoder, buffer = json.JSONDecoder(), ""
deadline = time.monotonic() + 0.5 if mode == "exit-later" else None
while True:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not select.select([conn], [], [], timeout)[0]:
        sys.exit(5)
    chunk = conn.recv(65536)
    if not chunk:
        sys.exit(0)
    buffer += chunk.decode()
    while buffer.strip():
        try:
            request, end = decoder.raw_decode(buffer.lstrip())
        except ValueError:
            break
        buffer = buffer.lstrip()[end:]
        reply = {"return": [] if request["execute"] == "query-chardev" else {}}
        if "id" in request:
            reply["id"] = request["id"]
        conn.sendall(json.dumps(reply).encode() + b"\r\n")
        if request["execute"] == "quit":
            sys.exit(0)
'''

FAKE_VIRTIOFSD = r'''
import os, socket, sys, time
path = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--socket-path="))
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)
die_after = os.environ.get("FAKE_VIRTIOFSD_DIE_AFTER")
if die_after:
    time.sleep(float(die_after))
    print("fake virtiofsd: boom", file=sys.stderr, flush=True)
    sys.exit(3)
conn, _ = srv.accept()
while conn.recv(4096):
    pass
sys.exit(0)  # QEMU hung up
'''


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """Short: socket paths have a length limit."""
    path = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))
    yield path / "vm"
    shutil.rmtree(path, ignore_errors=True)


def _script(path: Path, text: str) -> str:
    path.write_text(f"#!{sys.executable}\n{text}")
    path.chmod(0o755)
    return str(path)


def _vm(run_dir: Path, shared_fs: SharedFsType = SharedFsType.VIRTIO_FS) -> Vm:
    bin_dir = run_dir.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (run_dir.parent / "shared").mkdir(exist_ok=True)
    spec = VmSpec(name="pod", paths=VmPaths(run_dir),
                  qemu_path=_script(bin_dir / "qemu", FAKE_QEMU), kernel=Path("/k"),
                  initrd=Path("/i"), image=Path("/img"), vcpus=1, memory_mib=64,
                  accel=AccelChoice(Accel.TCG, "test"), shared_fs=shared_fs,
                  shared_dir=run_dir.parent / "shared", transport=AgentTransport.SERIAL)
    return Vm(spec, virtiofsd_path=_script(bin_dir / "virtiofsd", FAKE_VIRTIOFSD))


async def _until(condition: object, what: str) -> None:
    assert callable(condition)
    for _ in range(int(STEP_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_released(vm: Vm) -> None:
    paths = vm.spec.paths
    left = [p.name for p in [*paths.sockets(), *paths.pid_files()] if p.exists()]
    assert left == []


async def test_start_and_stop_leave_nothing_but_the_tails(run_dir: Path) -> None:
    baseline = open_files()
    vm = _vm(run_dir)
    await vm.start()
    paths = vm.spec.paths
    assert paths.virtiofsd_pid_file.read_text() == f"{vm._virtiofsd.pid}\n"  # type: ignore[union-attr]
    assert paths.pid_file.read_text() == f"{vm.pid}\n"
    await _until(lambda: vm.console.tail() and vm.guest_log.tail(), "the guest's output")
    assert vm.console.tail() == "fake console: booting"
    assert vm.guest_log.tail() == "fake agent: up"
    assert not paths.console_socket.exists(), "no listener once QEMU is connected"
    pids = [vm.pid, vm.virtiofsd_pid]
    await vm.stop()
    await vm.stop()  # idempotent
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    _assert_released(vm)
    assert open_files() - baseline == set()
    assert vm.console.tail() == "fake console: booting", "tails outlive stop()"
    assert (run_dir / "console.log").read_bytes() == b"fake console: booting\r\n"


async def test_virtiofsd_dying_takes_the_vm_down(run_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VIRTIOFSD_DIE_AFTER", "1.0")
    vm = _vm(run_dir)
    await vm.start()
    assert vm.running
    qemu_pid = vm.pid
    assert await asyncio.wait_for(vm.wait(), STEP_S) == 3
    assert not vm.running and not Path(f"/proc/{qemu_pid}").exists(), "QEMU was stopped"
    reason = vm.failure_reason()
    assert reason.startswith("virtiofsd exited with status 3"), reason
    assert "fake virtiofsd: boom" in reason
    await vm.stop()
    assert vm.failure_reason().startswith("virtiofsd exited with status 3")
    _assert_released(vm)


async def test_dead_virtiofsd_is_seen_without_wait(run_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the pod's watcher runs (agent still booting): not running, and why."""
    monkeypatch.setenv("FAKE_VIRTIOFSD_DIE_AFTER", "0.5")
    vm = _vm(run_dir)
    try:
        await vm.start()
        await _until(lambda: not vm.running, "virtiofsd to die")
        assert vm.failure_reason().startswith("virtiofsd exited with status 3")
        with pytest.raises(VmError, match="virtiofsd exited with status 3"):
            await vm.wait_guest_open("agent", STEP_S)
    finally:
        await vm.stop()


async def test_qemu_exiting_is_blamed_on_qemu(run_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """virtiofsd exits right after QEMU (its peer hung up): QEMU is still the cause."""
    monkeypatch.setenv("FAKE_QEMU", "exit-later")
    vm = _vm(run_dir)
    try:
        await vm.start()
        assert await asyncio.wait_for(vm.wait(), STEP_S) == 5
        await _until(lambda: vm._virtiofsd is not None and vm._virtiofsd.returncode is not None,
                     "virtiofsd to follow QEMU")
        assert vm.failure_reason().startswith("QEMU exited with status 5")
    finally:
        await vm.stop()
    _assert_released(vm)


async def test_qemu_dying_at_boot_leaves_its_last_words(run_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU", "die")
    baseline = open_files()
    vm = _vm(run_dir, SharedFsType.NINE_P)
    with pytest.raises(VmError, match="QEMU exited with status 3.*qemu: fake failure"):
        await vm.start()
    # What QEMU wrote just before it exited was read before stop() closed the socket.
    assert vm.console.tail(2) == "fake console: booting | Kernel panic - not syncing: fake"
    assert vm.guest_log.tail() == "fake agent: up"
    _assert_released(vm)
    assert open_files() - baseline == set()


async def test_unusable_run_dir_is_a_vm_error(run_dir: Path) -> None:
    vm = _vm(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "console.log").mkdir()  # the log file cannot be created
    with pytest.raises(VmError, match="cannot set up the console log"):
        await vm.start()
    _assert_released(vm)
