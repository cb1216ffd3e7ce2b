"""The harness's pod-networking side, checked with runc pods.

Two networks (the first dual-stack), hostPorts through portmap, crictl
port-forward, the recording CNI plugin's DEL records, host-local's allocations,
hostNetwork and DNS options: what the pod-networking tests of husk build on,
shown to work with a runtime whose networking is known to be right.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator

import pytest

from tests.cri.cni import CniNetwork
from tests.cri.cri import CriClient, Pod
from tests.cri.crictl import CRICTL_MISSING, Crictl, find_crictl
from tests.cri.fixtures import leak_checked
from tests.cri.harness import DEFAULT_KEEP_LOGS_DIR, Containerd, ContainerdOptions
from tests.cri.httpd import HTTP_PORT, http_get, start_httpd
from tests.cri.images import BUSYBOX_REF, BuiltImage

pytestmark = [pytest.mark.cri, pytest.mark.timeout(300)]

HANDLER = "runc"
NETWORKS = (
    CniNetwork("primary", "husk-br0", "10.88.0.0/16", "fd00:88::/64"),
    CniNetwork("second", "husk-br1", "10.89.0.0/16"),
)
HOST_PORT = 30080


@pytest.fixture(scope="module")
def net_containerd(cri_images: list[BuiltImage]) -> Iterator[Containerd]:
    opts = ContainerdOptions(images=cri_images, keep_logs_dir=DEFAULT_KEEP_LOGS_DIR, networks=NETWORKS)
    with Containerd.started(opts) as cd:
        yield cd


@pytest.fixture
def net_cri(net_containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    with leak_checked(net_containerd, request) as client:
        yield client




def _remove(cri: CriClient, pod: Pod) -> None:
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def test_pod_gets_an_interface_per_network_and_both_families_on_the_first(
        net_containerd: Containerd, net_cri: CriClient) -> None:
    cd, cri = net_containerd, net_cri
    pod = cri.run_pod("two-nets", handler=HANDLER)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    v4, v6 = cri.pod_ips(pod.id)
    assert ipaddress.ip_address(v4) in ipaddress.ip_network(NETWORKS[0].subnet)
    assert ipaddress.ip_address(v6) in ipaddress.ip_network(NETWORKS[0].subnet6 or "")
    addrs = cri.exec_sync(cid, ["ip", "-o", "addr", "show"]).out
    eth0 = " ".join(line for line in addrs.splitlines() if " eth0 " in line)
    eth1 = " ".join(line for line in addrs.splitlines() if " eth1 " in line)
    assert f"inet {v4}/16" in eth0 and f"inet6 {v6}/64" in eth0
    eth1_ip = re.search(r"inet (10\.89\.[0-9.]+)/16", eth1)
    assert eth1_ip, addrs
    # Default routes only through the primary network.
    assert cri.exec_sync(cid, ["ip", "route", "show", "default"]).out.split()[:5] == \
        ["default", "via", NETWORKS[0].gateway, "dev", "eth0"]
    # The bridges' addresses answer at once (no DAD on containerd's side).
    for gw in (cd.bridge_gateway(0), cd.bridge_gateway(0, ipv6=True), cd.bridge_gateway(1)):
        ping = cri.exec_sync(cid, ["ping", "-c", "1", "-W", "5", gw], timeout=30)
        assert ping.exit_code == 0, ping.out + ping.err
    assert cd.ipam_allocations() == {v4: pod.id, v6: pod.id, eth1_ip.group(1): pod.id}
    assert cd.ipam_allocations("second") == {eth1_ip.group(1): pod.id}

    cri.stop_pod(pod.id)
    assert cd.ipam_allocations() == {}, "host-local still holds the pod's addresses"
    records = cd.cni_del_records(pod.id)
    assert [(r["ifname"], r["netns_present"]) for r in records] == [("eth0", True), ("eth1", True)]
    first = records[0]
    assert first["errors"] == [] and first["network"].endswith("-primary")
    assert {link["ifname"] for link in first["links"]} == {"lo", "eth0", "eth1"}
    assert {q["dev"] for q in first["qdiscs"]} >= {"eth0", "eth1"}
    assert first["ingress_filters"] == []
    # eth1's record comes after eth0's network was torn down.
    assert "eth0" not in {link["ifname"] for link in records[1]["links"]}

    # Another StopPodSandbox DELs again, now without a netns; recorded, not overwritten.
    cri.stop_pod(pod.id)
    again = cd.cni_del_records(pod.id)[2:]
    assert [(r["ifname"], r["netns_present"], r["attempt"]) for r in again] == \
        [("eth0", False, 2), ("eth1", False, 2)]
    cri.remove_pod(pod.id)
    assert not json.dumps(cd.cni_del_records(pod.id)).count("Traceback")


def test_host_port_reaches_the_pod_from_containerds_netns(net_containerd: Containerd, net_cri: CriClient) -> None:
    cd, cri = net_containerd, net_cri
    pod = cri.run_pod("hostport", handler=HANDLER, port_mappings=[(HTTP_PORT, HOST_PORT, "TCP")])
    try:
        start_httpd(cri, pod)
        # The host side of the bridge, from this process (a socket made in containerd's netns) ...
        assert http_get(cd.connect(cd.bridge_gateway(), HOST_PORT)).endswith("hello from hostport\n")
        assert http_get(cd.connect(cd.bridge_gateway(ipv6=True), HOST_PORT)).endswith("hello from hostport\n")
        # ... and from a command run there, through loopback (portmap's snat).
        wget = cd.run_in_netns(["busybox", "wget", "-q", "-O-", f"http://127.0.0.1:{HOST_PORT}/"])
        assert (wget.returncode, wget.stdout) == (0, "hello from hostport\n"), wget.stderr
        nat = cd.run_in_netns(["iptables", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT"]).stdout
        assert f"--dports {HOST_PORT}" in nat
    finally:
        _remove(cri, pod)
    assert f"--dports {HOST_PORT}" not in cd.run_in_netns(["iptables", "-t", "nat", "-S"]).stdout


def test_crictl_port_forward_reaches_the_pod(net_containerd: Containerd, net_cri: CriClient) -> None:
    binary = find_crictl()
    if binary is None:
        pytest.skip(CRICTL_MISSING)
    cd, cri = net_containerd, net_cri
    pod = cri.run_pod("portfwd", handler=HANDLER)
    try:
        start_httpd(cri, pod)
        with Crictl(binary, cd).port_forward(pod.id, 0, HTTP_PORT) as fwd:
            assert fwd.local_port > 0
            for _ in range(2):  # each connection is a stream of its own
                assert http_get(fwd.connect()).endswith("hello from portfwd\n")
        assert fwd.proc.poll() is not None, "crictl port-forward outlived its block"
        assert "Handling connection" in fwd.output()
    finally:
        _remove(cri, pod)


def test_host_network_and_dns_options(net_containerd: Containerd, net_cri: CriClient) -> None:
    cd, cri = net_containerd, net_cri
    host = cri.run_pod("hostnet", handler=HANDLER, host_network=True)
    dns = cri.run_pod("dns", handler=HANDLER, dns=(["10.88.0.53"], ["example.test"], ["ndots:2"]))
    try:
        host_c = cri.run_container(host, BUSYBOX_REF, ["sleep", "600"])
        links = cri.exec_sync(host_c, ["ip", "-o", "link", "show"]).out
        assert NETWORKS[0].bridge in links, "a hostNetwork pod sees containerd's netns"
        assert cri.pod_ips(host.id) == []
        assert host.id not in cd.ipam_allocations().values()
        dns_c = cri.run_container(dns, BUSYBOX_REF, ["sleep", "600"])
        resolv = cri.exec_sync(dns_c, ["cat", "/etc/resolv.conf"]).out.split("\n")
        assert {"nameserver 10.88.0.53", "search example.test", "options ndots:2"} <= set(resolv)
    finally:
        for pod in (host, dns):
            _remove(cri, pod)
    assert cd.cni_del_records(host.id) == []
