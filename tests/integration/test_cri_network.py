"""Pod networking through the CRI: husk pods get exactly the network CNI made.

The harness's containerd runs in a network namespace of its own with Debian's
bridge, host-local and portmap CNI plugins; every husk pod here is a real VM.
"""
from __future__ import annotations

import json

import pytest

from tests.cri.cri import CriClient
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(900)]


def _links(cri: CriClient, cid: str) -> dict[str, dict[str, object]]:
    """`ip -j addr` is not in busybox: parse `ip -o link` and `ip -o addr` instead."""
    links: dict[str, dict[str, object]] = {}
    for line in cri.exec_sync(cid, ["ip", "-o", "link"]).out.splitlines():
        fields = line.split()
        name = fields[1].rstrip(":").split("@")[0]
        links[name] = {"mtu": int(fields[fields.index("mtu") + 1]),
                       "mac": fields[fields.index("link/ether") + 1] if "link/ether" in fields else "",
                       "addrs": []}
    for line in cri.exec_sync(cid, ["ip", "-o", "addr"]).out.splitlines():
        fields = line.split()
        if fields[2] in ("inet", "inet6"):
            links[fields[1]]["addrs"].append(fields[3])  # type: ignore[union-attr]
    return links


def test_husk_pod_gets_the_cni_address_mac_and_mtu(cri: CriClient) -> None:
    pod = cri.run_pod("husk-net", handler="husk")
    status = cri.pod_status(pod.id)
    pod_ip = status.network.ip
    assert pod_ip.startswith("10.88."), f"PodSandboxStatus has no CNI address: {status.network}"
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    links = _links(cri, cid)
    assert "eth0" in links, f"no eth0 in the guest: {links}"
    assert any(a.startswith(pod_ip + "/") for a in links["eth0"]["addrs"]), links  # type: ignore[union-attr]
    print(json.dumps(links), cri.exec_sync(cid, ["ip", "route"]).out)
    cri.stop_container(cid, timeout=1)
    cri.remove_container(cid)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
