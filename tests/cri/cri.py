"""A thin typed client for the CRI v1 API, as the kubelet would drive it.

Owns the gRPC channel to a containerd CRI endpoint and the request shapes the
tests use (pods, containers, exec, logs), plus parsing of CRI container log
files. Every call has a deadline; the default is generous because a husk pod
boots a VM under TCG. The generated stubs come from the PyPI package
container-runtime-interface-api (module cri_api.v1).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from cri_api.v1 import api_pb2 as api
from cri_api.v1 import api_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

DEFAULT_CALL_TIMEOUT_S = 120.0
# ExecSync's own timeout is enforced by the runtime; the RPC gets this much on top.
EXEC_RPC_MARGIN_S = 30.0
POLL_INTERVAL_S = 0.1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_POD_NAMESPACE = "default"

ContainerState = api.ContainerState
PodSandboxState = api.PodSandboxState
# (container port, host port, protocol "TCP" | "UDP" | "SCTP"); host port 0 = none.
PortMapping = tuple[int, int, str]
# resolv.conf of the pod: (servers, searches, options).
DnsConfig = tuple[list[str], list[str], list[str]]

T = TypeVar("T")


# The runtime conditions the CRI spec requires; a pod can run once both are true.
REQUIRED_CONDITIONS = frozenset({"RuntimeReady", "NetworkReady"})


class CriError(RuntimeError):
    """A CRI call failed; `code` is the gRPC status code."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"CRI {method} failed: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class ExecResult(NamedTuple):
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass(frozen=True)
class Pod:
    """A pod sandbox the client created, with the config CreateContainer needs again."""

    id: str
    config: api.PodSandboxConfig
    handler: str

    @property
    def name(self) -> str:
        return self.config.metadata.name

    @property
    def log_directory(self) -> Path:
        return Path(self.config.log_directory)


@dataclass(frozen=True)
class ContainerLog:
    """A container's CRI log file as plain text per stream."""

    stdout: str
    stderr: str


_PROTOCOLS = {"TCP": api.Protocol.TCP, "UDP": api.Protocol.UDP, "SCTP": api.Protocol.SCTP}


def _port_mapping(mapping: PortMapping) -> api.PortMapping:
    container_port, host_port, protocol = mapping
    try:
        proto = _PROTOCOLS[protocol.upper()]
    except KeyError:
        raise ValueError(f"port mapping {mapping}: protocol must be one of {sorted(_PROTOCOLS)}") from None
    return api.PortMapping(protocol=proto, container_port=container_port, host_port=host_port)


