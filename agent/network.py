"""The pod's network inside the guest, as CNI made it on the host.

The host sends the interfaces CNI created (name, MAC, MTU, addresses), its
routes and static neighbours. Each interface is the guest NIC with the same
MAC (waited for: a hot-plugged NIC appears some time after the request),
renamed to CNI's name; IPv6 addresses skip duplicate address detection, which
CNI's namespace already did for them. Routes are added in the order given
(on-link ones first), a gateway outside every prefix gets ``onlink``.

Runs in the guest's network namespace, which all the pod's containers share,
through iproute2's ``ip`` (one ``ip -batch`` for the links,
addresses, routes and neighbours): the agent loads no
netlink library, whose objects would take ~12 MiB of every guest's memory.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CommandError, DeadlineError, GuestError, InvalidArgumentError
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
IP = "ip"
IP_TIMEOUT_S = 10.0
MAX_LINKS = 4096
MAX_ADDRESS_BYTES = 64
# ip -batch names the line it stopped at; the kernel's reason is on the line before.
BATCH_FAILURE = re.compile(r"Command failed -:(\d+)")
# The kernel's ENETUNREACH for a gateway outside the device's prefixes, with and
# without extended acks.
UNREACHABLE = ("Nexthop has invalid gateway", "Network is unreachable")
BATCH_WHAT = "ip -batch"
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


@dataclass(frozen=True)
class Command:
    """One line of ``ip -batch``, and what it does in words for an error."""

    what: str
    line: str
    # Run instead once if the kernel finds this one's gateway unreachable.
    if_unreachable: Command | None = None


class CommandFailed(GuestError):
    def __init__(self, command: Command, reason: str) -> None:
        super().__init__(f"network: {command.what}: {reason}")
        self.command = command
        self.reason = reason


# Runs iproute2's ``ip ARGS`` in the pod's network namespace with the fd as its
# stdin; returns its stdout. :raise CommandError: it failed (the message ends
# with its stderr). :raise DeadlineError: it did not finish in time.
IpRunner = Callable[[list[str], "int | None"], Awaitable[str]]
# MAC → current name of every link in the pod's network namespace.
LinkLister = Callable[[], dict[str, str]]


def sysfs_links(class_net: Path) -> dict[str, str]:
    """MAC → current name of every link, from sysfs (``/sys/class/net``) of the
    namespace sysfs was mounted in: no process to start while a NIC is awaited."""
    links = {}
    try:
        names = os.listdir(class_net)
    except OSError as exc:
        raise GuestError(f"network: cannot list {class_net}: {exc.strerror}") from exc
    for name in names[:MAX_LINKS]:
        try:
            with open(class_net / name / "address", "rb") as f:
                mac = f.read(MAX_ADDRESS_BYTES).decode("ascii", "replace").strip().lower()
        except OSError:
            continue  # gone meanwhile, or no address
        links[mac] = name
    return links


async def _wait_for_nics(list_links: LinkLister, macs: list[str],
                         deadline: float) -> dict[str, str]:
    """MAC → name, once every MAC in ``macs`` is a link."""
    while True:
        links = list_links()
        missing = [mac for mac in macs if mac not in links]
        if not missing:
            return {mac: links[mac] for mac in macs}
        if time.monotonic() > deadline:
            raise DeadlineError(f"network: no NIC with MAC {missing[0]} appeared in the guest")
        await asyncio.sleep(NIC_POLL_S)


async def run_batch(run_ip: IpRunner, commands: list[Command]) -> None:
    """Run ``commands`` in order, in one ``ip -batch``.

    :raise CommandFailed: the first one the kernel refused, and why (those before it
        are done, none after it is).
    """
    if not commands:
        return
    fd = os.memfd_create("ip-batch", os.MFD_CLOEXEC)
    try:
        os.write(fd, "".join(f"{c.line}\n" for c in commands).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        await run_ip(["-batch", "-"], fd)
    except CommandError as exc:
        message = str(exc)
        failed = BATCH_FAILURE.search(message)
        if failed is None or not 1 <= int(failed.group(1)) <= len(commands):
            raise GuestError(f"network: {message}") from exc
        lines = message[:failed.start()].strip().splitlines()
        reason = lines[-1].removeprefix(f"{BATCH_WHAT} failed: ") if lines else "refused"
        for prefix in ("RTNETLINK answers: ", "Error: "):
            reason = reason.removeprefix(prefix)
        raise CommandFailed(commands[int(failed.group(1)) - 1], reason) from exc
    finally:
        os.close(fd)


async def configure(config: pb.NetworkConfig, nic_timeout_s: float, run_ip: IpRunner,
                    list_links: LinkLister) -> None:
    """Apply ``config`` (already check()ed) in the namespace ``run_ip`` runs ip in and
    ``list_links`` lists: all of it in one ``ip -batch`` (a process start costs ~0.1 s
    under TCG).

    :raise DeadlineError: a NIC did not appear within ``nic_timeout_s``.
    :raise GuestError: the kernel refused a link change, address, route or neighbour.
    """
    deadline = time.monotonic() + nic_timeout_s
    current = await _wait_for_nics(list_links, [iface.mac for iface in config.interfaces],
                                   deadline)
    commands = []
    # Renamed in two passes: the kernel's eth0 may be the NIC that must become eth1.
    for i, iface in enumerate(config.interfaces):
        name = current[iface.mac]
        commands += [Command(f"{iface.name} down", f"link set dev {name} down"),
                     Command(f"{iface.name} rename", f"link set dev {name} name husk{i}")]
    for i, iface in enumerate(config.interfaces):
        commands += [Command(f"{iface.name} rename", f"link set dev husk{i} name {iface.name}"),
                     Command(f"{iface.name} mtu", f"link set dev {iface.name} mtu {iface.mtu}")]
        for addr in iface.addresses:
            ip = ipaddress.ip_address(addr.address)
            commands.append(Command(
                f"{iface.name} address {ip}/{addr.prefix_len}",
                f"address add {ip}/{addr.prefix_len} dev {iface.name}"
                + (" nodad" if ip.version == 6 else "")))
        commands.append(Command(f"{iface.name} up", f"link set dev {iface.name} up"))
    # Routes in the order given (on-link ones first, so later gateways are reachable).
    commands += [_route_command(route) for route in config.routes]
    commands += [Command(f"neighbour {n.ip}", f"neigh add {ipaddress.ip_address(n.ip)} lladdr "
                                              f"{n.mac} dev {n.device} nud permanent")
                 for n in config.neighbors]
    await _run_with_onlink_retry(run_ip, commands)
    for iface in config.interfaces:
        log.info("network: %s (%s) mtu %d, %s", iface.name, iface.mac, iface.mtu,
                 ", ".join(f"{a.address}/{a.prefix_len}" for a in iface.addresses) or "no address")
    log.info("network: %d interfaces, %d routes, %d neighbours", len(config.interfaces),
             len(config.routes), len(config.neighbors))


def _route_command(route: pb.Route) -> Command:
    destination = ipaddress.ip_network(route.destination, strict=False)
    line = f"route add {destination} dev {route.device} scope {route.scope}"
    what = f"route to {route.destination}"
    if route.gateway:
        line += f" via {ipaddress.ip_address(route.gateway)}"
        what += f" via {route.gateway}"
    if route.source:
        line += f" src {ipaddress.ip_address(route.source)}"
    if route.metric:
        line += f" metric {route.metric}"
    if route.onlink:
        return Command(what, line + " onlink")
    # A gateway outside every prefix of its device (Calico's 169.254.1.1) is refused
    # as unreachable; it is tried once more as on-link.
    return Command(what, line, Command(what, line + " onlink") if route.gateway else None)


async def _run_with_onlink_retry(run_ip: IpRunner, commands: list[Command]) -> None:
    """run_batch, going on from a refused route with its on-link form once."""
    done = 0
    while done < len(commands):
        try:
            await run_batch(run_ip, commands[done:])
            return
        except CommandFailed as failure:
            i = commands.index(failure.command, done)
            retry = commands[i].if_unreachable
            if retry is None or not failure.reason.startswith(UNREACHABLE):
                raise
            commands[i] = retry
            done = i
