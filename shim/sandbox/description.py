"""PodDescription: everything a sandbox is built from, read once from the pod's spec.

The sandbox (pause) container's OCI spec is the only place containerd says
what the pod is: its hostname, cgroup, network namespace, sysctls and the
summed resources of its containers. It is checked here, before anything
exists, and frozen: bring-up steps read it and never change it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shim import errors
from shim.config import SizeOverrides

SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
# Kubernetes names are at most 253 characters; longer is not a real pod's.
LABEL_MAX = 253
# containerd's sum of the pod's container limits (on the sandbox spec).
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
# Names of /proc/sys entries ("kernel.shm_rmid_forced"); the guest checks them again.
SYSCTL_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_-]+)+")
MAX_SYSCTLS = 256
HOSTNAME_MAX = 63
NETNS_PATH_MAX = 4096


@dataclass(frozen=True)
class PodResources:
    """The pod's summed limits; 0 = none given."""

    cpu_quota_us: int = 0
    cpu_period_us: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class KubernetesPod:
    """Who the pod is to Kubernetes (for metrics labels and logs); "" when not a CRI pod."""

    name: str = ""
    namespace: str = ""
    uid: str = ""

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> KubernetesPod:
        return cls(*(annotations.get(key, "")[:LABEL_MAX]
                     for key in (SANDBOX_NAME, SANDBOX_NAMESPACE, SANDBOX_UID)))


@dataclass(frozen=True)
class PodDescription:
    sandbox_id: str
    hostname: str = ""
    cgroup_path: str = ""  # the pod's cgroup (the sandbox spec's linux.cgroupsPath)
    netns_path: str = ""   # CNI's namespace; "" = a namespace of the VM's own (loopback only)
    dns: tuple[str, ...] = ()  # resolv.conf lines, when not bind-mounted by containerd
    sysctls: tuple[tuple[str, str], ...] = ()
    resources: PodResources = field(default_factory=PodResources)
    size_overrides: SizeOverrides = field(default_factory=SizeOverrides)  # io.husk.* annotations
    kubernetes: KubernetesPod = field(default_factory=KubernetesPod)

    @property
    def sysctl_map(self) -> dict[str, str]:
        return dict(self.sysctls)

    @classmethod
    def from_spec(cls, sandbox_id: str, spec: Mapping[str, Any], annotations: Mapping[str, str],
                  cri_sandbox: bool = True,
                  size_overrides: SizeOverrides = SizeOverrides()) -> PodDescription:
        """:param cri_sandbox: a CRI pod (else a standalone container, ``ctr run``).
        :param size_overrides: the pod's io.husk.* size annotations, checked by the config.
        :raise errors.InvalidArgumentError: the spec asks for what a VM cannot give."""
        raw_linux = spec.get("linux")
        linux: Mapping[str, Any] = raw_linux if isinstance(raw_linux, dict) else {}
        hostname = spec.get("hostname") if isinstance(spec.get("hostname"), str) else ""
        hostname = (hostname or annotations.get(SANDBOX_NAME, "") or sandbox_id[:12])
        cgroup_path = linux.get("cgroupsPath")
        return cls(sandbox_id=sandbox_id, hostname=hostname[:HOSTNAME_MAX],
                   cgroup_path=cgroup_path if isinstance(cgroup_path, str) else "",
                   netns_path=network_namespace(linux, cri_sandbox), sysctls=tuple(sysctls(linux).items()),
                   resources=_resources(annotations), size_overrides=size_overrides,
                   kubernetes=KubernetesPod.from_annotations(annotations))


def network_namespace(linux: Mapping[str, Any], cri_sandbox: bool = True) -> str:
    """The path of the pod's network namespace ("" = a new, empty one).

    :raise errors.InvalidArgumentError: a CRI pod that uses the node's network
        (hostNetwork: no network namespace in its spec), which a VM cannot share.
        A standalone container without one gets the VM's own, empty network.
    """
    namespaces = linux.get("namespaces")
    entries = [ns for ns in namespaces if isinstance(ns, dict)] if isinstance(namespaces, list) else []
    for ns in entries:
        if ns.get("type") == "network":
            path = ns.get("path") or ""
            if not isinstance(path, str) or len(path) > NETNS_PATH_MAX or "\0" in path:
                raise errors.InvalidArgumentError("config.json: invalid network namespace path")
            return path
    if not cri_sandbox:
        return ""
    raise errors.InvalidArgumentError(
        "husk cannot run a pod in the node's network namespace (hostNetwork: true): "
        "its containers run in a VM, which has a network of its own; use another "
        "runtime class for host-network pods")


def sysctls(linux: Mapping[str, Any]) -> dict[str, str]:
    """The pod's sysctls (linux.sysctl), keys in dotted form.

    :raise errors.InvalidArgumentError: not a map of sysctl names to strings.
    """
    raw = linux.get("sysctl")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_SYSCTLS:
        raise errors.InvalidArgumentError("config.json: linux.sysctl must be a map of strings")
    found = {}
    for key, value in raw.items():
        name = str(key).replace("/", ".")
        if not isinstance(value, str) or not SYSCTL_NAME.fullmatch(name):
            raise errors.InvalidArgumentError(f"config.json: invalid sysctl {str(key)[:80]!r}")
        found[name] = value
    return found


def _int_annotation(annotations: Mapping[str, str], key: str) -> int:
    value = annotations.get(key, "").strip()
    if not value:
        return 0
    if not re.fullmatch(r"-?[0-9]{1,19}", value):
        raise errors.InvalidArgumentError(f"annotation {key}: {value[:40]!r} is not an integer")
    return max(0, int(value))  # containerd writes -1 or 0 for "no limit"


def _resources(annotations: Mapping[str, str]) -> PodResources:
    return PodResources(cpu_quota_us=_int_annotation(annotations, SANDBOX_CPU_QUOTA),
                        cpu_period_us=_int_annotation(annotations, SANDBOX_CPU_PERIOD),
                        memory_bytes=_int_annotation(annotations, SANDBOX_MEMORY))
