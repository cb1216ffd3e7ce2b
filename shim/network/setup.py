"""The pod's network, host side: from what CNI made to tap fds QEMU can take.

connect() reads the pod's network namespace, makes a tap per CNI interface
and wires them with tc (shim.network.tcfilter); disconnect() puts the
namespace back as CNI left it, so CNI DEL finds its interfaces untouched.
"""
from __future__ import annotations

import logging
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.network.model import PodNetwork
from shim.network.netns import NetnsError, call_in_netns, run_in_netns
from shim.network.scan import ScanError, scan
from shim.network.scan import HostLink
from shim.network.tcfilter import TapEndpoint, TcFilterError, attach, detach

log = logging.getLogger(__name__)

# What the shim changed in the pod's namespace, in its run dir (never shared with
# the guest), for the ``delete`` of a shim that was killed.
NETWORK_RECORD = "network.json"
MAX_RECORD_BYTES = 64 * 1024

# Reading a namespace and making a few taps takes milliseconds; this bounds a
# kernel or a netlink socket that stopped answering.
NETNS_TIMEOUT_S = 10.0


class NetworkError(Exception):
    """The pod's network cannot be carried into its VM; the message says why."""


@dataclass
class PodNetworking:
    netns_path: str
    network: PodNetwork = field(default_factory=PodNetwork)
    endpoints: list[TapEndpoint] = field(default_factory=list)

    def close_fds(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close_fds()


def _iproute() -> Any:
    """An IPRoute in the calling thread's namespace. Imported here: only pods
    with a network pay for pyroute2."""
    from pyroute2 import IPRoute
    # pyroute2's import sets its logger to log every netlink message (a page each);
    # shim.network's lines say what was done.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    return IPRoute()


def _connect_in_netns(queues: int, vhost: bool, known: frozenset[str] = frozenset(),
                      first_tap: int = 0) -> tuple[PodNetwork, list[TapEndpoint]]:
    """Taps for the interfaces not in ``known``; the network of those interfaces."""
    with _iproute() as ipr:
        network, links = scan(ipr)
        endpoints: list[TapEndpoint] = []
        try:
            for link in (link for link in links if link.name not in known):
                endpoints.append(attach(ipr, link, first_tap + len(endpoints), queues, vhost))
        except BaseException:
            for endpoint in endpoints:
                detach(ipr, endpoint)
            raise
    return network.only({e.link.name for e in endpoints}), endpoints


def _disconnect_in_netns(endpoints: list[TapEndpoint]) -> list[str]:
    with _iproute() as ipr:
        return [p for endpoint in endpoints for p in detach(ipr, endpoint)]


def _discard(result: tuple[PodNetwork, list[TapEndpoint]]) -> None:
    for endpoint in result[1]:
        endpoint.close_fds()


async def connect(netns_path: str, queues: int, vhost: bool) -> PodNetworking:
    """Taps for every CNI interface in ``netns_path``.

    :raise NetworkError: the namespace cannot be read or a tap cannot be made;
        nothing is left in the namespace.
    """
    try:
        network, endpoints = await run_in_netns(
            netns_path, lambda: _connect_in_netns(queues, vhost), NETNS_TIMEOUT_S,
            "connect", _discard)
    except (NetnsError, ScanError, TcFilterError) as exc:
        raise NetworkError(str(exc)) from exc
    except TimeoutError as exc:
        raise NetworkError(f"setting up taps in {netns_path} took longer than "
                           f"{NETNS_TIMEOUT_S:.0f}s") from exc
    log.info("network: %s", network.describe())
    return PodNetworking(netns_path, network, endpoints)


async def connect_new(networking: PodNetworking, queues: int,
                      vhost: bool) -> tuple[PodNetwork, list[TapEndpoint]]:
    """Taps for interfaces that appeared after connect(); they join ``networking``.

    :raise NetworkError: as connect().
    """
    known = frozenset(e.link.name for e in networking.endpoints)
    first_tap = len(networking.endpoints)  # taps are numbered in order and never removed
    try:
        network, endpoints = await run_in_netns(
            networking.netns_path,
            lambda: _connect_in_netns(queues, vhost, known, first_tap),
            NETNS_TIMEOUT_S, "connect-new", _discard)
    except (NetnsError, ScanError, TcFilterError) as exc:
        raise NetworkError(str(exc)) from exc
    except TimeoutError as exc:
        raise NetworkError(f"setting up taps in {networking.netns_path} took longer than "
                           f"{NETNS_TIMEOUT_S:.0f}s") from exc
    networking.endpoints += endpoints
    return network, endpoints


async def disconnect(networking: PodNetworking) -> None:
    """Remove the taps and husk's tc filters; problems are logged, never raised
    (teardown goes on, and the namespace goes with the pod anyway)."""
    networking.close_fds()
    if not networking.endpoints:
        return
    try:
        problems = await run_in_netns(
            networking.netns_path, lambda: _disconnect_in_netns(networking.endpoints),
            NETNS_TIMEOUT_S, "disconnect")
    except NetnsError as exc:
        log.info("network: %s (already gone with the pod)", exc)
        return
    except TimeoutError:
        log.error("network: removing taps from %s took longer than %.0fs",
                  networking.netns_path, NETNS_TIMEOUT_S)
        return
    except Exception as exc:  # noqa: BLE001 - teardown must go on
        log.error("network: cannot clean up %s: %s", networking.netns_path, exc)
        return
    for problem in problems:
        log.error("network: teardown left %s", problem)
    if not problems:
        log.info("network: taps and filters removed from %s", networking.netns_path)


def save_record(run_dir: Path, networking: PodNetworking, forward_port: int) -> None:
    """Note the taps, qdiscs and port-forward rule made in the pod's namespace."""
    record = {"netns": networking.netns_path, "forward_port": forward_port,
              "endpoints": [{"link": e.link.name, "link_index": e.link.index,
                             "tap": e.tap_name, "made_ingress": e.made_ingress}
                            for e in networking.endpoints]}
    tmp = run_dir / (NETWORK_RECORD + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / NETWORK_RECORD)


def _load_record(run_dir: Path) -> tuple[str, int, list[TapEndpoint]]:
    with open(run_dir / NETWORK_RECORD, "rb") as f:
        record = json.loads(f.read(MAX_RECORD_BYTES))
    endpoints = [TapEndpoint(HostLink(int(e["link_index"]), str(e["link"]), "", 0, ""),
                             str(e["tap"]), made_ingress=[str(m) for m in e["made_ingress"]])
                 for e in record["endpoints"]]
    return str(record["netns"]), int(record["forward_port"]), endpoints


def clean_up_record(run_dir: Path) -> list[str]:
    """After a killed shim: undo what its record lists; returns warnings.

    QEMU died with the shim, which took the taps with it; husk's filters, the
    qdiscs it made and the port-forward rule are still in the namespace (if
    the namespace itself still is).
    """
    from shim.network.portforward import remove_rule
    try:
        netns, forward_port, endpoints = _load_record(run_dir)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"unreadable {NETWORK_RECORD}: {exc}"]

    def undo() -> list[str]:
        problems = _disconnect_in_netns(endpoints)
        if forward_port:
            try:
                remove_rule(forward_port)
            except Exception as exc:  # noqa: BLE001 - reported
                problems.append(f"port-forward rule: {exc}")
        return problems

    try:
        return call_in_netns(netns, undo, NETNS_TIMEOUT_S, "clean-up")
    except NetnsError:
        return []  # the namespace is gone, and everything in it
    except Exception as exc:  # noqa: BLE001 - reported
        return [f"network clean-up in {netns}: {exc}"]
