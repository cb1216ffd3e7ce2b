"""The pod's network inside the guest, as CNI made it on the host.

The host sends the interfaces CNI created (name, MAC, MTU, addresses), its
routes and static neighbours. Each interface is the guest NIC with the same
MAC (waited for: a hot-plugged NIC appears some time after the request),
renamed to CNI's name; IPv6 addresses skip duplicate address detection, which
CNI's namespace already did for them. Routes are added in the order given
(on-link ones first), a gateway outside every prefix gets ``onlink``.

Runs in a worker thread (pyroute2's calls block) in the guest's network
namespace, which all the pod's containers share.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import re
import time
from typing import Any

from agent.errors import DeadlineError, GuestError, InvalidArgumentError
from proto.gen import agent_pb2 as pb

log = logging.getLogger(__name__)

MAX_INTERFACES = 16
MAX_ADDRESSES = 32
MAX_ROUTES = 256
MAX_NEIGHBORS = 256
IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,14}")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MTU_MIN, MTU_MAX = 68, 65535
NIC_POLL_S = 0.05
IFA_F_NODAD = 0x02
RTNH_F_ONLINK = 0x04
NUD_PERMANENT = 0x80
SCOPES = {0, 200, 253, 254}  # universe, site, link, host


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgumentError(f"{what}: {text[:64]!r} is not an IP address") from None


def check(config: pb.NetworkConfig) -> None:
    """Refuse a malformed request before anything in the guest changes.

    :raise InvalidArgumentError: with the offending field.
    """
    if len(config.interfaces) > MAX_INTERFACES or len(config.routes) > MAX_ROUTES \
            or len(config.neighbors) > MAX_NEIGHBORS:
        raise InvalidArgumentError("network: too many interfaces, routes or neighbours")
    names = set()
    macs = set()
    for iface in config.interfaces:
        if not IFNAME.fullmatch(iface.name) or iface.name in names:
            raise InvalidArgumentError(f"network: bad or repeated interface name {iface.name[:32]!r}")
        if not MAC.fullmatch(iface.mac) or iface.mac in macs:
            raise InvalidArgumentError(f"network: interface {iface.name}: bad or repeated MAC "
                                       f"{iface.mac[:32]!r}")
        if not MTU_MIN <= iface.mtu <= MTU_MAX:
            raise InvalidArgumentError(f"network: interface {iface.name}: MTU {iface.mtu} "
                                       f"outside {MTU_MIN}..{MTU_MAX}")
        if len(iface.addresses) > MAX_ADDRESSES:
            raise InvalidArgumentError(f"network: interface {iface.name}: too many addresses")
        for addr in iface.addresses:
            ip = _ip(addr.address, f"interface {iface.name}")
            if addr.prefix_len > ip.max_prefixlen:
                raise InvalidArgumentError(f"network: {addr.address}/{addr.prefix_len} has a "
                                           "bad prefix length")
        names.add(iface.name)
        macs.add(iface.mac)
    for route in config.routes:
        try:
            net = ipaddress.ip_network(route.destination, strict=False)
        except ValueError:
            raise InvalidArgumentError(f"network: route destination {route.destination[:64]!r} "
                                       "is not a CIDR") from None
        if route.device not in names:
            raise InvalidArgumentError(f"network: route to {net} uses unknown device "
                                       f"{route.device[:32]!r}")
        for value, what in ((route.gateway, "gateway"), (route.source, "source")):
            if value and _ip(value, f"route to {net}: {what}").version != net.version:
                raise InvalidArgumentError(f"network: route to {net}: {what} {value} is of "
                                           "another IP family")
        if route.scope not in SCOPES:
            raise InvalidArgumentError(f"network: route to {net}: bad scope {route.scope}")
    for neigh in config.neighbors:
        _ip(neigh.ip, "neighbour")
        if not MAC.fullmatch(neigh.mac) or neigh.device not in names:
            raise InvalidArgumentError(f"network: neighbour {neigh.ip}: bad MAC or device")


def preload() -> None:
    """Import pyroute2 now (~1 s under TCG): a template's agent does, so pods restored
    from it do not pay for it in CreateSandbox."""
    _iproute().close()


def _iproute() -> Any:
    from pyroute2 import IPRoute  # the guest has it; host-side tests import this module too
    # pyroute2's import sets its logger to log every netlink message; our lines say
    # what was done.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    return IPRoute()


def _wait_for_nic(ipr: Any, mac: str, deadline: float) -> int:
    while True:
        for link in ipr.get_links():
            if (link.get("address") or "").lower() == mac:
                return int(link["index"])
        if time.monotonic() > deadline:
            raise DeadlineError(f"network: no NIC with MAC {mac} appeared in the guest")
        time.sleep(NIC_POLL_S)


def _netlink(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # pyroute2 raises NetlinkError (an OSError subclass) and others
        raise GuestError(f"network: {what}: {exc}") from exc


def configure(config: pb.NetworkConfig, nic_timeout_s: float) -> None:
    """Apply ``config`` (already check()ed) in the calling thread's namespace.

    :raise DeadlineError: a NIC did not appear within ``nic_timeout_s``.
    :raise GuestError: the kernel refused an address, route or neighbour.
    """
    deadline = time.monotonic() + nic_timeout_s
    with _iproute() as ipr:
        indexes = {iface.name: _wait_for_nic(ipr, iface.mac, deadline)
                   for iface in config.interfaces}
        # Renamed in two passes: the kernel's eth0 may be the NIC that must become eth1.
        for name, index in indexes.items():
            _netlink(f"{name} down", ipr.link, "set", index=index, state="down")
            _netlink(f"{name} rename", ipr.link, "set", index=index, ifname=f"husk{index}")
        for iface in config.interfaces:
            index = indexes[iface.name]
            _netlink(f"{iface.name} rename", ipr.link, "set", index=index, ifname=iface.name)
            _netlink(f"{iface.name} mtu", ipr.link, "set", index=index, mtu=iface.mtu)
            for addr in iface.addresses:
                is_v6 = ipaddress.ip_address(addr.address).version == 6
                _netlink(f"{iface.name} address {addr.address}/{addr.prefix_len}", ipr.addr,
                         "add", index=index, address=addr.address, prefixlen=addr.prefix_len,
                         **({"flags": IFA_F_NODAD} if is_v6 else {}))
            _netlink(f"{iface.name} up", ipr.link, "set", index=index, state="up")
            log.info("network: %s (%s) mtu %d, %s", iface.name, iface.mac, iface.mtu,
                     ", ".join(f"{a.address}/{a.prefix_len}" for a in iface.addresses) or "no address")
        for route in config.routes:
            _add_route(ipr, route, indexes[route.device])
        for neigh in config.neighbors:
            _netlink(f"neighbour {neigh.ip}", ipr.neigh, "add", dst=neigh.ip, lladdr=neigh.mac,
                     ifindex=indexes[neigh.device], state=NUD_PERMANENT)
    log.info("network: %d interfaces, %d routes, %d neighbours", len(config.interfaces),
             len(config.routes), len(config.neighbors))


def _add_route(ipr: Any, route: pb.Route, index: int) -> None:
    kwargs: dict[str, Any] = {"dst": route.destination, "oif": index, "scope": route.scope}
    if route.gateway:
        kwargs["gateway"] = route.gateway
    if route.source:
        kwargs["prefsrc"] = route.source
    if route.metric:
        kwargs["priority"] = route.metric
    what = f"route to {route.destination}" + (f" via {route.gateway}" if route.gateway else "")
    if route.onlink:
        kwargs["flags"] = RTNH_F_ONLINK
    try:
        ipr.route("add", **kwargs)
    except Exception as exc:  # noqa: BLE001 - retried once, then reported
        if getattr(exc, "code", None) != errno.ENETUNREACH or not route.gateway or route.onlink:
            raise GuestError(f"network: {what}: {exc}") from exc
        # The gateway is outside every prefix of the device (Calico's 169.254.1.1).
        _netlink(what, ipr.route, "add", flags=RTNH_F_ONLINK, **kwargs)
    log.debug("network: %s dev %s", what, route.device)
