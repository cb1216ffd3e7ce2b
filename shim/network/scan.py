"""What CNI made in the pod's network namespace: interfaces, addresses, routes, neighbours.

Runs inside the namespace (shim.network.netns) with a pyroute2 IPRoute made
there. Only what the guest needs is kept: the loopback, husk's own taps, the
fallback tunnel devices the kernel creates in every namespace, routes the
kernel derives from addresses and link-local IPv6 addresses are left out.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from shim.network.model import (MAX_ADDRESSES_PER_INTERFACE, MAX_INTERFACES, MAX_NEIGHBORS,
                                MAX_ROUTES, Interface, IpAddress, Neighbor, PodNetwork, Route,
                                route_order)

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
MAIN_TABLE = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
NUD_PERMANENT = 0x80
# Devices the kernel makes in every namespace once their module is loaded.
FALLBACK_TUNNEL_KINDS = frozenset({"ipip", "gre", "gretap", "erspan", "vti", "vti6", "sit",
                                   "ip6tnl", "ip6gre", "ip6gretap", "ip6erspan"})
TAP_SUFFIX = "_husk"  # husk's taps: tap<N>_husk


class ScanError(Exception):
    """The namespace holds something husk cannot carry into a VM."""


@dataclass(frozen=True)
class HostLink:
    """One CNI interface as the host sees it."""

    index: int
    name: str
    kind: str
    mtu: int
    mac: str


def is_husk_tap(name: str) -> bool:
    return name.startswith("tap") and name.endswith(TAP_SUFFIX)


def _kind(link: Any) -> str:
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""


def scan(ipr: Any) -> tuple[PodNetwork, list[HostLink]]:
    """Read the namespace ``ipr`` was opened in.

    :raise ScanError: more interfaces, addresses or routes than a pod may have.
    """
    links: list[HostLink] = []
    for link in ipr.get_links():
        name = link.get("ifname") or ""
        kind = _kind(link)
        if link["flags"] & IFF_LOOPBACK or is_husk_tap(name) or kind in FALLBACK_TUNNEL_KINDS:
            continue
        if not link["flags"] & IFF_UP:
            log.info("network: leaving out %s (%s): it is down", name, kind or "device")
            continue
        mac = link.get("address") or ""
        if not mac or mac == "00:00:00:00:00:00":
            raise ScanError(f"interface {name} ({kind or 'device'}) has no MAC address: "
                            "husk carries Ethernet interfaces only")
        links.append(HostLink(link["index"], name, kind, link.get("mtu") or 1500, mac))
    if len(links) > MAX_INTERFACES:
        raise ScanError(f"the pod has {len(links)} interfaces; husk carries at most "
                        f"{MAX_INTERFACES}")
    by_index = {link.index: link for link in links}
    addresses: dict[int, list[IpAddress]] = {i: [] for i in by_index}
    for addr in ipr.get_addr():
        index = addr["index"]
        ip = addr.get("address")
        if index not in by_index or not ip or ipaddress.ip_address(ip).is_link_local:
            continue
        addresses[index].append(IpAddress(ip, addr["prefixlen"]))
    interfaces = []
    for link in links:
        if len(addresses[link.index]) > MAX_ADDRESSES_PER_INTERFACE:
            raise ScanError(f"interface {link.name} has more than "
                            f"{MAX_ADDRESSES_PER_INTERFACE} addresses")
        interfaces.append(Interface(link.name, link.mac, link.mtu,
                                    tuple(addresses[link.index])))
    routes = _routes(ipr, by_index)
    neighbors = _neighbors(ipr, by_index)
    return PodNetwork(tuple(interfaces), routes, neighbors), links


def _routes(ipr: Any, links: dict[int, HostLink]) -> tuple[Route, ...]:
    routes = []
    for msg in ipr.get_routes(family=socket.AF_UNSPEC, table=MAIN_TABLE):
        oif = msg.get("oif")
        if (msg["proto"] == RTPROT_KERNEL or msg["type"] != RTN_UNICAST or oif not in links
                or msg.get("multipath") is not None):
            continue
        family_any = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
        destination = f"{msg.get('dst') or family_any}/{msg['dst_len']}"
        if ipaddress.ip_network(destination, strict=False).is_link_local:
            continue
        routes.append(Route(destination=destination, device=links[oif].name,
                            gateway=msg.get("gateway") or "", source=msg.get("prefsrc") or "",
                            scope=msg["scope"], metric=msg.get("priority") or 0,
                            onlink=bool(msg["flags"] & RTNH_F_ONLINK)))
    if len(routes) > MAX_ROUTES:
        raise ScanError(f"the pod has {len(routes)} routes; husk carries at most {MAX_ROUTES}")
    return tuple(sorted(routes, key=route_order))


def _neighbors(ipr: Any, links: dict[int, HostLink]) -> tuple[Neighbor, ...]:
    found = []
    for msg in ipr.get_neighbours():
        ip, mac = msg.get("dst"), msg.get("lladdr")
        if msg["state"] & NUD_PERMANENT and msg["ifindex"] in links and ip and mac:
            found.append(Neighbor(ip, mac, links[msg["ifindex"]].name))
    if len(found) > MAX_NEIGHBORS:
        raise ScanError(f"the pod has {len(found)} static neighbours; husk carries at most "
                        f"{MAX_NEIGHBORS}")
    return tuple(found)
