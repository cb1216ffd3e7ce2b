"""The pod's network as CNI left it, in the form the guest is configured from.

Read from the pod's network namespace (shim.network.scan), carried to the
agent (proto NetworkConfig) and applied there in the guest's namespace.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Interfaces the shim carries into one VM, and what the agent accepts for one pod.
MAX_INTERFACES = 16
MAX_ADDRESSES_PER_INTERFACE = 32
MAX_ROUTES = 256
MAX_NEIGHBORS = 256


@dataclass(frozen=True)
class IpAddress:
    address: str  # "10.88.0.5", "fd00::5"
    prefix_len: int

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(f"{self.address}/{self.prefix_len}")

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix_len}"


@dataclass(frozen=True)
class Interface:
    name: str  # as in the pod's namespace ("eth0"); the guest NIC is renamed to it
    mac: str   # the guest NIC's MAC: how the agent finds it
    mtu: int
    addresses: tuple[IpAddress, ...] = ()


@dataclass(frozen=True)
class Route:
    destination: str  # CIDR; "0.0.0.0/0" or "::/0" for a default route
    device: str
    gateway: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_*: 0 universe, 253 link
    metric: int = 0
    onlink: bool = False

    @property
    def family(self) -> int:
        return ipaddress.ip_network(self.destination, strict=False).version


@dataclass(frozen=True)
class Neighbor:
    """A static (permanent) ARP/NDP entry CNI made."""

    ip: str
    mac: str
    device: str


@dataclass(frozen=True)
class PodNetwork:
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = field(default_factory=tuple)

    def only(self, names: set[str]) -> PodNetwork:
        """The part of the network on the interfaces ``names``."""
        return PodNetwork(tuple(i for i in self.interfaces if i.name in names),
                          tuple(r for r in self.routes if r.device in names),
                          tuple(n for n in self.neighbors if n.device in names))

    def describe(self) -> str:
        """One log line: "eth0 aa:..:01 mtu 1500 10.88.0.5/16; 2 routes"."""
        parts = [f"{i.name} {i.mac} mtu {i.mtu} " + ",".join(map(str, i.addresses))
                 for i in self.interfaces]
        return "; ".join(parts or ["no interfaces"]) + f"; {len(self.routes)} routes"


def route_order(route: Route) -> tuple[int, int]:
    """Routes without a gateway (on-link) first, so every gateway is reachable when its
    routes are added; then default routes, then the rest. Stable within each group."""
    if not route.gateway:
        return (0, 0)
    is_default = ipaddress.ip_network(route.destination, strict=False).prefixlen == 0
    return (1, 0 if is_default else 1)
