"""The host side of pod networking against a real kernel: a namespace made like CNI's
(a veth with addresses, routes and a static neighbour) gets its taps and tc
redirects, carries a frame from the wire to the tap, and is exactly as before after
disconnect."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.network import portforward, setup
from shim.network.netns import run_in_netns
from shim.network.model import Route

POD_MAC = "02:00:00:cc:00:05"
VNET_HDR_BYTES = 10  # struct virtio_net_hdr, before every frame of an IFF_VNET_HDR tap


def _run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def _state(ns: str) -> dict[str, object]:
    """What CNI DEL and the node see in the namespace."""
    links = json.loads(_run("ip", "-n", ns, "-d", "-j", "link"))
    for link in links:
        for volatile in ("operstate", "linkmode", "flags"):
            link.pop(volatile, None)
    return {"links": links,
            "addrs": json.loads(_run("ip", "-n", ns, "-j", "addr")),
            "routes": _run("ip", "-n", ns, "route") + _run("ip", "-n", ns, "-6", "route"),
            "qdiscs": _run("ip", "netns", "exec", ns, "tc", "qdisc", "show"),
            "filters": _run("ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "eth0",
                            "ingress")}


@pytest.fixture
def cni_ns() -> Iterator[tuple[str, str]]:
    """(pod namespace, wire namespace): eth0 in the pod, its peer on the "bridge" side."""
    pod, wire = (f"husk-ut-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for ns in (pod, wire):
        _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", pod, "link", "set", "lo", "up")  # CNI's loopback plugin
        _run("ip", "-n", pod, "link", "add", "eth0", "address", POD_MAC, "mtu", "1450",
             "type", "veth", "peer", "name", "wire0", "netns", wire)
        _run("ip", "-n", pod, "addr", "add", "10.77.0.5/24", "dev", "eth0")
        _run("ip", "-n", pod, "addr", "add", "fd00:77::5/64", "dev", "eth0", "nodad")
        _run("ip", "-n", pod, "link", "set", "eth0", "up")
        _run("ip", "-n", pod, "route", "add", "default", "via", "10.77.0.1")
        _run("ip", "-n", pod, "route", "add", "10.200.0.0/16", "via", "10.77.0.254", "metric", "5")
        _run("ip", "-n", pod, "neigh", "add", "10.77.0.9", "lladdr", "02:00:00:dd:00:09",
             "dev", "eth0", "nud", "permanent")
        _run("ip", "-n", wire, "addr", "add", "10.77.0.1/24", "dev", "wire0")
        _run("ip", "-n", wire, "link", "set", "wire0", "up")
        yield pod, wire
    finally:
        for ns in (pod, wire):
            subprocess.run(["ip", "netns", "delete", ns], check=False)


async def test_taps_carry_cni_interfaces_and_leave_nothing(cni_ns: tuple[str, str]) -> None:
    pod, wire = cni_ns
    before = _state(pod)
    net = await setup.connect(f"/run/netns/{pod}", queues=2, vhost=False)
    try:
        (iface,) = net.network.interfaces
        assert (iface.name, iface.mac, iface.mtu) == ("eth0", POD_MAC, 1450)
        assert {str(a) for a in iface.addresses} == {"10.77.0.5/24", "fd00:77::5/64"}
        routes = net.network.routes
        assert routes[0] == Route("0.0.0.0/0", "eth0", gateway="10.77.0.1")
        assert Route("10.200.0.0/16", "eth0", gateway="10.77.0.254", metric=5) in routes
        assert not any(r.destination.startswith("10.77.0.0") for r in routes), \
            "a route the kernel makes from the address was carried"
        assert [(n.ip, n.mac) for n in net.network.neighbors] == [("10.77.0.9", "02:00:00:dd:00:09")]
        (endpoint,) = net.endpoints
        assert endpoint.tap_name == "tap0_husk" and endpoint.queues == 2
        tap = json.loads(_run("ip", "-n", pod, "-j", "link", "show", "tap0_husk"))[0]
        assert tap["mtu"] == 1450
        for dev, target in (("eth0", "tap0_husk"), ("tap0_husk", "eth0")):
            shown = _run("ip", "netns", "exec", pod, "tc", "filter", "show", "dev", dev, "ingress")
            assert f"mirred (Egress Redirect to device {target})" in shown
        # A frame from the wire reaches the tap (what QEMU would read).
        _run("ip", "netns", "exec", wire, sys.executable, "-c",
             "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
             ".sendto(b'x', ('10.77.0.5', 9))")
        assert _arp_for("10.77.0.5", endpoint.tap_fds), "the wire's ARP request did not reach the tap"
    finally:
        await setup.disconnect(net)
    assert _state(pod) == before, "the namespace is not as CNI left it"


def _arp_for(ip: str, fds: list[int], timeout_s: float = 3.0) -> bool:
    """An ARP request for ``ip`` among the frames queued on the tap (each read is one
    frame after the virtio-net header)."""
    target = bytes(int(part) for part in ip.split("."))
    for fd in fds:
        os.set_blocking(fd, False)
    while select.select(fds, [], [], timeout_s)[0]:
        for fd in fds:
            try:
                frame = os.read(fd, 65536)[VNET_HDR_BYTES:]
            except BlockingIOError:
                continue
            if frame[12:14] == b"\x08\x06" and frame[14 + 24:14 + 28] == target:
                return True
    return False


async def test_a_path_that_is_not_a_network_namespace_is_refused(tmp_path: object) -> None:
    with pytest.raises(setup.NetworkError, match="not a network namespace"):
        await setup.connect("/proc/self/ns/pid", queues=1, vhost=False)
    with pytest.raises(setup.NetworkError, match="cannot open"):
        await setup.connect("/run/netns/husk-no-such-namespace", queues=1, vhost=False)


async def test_delete_after_a_killed_shim_restores_the_namespace(cni_ns: tuple[str, str],
                                                                 tmp_path: Path) -> None:
    """The shim died: QEMU with it (the taps went with their fds), husk's filter, qdisc and
    port-forward rule are still there; clean_up_record removes them from the record."""
    pod, _ = cni_ns
    before = _state(pod)
    path = f"/run/netns/{pod}"
    net = await setup.connect(path, queues=1, vhost=False)
    listener = await run_in_netns(path, portforward._listen_and_redirect, 30, "t")
    setup.save_record(tmp_path, net, listener.getsockname()[1])
    listener.close()
    net.close_fds()  # what the shim's and QEMU's deaths do
    assert "husk port-forward" in _run("ip", "netns", "exec", pod, "iptables", "-t", "nat", "-S")
    assert setup.clean_up_record(tmp_path) == []
    assert _state(pod) == before, "the namespace is not as CNI left it"
    assert "husk port-forward" not in _run("ip", "netns", "exec", pod, "iptables", "-t", "nat", "-S")
    assert setup.clean_up_record(tmp_path / "nothing-here") == []