def parse_cri_log(text: str) -> ContainerLog:
    """Parses `<time> <stream> <P|F> <text>` lines; P is a partial line (no newline)."""
    streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in streams:
            raise ValueError(f"line {lineno} is not in CRI log format: {line!r}")
        content = parts[3] if len(parts) == 4 else ""
        # The tag may grow ':'-separated fields; only the first says full/partial.
        full = parts[2].split(":", 1)[0] != "P"
        streams[parts[1]].append(content + ("\n" if full else ""))
    return ContainerLog(stdout="".join(streams["stdout"]), stderr="".join(streams["stderr"]))


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = POLL_INTERVAL_S) -> T:
    """Calls probe until it returns something other than None, or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class CriClient:
    """Runtime and image services of one CRI endpoint."""

    def __init__(
        self,
        address: str | Path,
        log_root: Path,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
        cgroup_root: str = "",
    ) -> None:
        """`log_root` holds the pods' log directories; `cgroup_root` (e.g. /husk-test-x)
        is where pods get their cgroup parent, like the kubelet's /kubepods."""
        self.address = str(address)
        self.log_root = log_root
        self.timeout = timeout
        self.cgroup_root = cgroup_root
        self._channel = grpc.insecure_channel(
            f"unix://{self.address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._runtime = api_grpc.RuntimeServiceStub(self._channel)
        self._images = api_grpc.ImageServiceStub(self._channel)
        self._names = itertools.count(1)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object, timeout: float | None = None, images: bool = False) -> Any:
        stub = self._images if images else self._runtime
        try:
            return getattr(stub, method)(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise CriError(method, exc.code(), exc.details() or "") from None

    # -- runtime info ---------------------------------------------------------

    def version(self, timeout: float | None = None) -> api.VersionResponse:
        return self._call("Version", api.VersionRequest(version="v1"), timeout)

    def status(self) -> api.StatusResponse:
        return self._call("Status", api.StatusRequest(verbose=False))

    def not_ready_conditions(self) -> list[str]:
        """Names of the required runtime conditions (RuntimeReady, NetworkReady) that are false."""
        conds = self.status().status.conditions
        # containerd 2.x adds conditions of its own (ContainerdHasNoDeprecationWarnings, false on
        # a cgroup v1 host) that do not stop it from running pods.
        return [f"{c.type}: {c.reason} {c.message}".strip() for c in conds
                if c.type in REQUIRED_CONDITIONS and not c.status]

    # -- images ---------------------------------------------------------------

    def list_images(self) -> list[api.Image]:
        resp = self._call("ListImages", api.ListImagesRequest(), images=True)
        return list(resp.images)

    def image_status(self, ref: str) -> api.Image | None:
        resp = self._call("ImageStatus", api.ImageStatusRequest(image=api.ImageSpec(image=ref)), images=True)
        return resp.image if resp.HasField("image") else None

    # -- pods -----------------------------------------------------------------

    def run_pod(
        self,
        name: str,
        handler: str = "",
        *,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        namespace: str = DEFAULT_POD_NAMESPACE,
        cgroup_parent: str | None = None,
        hostname: str | None = None,
        privileged: bool = False,
        host_pid: bool = False,
        pid_mode: int | None = None,
        sysctls: Mapping[str, str] | None = None,
        port_mappings: Sequence[PortMapping] = (),
        dns: DnsConfig | None = None,
        host_network: bool = False,
        resources: api.LinuxContainerResources | None = None,
        timeout: float | None = None,
    ) -> Pod:
        """RunPodSandbox with kubelet-like defaults; handler "" is containerd's default runtime.

        cgroup_parent None means <cgroup_root>/pod<uid>; "" leaves it to the runtime.
        privileged lets the pod have privileged containers; host_pid is hostPID: true;
        pid_mode (a NamespaceMode) overrides the PID namespace mode outright.
        port_mappings are hostPorts (CNI portmap), dns the pod's resolv.conf, host_network
        is hostNetwork: true (the pod shares containerd's netns; no CNI at all); resources
        are the pod's summed limits, as the kubelet sends them (pod.json's linux.resources).
        """
        pid = pid_mode if pid_mode is not None else (
            api.NamespaceMode.NODE if host_pid else api.NamespaceMode.CONTAINER)
        uid = uuid.uuid4().hex
        if cgroup_parent is None:
            cgroup_parent = f"{self.cgroup_root}/pod{uid}" if self.cgroup_root else ""
        log_dir = self.log_root / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            # As the kubelet: none for hostNetwork (the pod has the node's UTS namespace).
            hostname=(hostname or "") if host_network else (hostname or name),
            log_directory=str(log_dir),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            port_mappings=[_port_mapping(m) for m in port_mappings],
            dns_config=api.DNSConfig(servers=dns[0], searches=dns[1], options=dns[2]) if dns else None,
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                sysctls=dict(sysctls or {}),
                resources=resources,
                security_context=api.LinuxSandboxSecurityContext(
                    # The kubelet's default: pod network and IPC, a PID namespace per container.
                    namespace_options=api.NamespaceOption(
                        network=api.NamespaceMode.NODE if host_network else api.NamespaceMode.POD,
                        pid=pid,
                        ipc=api.NamespaceMode.POD,
                    ),
                    privileged=privileged,
                ),
            ),
        )
        resp = self._call("RunPodSandbox", api.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout)
        pod = Pod(id=resp.pod_sandbox_id, config=config, handler=handler)
        log.debug("pod %s (%s) runs as %s", name, handler or "default", pod.id)
        return pod

    def pod_status(self, pod_id: str) -> api.PodSandboxStatus:
        resp = self._call("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        return resp.status

    def pod_ips(self, pod_id: str) -> list[str]:
        """The pod's IPs as the CRI reports them: the primary one, then the additional ones.
        containerd 1.6 reports only eth0's addresses (one per family), not other networks'."""
        net = self.pod_status(pod_id).network
        return [ip for ip in (net.ip, *(a.ip for a in net.additional_ips)) if ip]

    def stop_pod(self, pod_id: str, timeout: float | None = None) -> None:
        self._call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout)

    def remove_pod(self, pod_id: str, timeout: float | None = None) -> None:
        self._call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout)

    def stop_and_remove_pod(self, pod_id: str) -> None:
        self.stop_pod(pod_id)
        self.remove_pod(pod_id)

    def list_pods(self) -> list[api.PodSandbox]:
        resp = self._call("ListPodSandbox", api.ListPodSandboxRequest())
        return list(resp.items)

    # -- containers -----------------------------------------------------------

    def create_container(
        self,
        pod: Pod,
        image: str,
        command: Iterable[str] = (),
        *,
        args: Iterable[str] = (),
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        working_dir: str = "",
        resources: api.LinuxContainerResources | None = None,
        mounts: Iterable[api.Mount] = (),
        tty: bool = False,
        stdin: bool = False,
        privileged: bool = False,
        host_pid: bool = False,
        pid_mode: int | None = None,
        timeout: float | None = None,
    ) -> str:
        """CreateContainer in `pod`; returns the container id. The log goes to <name>_0.log.

        privileged, host_pid and pid_mode need a pod run with the same flags; the network
        mode is the pod's (hostNetwork or not), as the kubelet sets it."""
        pid = pid_mode if pid_mode is not None else (
            api.NamespaceMode.NODE if host_pid else api.NamespaceMode.CONTAINER)
        name = name or f"c{next(self._names)}"
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=image),
            command=list(command),
            args=list(args),
            working_dir=working_dir,
            envs=[api.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=list(mounts),
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            log_path=f"{name}_0.log",
            stdin=stdin,
            tty=tty,
            linux=api.LinuxContainerConfig(
                resources=resources,
                security_context=api.LinuxContainerSecurityContext(
                    namespace_options=api.NamespaceOption(
                        network=pod.config.linux.security_context.namespace_options.network,
                        pid=pid,
                        ipc=api.NamespaceMode.POD,
                    ),
                    privileged=privileged,
                ),
            ),
        )
        req = api.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)
        resp = self._call("CreateContainer", req, timeout)
        return resp.container_id

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        self._call("StartContainer", api.StartContainerRequest(container_id=container_id), timeout)

    def run_container(self, pod: Pod, image: str, command: Iterable[str] = (), **kwargs: Any) -> str:
        """create_container (same keyword arguments) + start_container."""
        cid = self.create_container(pod, image, command, **kwargs)
        self.start_container(cid)
        return cid

    def container_status(self, container_id: str) -> api.ContainerStatus:
        resp = self._call("ContainerStatus", api.ContainerStatusRequest(container_id=container_id))
        return resp.status

    def wait_container_exit(self, container_id: str, timeout: float | None = None) -> api.ContainerStatus:
        """Polls ContainerStatus until the container is EXITED; returns that status."""

        def exited() -> api.ContainerStatus | None:
            st = self.container_status(container_id)
            return st if st.state == ContainerState.CONTAINER_EXITED else None

        return wait_for(f"container {container_id} to exit", exited, self.timeout if timeout is None else timeout)

    def exec_sync(self, container_id: str, cmd: Iterable[str], timeout: int = 60) -> ExecResult:
        """ExecSync; `timeout` (whole seconds, 0 = none) is enforced by the runtime."""
        req = api.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        rpc_timeout = (timeout + EXEC_RPC_MARGIN_S) if timeout else None
        # A deadline of None would mean "forever": keep the client's default then.
        resp = self._call("ExecSync", req, rpc_timeout)
        return ExecResult(resp.exit_code, resp.stdout, resp.stderr)

    def stop_container(self, container_id: str, timeout: int = 10, rpc_timeout: float | None = None) -> None:
        """StopContainer: the stop signal, then SIGKILL after `timeout` seconds."""
        req = api.StopContainerRequest(container_id=container_id, timeout=timeout)
        self._call("StopContainer", req, rpc_timeout if rpc_timeout is not None else self.timeout + timeout)

    def remove_container(self, container_id: str, timeout: float | None = None) -> None:
        self._call("RemoveContainer", api.RemoveContainerRequest(container_id=container_id), timeout)

    def list_containers(self, pod_id: str | None = None) -> list[api.Container]:
        flt = api.ContainerFilter(pod_sandbox_id=pod_id) if pod_id else None
        resp = self._call("ListContainers", api.ListContainersRequest(filter=flt))
        return list(resp.containers)

    # -- logs -----------------------------------------------------------------

    def update_container_resources(self, container_id: str,
                                   resources: api.LinuxContainerResources,
                                   timeout: float | None = None) -> None:
        """UpdateContainerResources, as `crictl update` and the kubelet's in-place resize."""
        self._call("UpdateContainerResources", api.UpdateContainerResourcesRequest(
            container_id=container_id, linux=resources), timeout)

    def pod_stats(self, pod_id: str) -> api.PodSandboxStats:
        """PodSandboxStats, as `crictl statsp` and the kubelet's pod stats."""
        return self._call("PodSandboxStats", api.PodSandboxStatsRequest(
            pod_sandbox_id=pod_id)).stats

    def container_stats(self, container_id: str) -> api.ContainerStats:
        resp = self._call("ContainerStats", api.ContainerStatsRequest(container_id=container_id))
        return resp.stats  # type: ignore[attr-defined,no-any-return]

    def log_path(self, container_id: str) -> Path:
        """The container's CRI log file (the pod's log_directory joined with its log_path)."""
        return Path(self.container_status(container_id).log_path)

    def read_log(self, container_id: str) -> ContainerLog:
        path = self.log_path(container_id)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return parse_cri_log(text)

    # -- bulk cleanup ---------------------------------------------------------

    def remove_all_pods(self, timeout: float | None = None) -> list[str]:
        """StopPodSandbox + RemovePodSandbox for every pod; returns error messages, never raises CriError."""
        errors: list[str] = []
        try:
            pods = self.list_pods()
        except CriError as exc:
            return [str(exc)]
        for pod in pods:
            for step in (self.stop_pod, self.remove_pod):
                try:
                    step(pod.id, timeout)
                except CriError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        errors.append(f"pod {pod.metadata.name} ({pod.id}): {exc}")
        return errors
