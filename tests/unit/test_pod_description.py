"""PodDescription: what a sandbox is built from, checked before anything exists."""
from __future__ import annotations

from typing import Any

import pytest

from shim import errors
from shim.sandbox.description import PodDescription, PodResources


def _spec(**linux: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"},
                                           {"type": "ipc"}], "cgroupsPath": "/kubepods/pod1/sb"}
    base.update(linux)
    return {"hostname": "web", "linux": base}


def test_everything_comes_from_the_sandbox_spec() -> None:
    pod = PodDescription.from_spec("sb1", _spec(sysctl={"net/ipv4/ip_forward": "1"}), {
        "io.kubernetes.cri.sandbox-cpu-quota": "250000",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-memory": "268435456"})
    assert (pod.hostname, pod.netns_path, pod.cgroup_path) == (
        "web", "/var/run/netns/cni-1", "/kubepods/pod1/sb")
    assert pod.sysctl_map == {"net.ipv4.ip_forward": "1"}
    assert pod.resources == PodResources(250000, 100000, 268435456)


def test_hostname_falls_back_to_the_pod_name_then_the_id() -> None:
    spec = _spec()
    del spec["hostname"]
    assert PodDescription.from_spec("sb1", spec, {"io.kubernetes.cri.sandbox-name": "n"}).hostname == "n"
    assert PodDescription.from_spec("0123456789abcdef", spec, {}).hostname == "0123456789ab"


def test_a_host_network_pod_is_refused_but_a_plain_container_gets_its_own() -> None:
    spec = _spec(namespaces=[{"type": "ipc"}, {"type": "uts"}])
    with pytest.raises(errors.InvalidArgumentError, match="hostNetwork"):
        PodDescription.from_spec("sb1", spec, {})
    assert PodDescription.from_spec("ctr1", spec, {}, cri_sandbox=False).netns_path == ""
    new_netns = _spec(namespaces=[{"type": "network"}])
    assert PodDescription.from_spec("sb1", new_netns, {}).netns_path == ""


@pytest.mark.parametrize("annotations", [{"io.kubernetes.cri.sandbox-memory": "1e9"},
                                         {"io.kubernetes.cri.sandbox-cpu-quota": "9" * 40}])
def test_malformed_resource_annotations_are_refused(annotations: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="annotation"):
        PodDescription.from_spec("sb1", _spec(), annotations)


def test_unlimited_is_zero() -> None:
    pod = PodDescription.from_spec("sb1", _spec(), {"io.kubernetes.cri.sandbox-cpu-quota": "-1"})
    assert pod.resources.cpu_quota_us == 0


def test_a_bad_netns_path_is_refused() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="network namespace path"):
        PodDescription.from_spec("sb1", _spec(namespaces=[{"type": "network", "path": 7}]), {})
