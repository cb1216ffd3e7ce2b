"""Where a daemon's tasks and threads are waiting, for the log (SIGUSR1).

containerd's runc shim dumps its goroutines on SIGUSR1; this is the asyncio
equivalent: every task with the chain of coroutines it is suspended in (what
``Task.get_stack`` does not follow), and every thread's stack.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from types import CoroutineType, FrameType, GeneratorType
from typing import Any

# A daemon has a few dozen tasks; a runaway one must not flood the log.
MAX_TASKS = 200
MAX_DEPTH = 40
AWAITED_REPR_CHARS = 160


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def await_chain(awaitable: Any) -> list[str]:
    """The frames a suspended coroutine waits in, outermost first, then what it awaits."""
    lines: list[str] = []
    current = awaitable
    for _ in range(MAX_DEPTH):
        if isinstance(current, CoroutineType):
            frame, inner = current.cr_frame, current.cr_await
        elif isinstance(current, GeneratorType):
            frame, inner = current.gi_frame, current.gi_yieldfrom
        else:
            break
        if frame is None:  # finished
            break
        lines.append(_where(frame))
        current = inner
    if type(current).__name__ == "FutureIter":  # `await future`: the future stays hidden
        lines.append("awaiting a future")
    elif current is not None and not isinstance(current, (CoroutineType, GeneratorType)):
        lines.append(f"awaiting {repr(current)[:AWAITED_REPR_CHARS]}")
    return lines


def stack_dump() -> str:
    """Every asyncio task of the running loop and every thread, as text."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out = [f"{len(tasks)} tasks, {threading.active_count()} threads"]
    for task in tasks[:MAX_TASKS]:
        out.append(f"task {task.get_name()}:")
        out += [f"  {line}" for line in await_chain(task.get_coro())]
    if len(tasks) > MAX_TASKS:
        out.append(f"({len(tasks) - MAX_TASKS} more tasks left out)")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.append(f"thread {names.get(ident, ident)}:")
        out += [f"  {line.strip()}" for line in traceback.format_stack(frame, MAX_DEPTH)
                if line.strip()]
    return "\n".join(out)
