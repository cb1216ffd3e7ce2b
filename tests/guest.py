"""Running containers in a Sandbox's guest through its agent (for VM-level tests)."""
from __future__ import annotations

import asyncio
import contextlib
import itertools

from shim import errors, oci
from shim.sandbox.sandbox import Sandbox

_ids = itertools.count(1)


async def collect(box: Sandbox, cid: str, exec_id: str, stderr: bool) -> bytes:
    assert box.agent is not None
    return b"".join([c async for c in box.agent.read_output(cid, exec_id, stderr=stderr)])


async def run(box: Sandbox, args: list[str], terminal: bool = False, stdin: bytes | None = None,
              resize: tuple[int, int] | None = None) -> tuple[int, str, str]:
    """Run one container to completion; returns (status, stdout, stderr)."""
    assert box.agent is not None
    cid = f"c{next(_ids)}"
    root = box.shared.bind_rootfs(cid, box.test_rootfs)  # type: ignore[attr-defined]
    spec = oci.default_spec(args, root, "vmtest", terminal=terminal)
    try:
        await box.agent.create_container(cid, spec)
        if stdin is None:
            await box.agent.close_stdin(cid, "")
        out = asyncio.create_task(collect(box, cid, "", False))
        err = asyncio.create_task(collect(box, cid, "", True)) if not terminal else None
        if resize:
            await box.agent.tty_resize(cid, "", *resize)
        await box.agent.start_container(cid)
        if stdin is not None:
            await box.agent.write_stdin(cid, "", stdin)
            await box.agent.close_stdin(cid, "")
        status = await asyncio.wait_for(box.agent.wait_process(cid, ""), 60)
        stdout = (await asyncio.wait_for(out, 10)).decode()
        stderr = (await asyncio.wait_for(err, 10)).decode() if err else ""
        return status, stdout, stderr
    finally:
        # Not found: creating it failed, and that error is the one to see.
        with contextlib.suppress(errors.NotFoundError):
            await box.agent.remove_container(cid)
        box.shared.release(cid)
