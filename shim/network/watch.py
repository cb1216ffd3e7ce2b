"""Notice interfaces added to the pod's namespace after boot (Multus, a late CNI).

A netlink socket made inside the namespace and subscribed to link and
address changes wakes the shim's loop; nothing is parsed here, the callback
rescans. A plugin adds an interface in several steps (link, addresses, up,
routes), so the callback runs once the namespace has been quiet for a moment.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from shim.network.netns import run_in_netns
from shim.util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE
          | RTMGRP_IPV6_ROUTE)
SETTLE_S = 1.0
OPEN_TIMEOUT_S = 10.0
# One wakeup reads at most this many messages: a flood of changes cannot hold the loop.
READS_PER_WAKEUP = 64
RECV_BYTES = 65536


def _subscribe() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock


class NetnsWatcher:
    def __init__(self, netns_path: str, on_change: Callable[[], Awaitable[None]],
                 name: str) -> None:
        self.netns_path = netns_path
        self._on_change = on_change
        self._name = name
        self._sock: socket.socket | None = None
        self._settle: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._again = False

    async def start(self) -> None:
        """:raise NetnsError, TimeoutError: the namespace cannot be watched."""
        self._sock = await run_in_netns(self.netns_path, _subscribe, OPEN_TIMEOUT_S, "watch",
                                        lambda sock: sock.close())
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(READS_PER_WAKEUP):
            try:
                if not self._sock.recv(RECV_BYTES):
                    break
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: changes were lost; a rescan covers them
                log.debug("%s: netlink: %s", self._name, exc)
                break
        if self._settle is not None:
            self._settle.cancel()
        self._settle = asyncio.get_running_loop().call_later(SETTLE_S, self._fire)

    def _fire(self) -> None:
        self._settle = None
        if self._running is not None and not self._running.done():
            self._again = True  # one more pass after this one
            return
        self._running = asyncio.create_task(self._run(), name="netns-rescan")

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._on_change()
            except Exception:  # noqa: BLE001 - the watcher must survive a failed pass
                log.exception("%s: handling a change in %s failed", self._name, self.netns_path)
            if not self._again:
                return

    async def stop(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._running is not None:
            await cancel_and_wait(self._running, Exception)
