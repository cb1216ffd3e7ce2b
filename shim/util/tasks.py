"""Cancelling a task and waiting for it, without swallowing the waiter's own cancellation."""
from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], *ignore: type[Exception]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Its CancelledError, and the exceptions in ``ignore``, are dropped. The caller's
    own cancellation while it waits is not: it propagates. (A bare
    ``suppress(CancelledError)`` around the await drops both, and a caller cancelled
    there carries on as if it never was: a shutdown waiting for it waits forever.)
    """
    current = asyncio.current_task()
    # A caller that is itself being cancelled may be cleaning up: only a
    # cancellation that arrives during this wait is its own to raise.
    cancelling = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > cancelling:
            raise
    except ignore:
        pass
