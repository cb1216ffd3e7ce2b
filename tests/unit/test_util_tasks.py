"""cancel_and_wait: the task's cancellation is dropped, the waiter's own is not."""
from __future__ import annotations

import asyncio

import pytest

from shim.util.tasks import cancel_and_wait


async def _slow_to_end(started: asyncio.Event, release: asyncio.Event) -> None:
    """Ends only after ``release``, even once cancelled (a cleanup that takes a while)."""
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await release.wait()
        raise


async def test_the_cancelled_task_has_ended_when_it_returns() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    release.set()
    task = asyncio.create_task(_slow_to_end(started, release))
    await started.wait()
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_the_waiters_own_cancellation_propagates() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    inner = asyncio.create_task(_slow_to_end(started, release))
    await started.wait()
    went_on = []

    async def waiter() -> None:
        await cancel_and_wait(inner)
        went_on.append(True)  # must not run: the waiter was cancelled

    outer = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)  # outer waits for inner's cleanup
    outer.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert went_on == [] and inner.cancelled()


async def test_only_the_listed_errors_are_dropped() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise OSError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    await cancel_and_wait(task, OSError)
    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(OSError):
        await cancel_and_wait(task, ValueError)


async def test_cleanup_after_the_waiters_cancellation_still_waits() -> None:
    """A task cancelled earlier, cleaning up in `finally`, still gets its waits."""
    started, release = asyncio.Event(), asyncio.Event()
    release.set()
    inner = asyncio.create_task(_slow_to_end(started, release))
    await started.wait()
    cleaned = []

    async def owner() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await cancel_and_wait(inner)
            cleaned.append(inner.done())

    outer = asyncio.create_task(owner())
    await asyncio.sleep(0)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert cleaned == [True]
