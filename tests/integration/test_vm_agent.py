"""One real VM (TCG here, KVM where it works), containers run in it through the agent.

The VM boots once for the module; each test runs its own containers in it.
After the module: no QEMU or virtiofsd process, no mount, no run directory.
"""
from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shim import errors, oci
from shim.config import load_config
from shim.sandbox.description import PodDescription
from shim.sandbox.sandbox import Sandbox
from tests.conftest import mounts_below, our_processes, write_test_config
from tests.guest import collect, run

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(300)]

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(guest_image: Path, busybox_rootfs: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sandbox]:
    import secrets
    state = Path("/run") / f"husk-test-{secrets.token_hex(4)}"
    config_path = write_test_config(tmp_path_factory.mktemp("cfg") / "husk.toml", state)
    box = Sandbox(PodDescription("vmtest", hostname="vmtest"), load_config(str(config_path)))
    try:
        await box.start()
        box.test_rootfs = busybox_rootfs  # type: ignore[attr-defined]
        yield box
    finally:
        await box.stop()
        assert our_processes(str(state)) == [], "QEMU/virtiofsd left running"
        assert mounts_below(state) == [], "mounts left behind"
        assert not box.run_dir.exists(), "run directory left behind"
        shutil.rmtree(state, ignore_errors=True)


async def test_stdout_stderr_and_exit_code(sandbox: Sandbox) -> None:
    status, out, err = await run(sandbox, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (status, out, err) == (3, "out\n", "err\n")


async def test_signal_kill_reports_128_plus_signal(sandbox: Sandbox) -> None:
    assert sandbox.agent is not None
    cid = "sleeper"
    root = sandbox.shared.bind_rootfs(cid, sandbox.test_rootfs)  # type: ignore[attr-defined]
    await sandbox.agent.create_container(cid, oci.default_spec(["sleep", "600"], root, "x"))
    try:
        await sandbox.agent.start_container(cid)
        await sandbox.agent.signal_process(cid, "", 9)
        assert await asyncio.wait_for(sandbox.agent.wait_process(cid, ""), 30) == 137
    finally:
        await sandbox.agent.remove_container(cid)
        sandbox.shared.release(cid)


async def test_exec_into_running_container(sandbox: Sandbox) -> None:
    assert sandbox.agent is not None
    cid = "execd"
    root = sandbox.shared.bind_rootfs(cid, sandbox.test_rootfs)  # type: ignore[attr-defined]
    await sandbox.agent.create_container(cid, oci.default_spec(
        ["sh", "-c", "echo ready > /tmp/flag; sleep 600"], root, "x"))
    try:
        await sandbox.agent.start_container(cid)
        process = oci.default_process(["sh", "-c", "echo $((6*7)); exit 5"])
        await sandbox.agent.exec_process(cid, "e1", process)
        output = await asyncio.wait_for(collect(sandbox, cid, "e1", False), 30)
        assert await sandbox.agent.wait_process(cid, "e1") == 5
        assert output == b"42\n"
        with pytest.raises(errors.NotFoundError):
            await sandbox.agent.wait_process(cid, "no-such-exec")
    finally:
        await sandbox.agent.signal_process(cid, "", 9)
        await sandbox.agent.remove_container(cid)
        sandbox.shared.release(cid)


async def test_stdin_round_trip(sandbox: Sandbox) -> None:
    status, out, _ = await run(sandbox, ["cat"], stdin=b"through the VM and back\n")
    assert (status, out) == (0, "through the VM and back\n")


async def test_tty_with_window_size(sandbox: Sandbox) -> None:
    status, out, _ = await run(sandbox, ["sh", "-c", "stty size; tty; exit 4"],
                               terminal=True, resize=(33, 111))
    assert status == 4
    assert "33 111" in out
    assert "not a tty" not in out


async def test_two_containers_at_once(sandbox: Sandbox) -> None:
    results = await asyncio.gather(
        run(sandbox, ["sh", "-c", "sleep 1; echo first"]),
        run(sandbox, ["sh", "-c", "sleep 1; echo second; exit 1"]))
    assert results == [(0, "first\n", ""), (1, "second\n", "")]


async def test_bad_requests_get_clear_errors_and_agent_survives(sandbox: Sandbox) -> None:
    assert sandbox.agent is not None
    with pytest.raises(errors.InvalidArgumentError):
        await sandbox.agent.create_container("bad1", {"process": {"args": "not a list"}})
    with pytest.raises(errors.InvalidArgumentError, match="escap|outside|shared"):
        spec = oci.default_spec(["true"], "/run/husk/shared/../../etc", "x")
        await sandbox.agent.create_container("bad2", spec)
    with pytest.raises(errors.NotFoundError):
        await sandbox.agent.start_container("never-created")
    status, out, _ = await run(sandbox, ["echo", "still alive"])
    assert (status, out) == (0, "still alive\n")


async def test_guest_details(sandbox: Sandbox) -> None:
    assert sandbox.agent is not None
    details = await sandbox.agent.guest_details()
    assert details["kernel_release"].startswith("6.")
    assert details["cpus"] >= 1 and details["memory_bytes"] > 100 << 20
    assert "crun" in details["oci_runtime_version"]
