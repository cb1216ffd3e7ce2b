"""Pod networking through the CRI: husk pods get exactly the network CNI made.

A containerd of this module's own (the session's husk handlers) with two CNI
networks from Debian's bridge, host-local and portmap plugins, all inside a
network namespace the harness made: the primary network dual-stack, the second
with its own MTU and an extra route. Every husk pod is a real VM; a runc pod
on the same bridges is the reference.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as api

from tests.cri.cni import CniNetwork
from tests.cri.cri import CriClient, CriError, Pod
from tests.cri.crictl import Crictl, find_crictl
from tests.cri.fixtures import leak_checked
from tests.cri.harness import Containerd, ContainerdOptions
from tests.cri.httpd import HTTP_PORT, http_get, start_httpd
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(900)]

NETWORKS = (
    CniNetwork("primary", "husk-br0", "10.88.0.0/16", "fd00:88::/64"),
    CniNetwork("second", "husk-br1", "10.89.0.0/16", mtu=1400, routes=("10.200.0.0/16",)),
)
HOST_PORT = 30081
TAP = re.compile(r"tap\d+_husk")


@pytest.fixture(scope="module")
def net_containerd(containerd_options: ContainerdOptions) -> Iterator[Containerd]:
    with Containerd.started(dataclasses.replace(containerd_options, networks=NETWORKS)) as cd:
        yield cd


@pytest.fixture
def cri(net_containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    with leak_checked(net_containerd, request) as client:
        yield client


def _links(output_link: str, output_addr: str) -> dict[str, dict[str, object]]:
    """`ip -o link` and `ip -o addr` (busybox or iproute2) as {name: {mac, mtu, addrs}}."""
    links: dict[str, dict[str, object]] = {}
    for line in output_link.splitlines():
        fields = line.split()
        name = fields[1].rstrip(":").split("@")[0]
        mac = fields[fields.index("link/ether") + 1] if "link/ether" in fields else ""
        links[name] = {"mtu": int(fields[fields.index("mtu") + 1]), "mac": mac, "addrs": set()}
    for line in output_addr.splitlines():
        fields = line.split()
        if fields[2] in ("inet", "inet6") and fields[1] in links:
            links[fields[1]]["addrs"].add(fields[3])  # type: ignore[union-attr]
    return links


def _guest_links(cri: CriClient, cid: str) -> dict[str, dict[str, object]]:
    return _links(cri.exec_sync(cid, ["ip", "-o", "link"]).out,
                  cri.exec_sync(cid, ["ip", "-o", "addr"]).out)


def _host_links(cd: Containerd, pod_id: str) -> dict[str, dict[str, object]]:
    return _links(cd.run_in_pod_netns(pod_id, ["ip", "-o", "link"]).stdout,
                  cd.run_in_pod_netns(pod_id, ["ip", "-o", "addr"]).stdout)




def _remove(cri: CriClient, *pods: Pod) -> None:
    for pod in pods:
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)


def test_husk_pod_has_the_cni_network_and_serves_it(net_containerd: Containerd,
                                                     cri: CriClient) -> None:
    """Addresses (v4 and v6), MACs, MTUs and routes of both networks in the guest; a
    server in the pod answers the node, a hostPort and crictl port-forward; DNS as
    the CRI asked; an interface added after boot is hot-plugged; after teardown no
    tap or filter and host-local released every address."""
    cd = net_containerd
    pod = cri.run_pod("husk-net", handler="husk", port_mappings=[(HTTP_PORT, HOST_PORT, "TCP")],
                      dns=(["10.88.0.53"], ["example.test"], ["ndots:2"]))
    try:
        v4, v6 = cri.pod_ips(pod.id)
        assert ipaddress.ip_address(v4) in ipaddress.ip_network(NETWORKS[0].subnet)
        assert ipaddress.ip_address(v6) in ipaddress.ip_network(NETWORKS[0].subnet6 or "")
        server = start_httpd(cri, pod)
        guest, host = _guest_links(cri, server), _host_links(cd, pod.id)
        for name in ("eth0", "eth1"):
            assert guest[name]["mac"] == host[name]["mac"], f"{name}: guest MAC is not CNI's"
            assert guest[name]["mtu"] == host[name]["mtu"], f"{name}: guest MTU is not CNI's"
            global_addrs = {a for a in host[name]["addrs"] if not a.startswith("fe80")}  # type: ignore[union-attr]
            assert global_addrs <= guest[name]["addrs"], f"{name}: {guest[name]} vs {host[name]}"  # type: ignore[operator]
        assert guest["eth1"]["mtu"] == 1400
        assert {f"{v4}/16", f"{v6}/64"} <= guest["eth0"]["addrs"]  # type: ignore[operator]
        assert not any(TAP.fullmatch(n) for n in guest), "a host tap is visible in the guest"
        routes = cri.exec_sync(server, ["ip", "route"]).out
        assert f"default via {NETWORKS[0].gateway} dev eth0" in routes, routes
        assert f"10.200.0.0/16 via {NETWORKS[1].gateway} dev eth1" in routes, routes
        assert f"default via {NETWORKS[0].gateway6} dev eth0" in \
            cri.exec_sync(server, ["ip", "-6", "route"]).out
        resolv = set(cri.exec_sync(server, ["cat", "/etc/resolv.conf"]).out.splitlines())
        assert {"nameserver 10.88.0.53", "search example.test", "options ndots:2"} <= resolv

        # The node (the host side of the bridge) reaches the server over both families...
        hello = "hello from husk-net\n"
        assert http_get(cd.connect(v4, HTTP_PORT)).endswith(hello)
        assert http_get(cd.connect(v6, HTTP_PORT)).endswith(hello)
        # ...through a hostPort (portmap's DNAT on the node)...
        assert http_get(cd.connect(cd.bridge_gateway(), HOST_PORT)).endswith(hello)
        # ...and through containerd's PortForward (localhost in the pod's netns).
        binary = find_crictl()
        if binary is not None:
            with Crictl(binary, cd).port_forward(pod.id, 0, HTTP_PORT) as fwd:
                for _ in range(2):
                    assert http_get(fwd.connect()).endswith(hello)
        # Without crictl the same path as containerd's: dial localhost in the pod netns.
        wget = cd.run_in_pod_netns(pod.id, ["busybox", "wget", "-q", "-O-",
                                            f"http://127.0.0.1:{HTTP_PORT}/"])
        assert (wget.returncode, wget.stdout) == (0, hello), wget.stderr

        # An interface CNI (or Multus) adds to the running pod is hot-plugged.
        late = ["ip", "link", "add", "net9", "address", "02:00:00:00:09:09", "mtu", "1300",
                "type", "veth", "peer", "name", "net9peer"]
        for argv in (late, ["ip", "addr", "add", "10.123.0.5/24", "dev", "net9"],
                     ["ip", "link", "set", "net9", "up"],
                     ["ip", "route", "add", "10.124.0.0/16", "via", "10.123.0.1"]):
            done = cd.run_in_pod_netns(pod.id, argv)
            assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 60
        while "net9" not in (guest := _guest_links(cri, server)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert guest.get("net9", {}).get("mac") == "02:00:00:00:09:09", guest
        assert guest["net9"]["mtu"] == 1300 and "10.123.0.5/24" in guest["net9"]["addrs"]  # type: ignore[operator]
        for _ in range(20):
            if "10.124.0.0/16 via 10.123.0.1 dev net9" in cri.exec_sync(server, ["ip", "route"]).out:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the hot-plugged interface's route is missing")
    finally:
        _remove(cri, pod)
    assert pod.id not in cd.ipam_allocations().values(), "CNI DEL did not release the addresses"
    (eth0, *_) = [r for r in cd.cni_del_records(pod.id) if r["netns_present"]]
    assert eth0["ifname"] == "eth0" and eth0["errors"] == []
    assert not [link["ifname"] for link in eth0["links"] if TAP.fullmatch(link["ifname"])], \
        "a tap outlived the pod"
    assert eth0["ingress_filters"] == [], "husk's tc filter outlived the pod"
    assert "ingress" not in {q.get("kind") for q in eth0["qdiscs"]}, "husk's qdisc outlived the pod"
    assert "husk port-forward" not in cd.run_in_netns(["iptables", "-t", "nat", "-S"]).stdout


def test_husk_and_runc_pods_reach_each_other(cri: CriClient) -> None:
    """Two husk pods and a runc pod on the same bridges: ping and HTTP, every pair, both ways."""
    pods = [cri.run_pod(name, handler=handler)
            for name, handler in (("husk-a", "husk"), ("husk-b", "husk"), ("runc-c", "runc"))]
    try:
        servers = {pod.name: (start_httpd(cri, pod), cri.pod_ips(pod.id)[0]) for pod in pods}
        for src, (src_cid, _) in servers.items():
            for dst, (_, dst_ip) in servers.items():
                if src == dst:
                    continue
                ping = cri.exec_sync(src_cid, ["ping", "-c", "1", "-W", "5", dst_ip], timeout=30)
                assert ping.exit_code == 0, f"{src} -> {dst}: {ping.out}{ping.err}"
                # (busybox 1.35's wget -T segfaults: the exec's timeout bounds it instead)
                got = cri.exec_sync(src_cid, ["wget", "-q", "-O-", f"http://{dst_ip}:{HTTP_PORT}/"],
                                    timeout=30)
                assert got.out == f"hello from {dst}\n", f"{src} -> {dst}: {got.err}"
    finally:
        _remove(cri, *pods)


def test_host_network_pod_is_refused(net_containerd: Containerd, cri: CriClient) -> None:
    with pytest.raises(CriError) as refused:
        cri.run_pod("husk-hostnet", handler="husk", host_network=True)
    assert "hostNetwork" in refused.value.details, refused.value.details
    assert [p for p in cri.list_pods() if p.metadata.name == "husk-hostnet" and p.state == 0] == []
    # The leak check (fixture) covers shims, VMs, mounts and cgroups.
    assert net_containerd.ipam_allocations() == {}


@pytest.mark.skipif(os.environ.get("HUSK_TEST_TEMPLATES") == "off",
                    reason="VM templates are off (HUSK_TEST_TEMPLATES=off)")
def test_pods_restored_from_one_template_are_distinct_guests(
        net_containerd: Containerd, cri: CriClient, tmp_path: Path) -> None:
    """Two pods from the same VM template: each its own hostname, random state, clock,
    MAC and addresses (its NICs hot-plugged after the restore), and volume."""
    cd = net_containerd
    # The host's clock as it ran when the guests were given it: a step of the host's
    # clock (NTP on the CI machine) after that moves time.time() but not the guests.
    wall_minus_monotonic = time.time() - time.monotonic()
    pods = [cri.run_pod(f"husk-clone-{i}", handler="husk") for i in range(2)]
    try:
        guests = []
        for i, pod in enumerate(pods):
            volume = tmp_path / f"vol{i}"
            volume.mkdir()
            server = start_httpd(cri, pod)
            worker = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], mounts=[
                api.Mount(container_path="/data", host_path=str(volume))])
            # Restored, not booted: the template's kernel command line.
            assert "husk.template=1" in cri.exec_sync(worker, ["cat", "/proc/cmdline"]).out
            assert cri.exec_sync(worker, ["hostname"]).out == f"husk-clone-{i}\n"
            guest_clock = int(cri.exec_sync(worker, ["date", "+%s"]).out)
            off_by = min(abs(guest_clock - time.time()),
                         abs(guest_clock - (time.monotonic() + wall_minus_monotonic)))
            assert off_by < 10, "the guest kept its template's clock"
            cri.exec_sync(worker, ["sh", "-c", f"echo pod{i} > /data/who"])
            assert (volume / "who").read_text() == f"pod{i}\n"
            v4 = cri.pod_ips(pod.id)[0]
            assert http_get(cd.connect(v4, HTTP_PORT)).endswith(f"hello from husk-clone-{i}\n")
            guests.append({
                "random": cri.exec_sync(worker, ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]).out,
                "mac": _guest_links(cri, server)["eth0"]["mac"], "ip": v4,
                "host_mac": _host_links(cd, pod.id)["eth0"]["mac"]})
        first, second = guests
        assert first["random"] != second["random"], "both guests draw the same random bytes"
        assert first["mac"] != second["mac"] and first["ip"] != second["ip"]
        assert [g["mac"] for g in guests] == [g["host_mac"] for g in guests]
    finally:
        _remove(cri, *pods)
