"""Running code inside a pod's network namespace.

A network namespace belongs to a thread, not a process: each call gets a
fresh thread that joins the namespace, runs the function and ends, so no
thread of the shim is ever left in a pod's namespace. Sockets and tap fds
made there stay in that namespace when they are used from other threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """The path is not a network namespace, or cannot be entered."""


def open_netns(path: str) -> int:
    """An fd of the network namespace at ``path``.

    :raise NetnsError: missing, or not a network namespace (a plain file, another kind).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from exc
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetnsError(f"{path} is not a network namespace")
    return fd


def _enter(fd: int, path: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"cannot enter network namespace {path}: {os.strerror(err)}")


def call_in_netns(path: str, fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """run_in_netns for synchronous callers (the ``delete`` command).

    :raise NetnsError: the namespace cannot be entered.
    :raise TimeoutError: ``fn`` took longer than ``timeout_s`` (it goes on in its thread).
    """
    ns_fd = open_netns(path)
    outcome: list[tuple[T | None, BaseException | None]] = []

    def body() -> None:
        try:
            _enter(ns_fd, path)
            outcome.append((fn(), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append((None, exc))
        finally:
            os.close(ns_fd)

    thread = threading.Thread(target=body, name=f"netns-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"{what} in {path} took longer than {timeout_s:.0f}s")
    result, error = outcome[0]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


async def run_in_netns(path: str, fn: Callable[[], T], timeout_s: float, what: str,
                       discard: Callable[[T], None] | None = None) -> T:
    """Run ``fn`` in a new thread inside the network namespace at ``path``.

    :param discard: releases a result that arrives after the caller gave up
        (e.g. closes the fds it holds), so a timeout leaks nothing.
    :raise NetnsError: the namespace cannot be entered.
    :raise asyncio.TimeoutError: ``fn`` took longer than ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    ns_fd = open_netns(path)

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            if error is None and discard is not None:
                discard(result)  # type: ignore[arg-type]
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            _enter(ns_fd, path)
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        finally:
            os.close(ns_fd)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(deliver, *outcome)

    try:
        threading.Thread(target=body, name=f"netns-{what}", daemon=True).start()
    except BaseException:
        os.close(ns_fd)
        raise
    return await asyncio.wait_for(future, timeout_s)
