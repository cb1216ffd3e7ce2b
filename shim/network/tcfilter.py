"""The tcfilter model: one tap per CNI interface, joined to it by tc redirects.

Runs inside the pod's network namespace. For each interface CNI made, a tap
(``tap<N>_husk``, one queue per vCPU) whose fds go to QEMU; an ingress qdisc
on both devices and a u32 match-all filter with a mirred egress redirect each
way, so every frame arriving on one leaves through the other. (This kernel
has u32 and mirred but not flower or matchall.) The CNI interface keeps its
addresses and routes; only the ingress qdisc and husk's filter are added to
it, and both go at teardown (the qdisc only if husk made it).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from shim.network.scan import TAP_SUFFIX, HostLink

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
VHOST_NET_DEVICE = "/dev/vhost-net"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
ETH_P_ALL = 0x0003
INGRESS_PARENT = 0xFFFF0000
# husk's filter on each ingress qdisc; a priority of its own, so filters
# someone else put there are neither replaced nor removed.
FILTER_PRIO = 0x4B
MATCH_ALL_KEY = "0x0/0x0+0"
FILTER_CLASSID = 0x10001  # required by pyroute2's u32 encoder; unused on ingress
MAX_QUEUES = 8


class TcFilterError(Exception):
    """A tap or its tc wiring could not be made."""


@dataclass
class TapEndpoint:
    """A CNI interface and the tap that carries it into the VM."""

    link: HostLink
    tap_name: str
    tap_fds: list[int] = field(default_factory=list)
    vhost_fds: list[int] = field(default_factory=list)
    # Devices on which husk created the ingress qdisc (removed at teardown).
    made_ingress: list[str] = field(default_factory=list)

    @property
    def queues(self) -> int:
        return len(self.tap_fds)

    def close_fds(self) -> None:
        """The shim's copies; QEMU holds its own once started."""
        for fd in self.tap_fds + self.vhost_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.tap_fds, self.vhost_fds = [], []


def tap_name(index: int) -> str:
    return f"tap{index}{TAP_SUFFIX}"


def queue_count(vcpus: int) -> int:
    """One queue pair per vCPU (multiqueue), at most MAX_QUEUES."""
    return max(1, min(vcpus, MAX_QUEUES))


def vhost_net_available() -> bool:
    return os.access(VHOST_NET_DEVICE, os.R_OK | os.W_OK)


def open_tap(name: str, queues: int) -> list[int]:
    """Create the tap ``name`` (in the calling thread's namespace) with ``queues`` fds.

    The tap is not persistent: it disappears when the last fd closes.
    """
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    request = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        if exc.errno == errno.EBUSY:
            raise TcFilterError(f"tap {name} already exists in the pod's namespace") from exc
        raise TcFilterError(f"cannot create tap {name}: {exc.strerror}") from exc
    return fds


def open_vhost(queues: int) -> list[int]:
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(os.open(VHOST_NET_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise TcFilterError(f"cannot open {VHOST_NET_DEVICE}: {exc.strerror}") from exc
    return fds


def _has_ingress(ipr: Any, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "ingress" for q in ipr.get_qdiscs(index=index))


def _redirect(ipr: Any, src: int, src_name: str, dst: int, made: list[str]) -> None:
    if not _has_ingress(ipr, src):
        ipr.tc("add", "ingress", index=src)
        made.append(src_name)
    ipr.tc("add-filter", "u32", index=src, parent=INGRESS_PARENT, prio=FILTER_PRIO,
           protocol=ETH_P_ALL, keys=[MATCH_ALL_KEY], target=FILTER_CLASSID,
           action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                    "ifindex": dst}])


def attach(ipr: Any, link: HostLink, index: int, queues: int, vhost: bool) -> TapEndpoint:
    """Make ``link``'s tap and join the two. In the pod's namespace.

    :raise TcFilterError: with what failed; whatever was made is undone.
    """
    endpoint = TapEndpoint(link, tap_name(index))
    try:
        endpoint.tap_fds = open_tap(endpoint.tap_name, queues)
        if vhost:
            endpoint.vhost_fds = open_vhost(queues)
        tap_index = ipr.link_lookup(ifname=endpoint.tap_name)[0]
        ipr.link("set", index=tap_index, mtu=link.mtu, state="up")
        _redirect(ipr, link.index, link.name, tap_index, endpoint.made_ingress)
        _redirect(ipr, tap_index, endpoint.tap_name, link.index, endpoint.made_ingress)
    except TcFilterError:
        detach(ipr, endpoint)
        raise
    except Exception as exc:
        detach(ipr, endpoint)
        raise TcFilterError(f"cannot connect {link.name} to tap {endpoint.tap_name}: "
                            f"{exc}") from exc
    log.info("network: %s (%s, mtu %d) carried by %s, %d queue(s)%s", link.name,
             link.kind or "device", link.mtu, endpoint.tap_name, queues,
             ", vhost-net" if vhost else "")
    return endpoint


def detach(ipr: Any, endpoint: TapEndpoint) -> list[str]:
    """Undo attach: husk's filter, the qdiscs husk made, the tap. In the pod's namespace.

    :return: what could not be removed (for the log); the rest is removed regardless.
    """
    problems = []
    endpoint.close_fds()
    with contextlib.suppress(Exception):
        tap_indexes = ipr.link_lookup(ifname=endpoint.tap_name)
        if tap_indexes:
            ipr.link("del", index=tap_indexes[0])
    try:
        exists = bool(ipr.link_lookup(ifname=endpoint.link.name))
        if exists and endpoint.link.name in endpoint.made_ingress:
            ipr.tc("del", "ingress", index=endpoint.link.index)
        elif exists:
            ipr.tc("del-filter", "u32", index=endpoint.link.index, parent=INGRESS_PARENT,
                   prio=FILTER_PRIO, protocol=ETH_P_ALL)
    except Exception as exc:  # noqa: BLE001 - reported, and the rest still goes
        problems.append(f"{endpoint.link.name}: {exc}")
    return problems
