"""A private containerd for CRI end-to-end runs (tests, `make demo`, `make bench-cri`).

Owns one containerd instance (Debian's 1.6, or a 2.x build named by
ContainerdOptions.containerd_dir): its temp dir (root, state, sockets, config,
CNI config, pod logs), the network namespace it runs in (the pods' "node", with
one bridge per CNI network; tests get in with run_in_netns() and connect()),
its runtime handlers (`runc` and `husk`), the test images it imports, and a
teardown that leaves nothing behind (pods, shims, mounts, cgroups, netns, CNI
cache, sockets, dirs) even after a failed test or a crashed earlier run.

    with Containerd.started(ContainerdOptions(husk_config=path)) as cd:
        pod = cd.cri.run_pod("demo", handler="husk")
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil

from shim import RUNTIME_TYPE, SHIM_NAME

from .cni import CNI_BIN_DIR, DEFAULT_NETWORK, CniConfig, CniNetwork
from .cri import CriClient, CriError, wait_for
from .images import DEFAULT_CACHE_DIR, PAUSE_REF, BuiltImage, build_images, import_images

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN_DIR = REPO_ROOT / ".venv" / "bin"
DEFAULT_BASE_DIR = Path("/tmp")
# Where tests keep containerd.log (which includes the shims' logs) of each instance.
DEFAULT_KEEP_LOGS_DIR = REPO_ROOT / "build" / "test-logs" / "cri"
INSTANCE_PREFIX = "husk-cri-"
NETNS_PREFIX = "husk-test-"
CRI_NAMESPACE = "k8s.io"
RUNC_HANDLER = "runc"
HUSK_HANDLER = "husk"
HUSK_RUNTIME_TYPE = RUNTIME_TYPE
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def shared_tools_dir(repo: Path = REPO_ROOT) -> Path:
    """Builds the test machines provide beside the checkout (``../shared/tools``): the
    first ``<folder>/shared/tools`` above the checkout (a CI clone may sit deeper),
    else ``../shared/tools`` (for messages saying where to put them)."""
    for folder in repo.parents:
        if (folder / "shared" / "tools").is_dir():
            return folder / "shared" / "tools"
    return repo.parent / "shared" / "tools"


# A containerd 2.x build (containerd, ctr and its runc shim) for machines whose
# distribution ships 1.6 only; $CONTAINERD2_DIR names another.
CONTAINERD2_ENV = "CONTAINERD2_DIR"
DEFAULT_CONTAINERD2_DIR = shared_tools_dir() / "containerd-2" / "bin"
CONTAINERD2_MISSING = (f"containerd 2.x not found: put a build's bin dir (containerd, ctr, "
                       f"containerd-shim-runc-v2) at {DEFAULT_CONTAINERD2_DIR} or name it in ${CONTAINERD2_ENV}")
VERSION_TIMEOUT_S = 10.0
_VERSION = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")

# containerd 1.6 hardcodes where shims put their sockets (runtime/v2/shim/util_unix.go).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
CNI_CACHE_RESULTS = Path("/var/lib/cni/results")
NETNS_DIR = Path("/run/netns")
# Host directories the instance may create as a side effect; removed again if
# they did not exist before and are empty afterwards.
# (/run/netns is left alone: iproute2 owns it and turns it into a shared mount.)
HOST_SIDE_EFFECT_DIRS = (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent, CNI_CACHE_RESULTS, CNI_CACHE_RESULTS.parent)

START_TIMEOUT_S = 60.0
IMAGE_VISIBLE_TIMEOUT_S = 30.0
POD_CLEANUP_TIMEOUT_S = 120.0
CONTAINERD_TERM_TIMEOUT_S = 15.0
PROCESS_KILL_TIMEOUT_S = 10.0
PROCESS_POLL_S = 0.05
# A stuck shim daemon's SIGUSR1 stack dump reaches its log within this.
STACK_DUMP_WAIT_S = 1.0
CGROUP_EMPTY_TIMEOUT_S = 10.0
LEAK_SETTLE_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 40
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL

MNT_DETACH = 2
CLONE_NEWNET = 0x40000000
# Set in containerd's netns before any bridge exists, so bridges and veths inherit
# them: IPv6 on, and no duplicate address detection, whose ~1s "tentative" phase
# would make a fresh bridge's IPv6 gateway unusable at first. (The bridge plugin
# already turns DAD off on the pod's side.)
NETNS_SYSCTLS = {
    "net/ipv6/conf/all/disable_ipv6": "0",
    "net/ipv6/conf/default/disable_ipv6": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
}
NETNS_COMMAND_TIMEOUT_S = 30.0
_HEX_ID = re.compile(r"\b[0-9a-f]{64}\b")
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class HarnessError(RuntimeError):
    """containerd could not be started or the instance could not be cleaned up."""


class LeakError(AssertionError):
    """Something of the instance outlived what should have removed it."""


@dataclass(frozen=True)
class RuntimeHandler:
    """One `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.<name>]` table."""

    name: str
    runtime_type: str
    pod_annotations: tuple[str, ...] = ()
    container_annotations: tuple[str, ...] = ()
    # The `.options` table; for non-runc types CRI 1.6 decodes it into
    # runtimeoptions.v1.Options (keys TypeUrl, ConfigPath). None = no table.
    options: Mapping[str, str | bool | int] | None = None
    # A VM runtime: a privileged container gets the guest's devices, never the host's.
    privileged_without_host_devices: bool = False


@dataclass
class ContainerdOptions:
    """How to run the instance; every field has a default that works on the test machine."""

    # Prepended to containerd's PATH so it finds containerd-shim-husk-v2.
    bin_dir: Path | None = DEFAULT_BIN_DIR
    # The directory of another containerd build (containerd, ctr, containerd-shim-runc-v2;
    # e.g. find_containerd2()), first on its PATH so its runc shim is the one used;
    # None = Debian's containerd 1.6 from PATH. The config follows its major version.
    containerd_dir: Path | None = None
    # Passed to the husk shim as runtimeoptions ConfigPath; None = no options.
    husk_config: Path | None = None
    husk_runtime_type: str = HUSK_RUNTIME_TYPE
    husk_pod_annotations: tuple[str, ...] = ("io.husk.*",)
    extra_handlers: tuple[RuntimeHandler, ...] = ()
    default_handler: str = RUNC_HANDLER
    base_dir: Path = DEFAULT_BASE_DIR
    image_cache_dir: Path = DEFAULT_CACHE_DIR
    # Prebuilt images; None = build (or reuse from the cache) the default set.
    images: Sequence[BuiltImage] | None = None
    log_level: str = "debug"
    # containerd.log (which includes the shims' logs) is copied here at stop.
    keep_logs_dir: Path | None = None
    call_timeout: float = 120.0
    start_timeout: float = START_TIMEOUT_S
    # The pod networks, in interface order (the first is eth0 and gives the pod its IP);
    # each has its own conflist, bridge and subnet(s). containerd attaches a pod to all.
    networks: tuple[CniNetwork, ...] = (DEFAULT_NETWORK,)
    # Extra environment for containerd and so for the shims (e.g. debug switches).
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class InstanceRecord:
    """What teardown needs; saved as instance.json so a later run can clean up after a crash."""

    root: str
    netns: str
    address: str
    cgroup_parent: str
    network_name: str
    owner_pid: int
    owner_create_time: float
    containerd_pid: int = 0
    # When the owner started, in clock ticks since boot: unlike owner_create_time it
    # does not move when the wall clock is stepped (0 in records of older harnesses).
    owner_start_ticks: int = 0
    created_host_dirs: list[str] = field(default_factory=list)
    seen_ids: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.root)

    def save(self) -> None:
        tmp = self.path / "instance.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path / "instance.json")

    @classmethod
    def load(cls, root: Path) -> InstanceRecord:
        return cls(**json.loads((root / "instance.json").read_text()))


class Containerd:
    """One private containerd; use `with Containerd.started(opts) as cd:` or start()/stop()."""

    def __init__(self, options: ContainerdOptions | None = None) -> None:
        self.options = options or ContainerdOptions()
        self.record: InstanceRecord | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._cri: CriClient | None = None
        self._cni: CniConfig | None = None
        self.images: list[BuiltImage] = []
        self.start_seconds = 0.0
        # containerd's version, (major, minor, patch), known once started.
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.stop_seconds = 0.0
        # The record of the last stopped instance, for find_leftovers() after stop().
        self.last_record: InstanceRecord | None = None
        self._log_offset = 0

    # -- paths ------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self.record is None:
            raise HarnessError("containerd instance not started")
        return self.record.path

    @property
    def address(self) -> str:
        return str(self.root / "containerd.sock")

    @property
    def netns(self) -> str:
        assert self.record is not None
        return self.record.netns

    @property
    def log_path(self) -> Path:
        return self.root / "containerd.log"

    def tool(self, name: str) -> str:
        """containerd's own binaries (containerd, ctr) from its build's directory, if any."""
        directory = self.options.containerd_dir
        return str(directory / name) if directory is not None else name

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def cgroup_parent(self) -> str:
        """Parent cgroup for pods (pass to run_pod); teardown removes the whole subtree."""
        assert self.record is not None
        return self.record.cgroup_parent

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            raise HarnessError("containerd instance not started")
        return self._cri

    @property
    def cni(self) -> CniConfig:
        if self._cni is None:
            raise HarnessError("containerd instance not started")
        return self._cni

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    # -- lifecycle --------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def started(cls, options: ContainerdOptions | None = None) -> Iterator[Containerd]:
        """Starts an instance and always stops it; raises LeakError if, after a body that
        succeeded, the teardown had to force anything or something survived it."""
        cd = cls(options)
        cd.start()
        try:
            yield cd
        except BaseException:
            cd.stop(check=False)  # the body's error matters more than a leak it caused
            raise
        cd.stop()

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(check=exc_type is None)

    def start(self) -> None:
        if self.record is not None:
            raise HarnessError("containerd instance already started")
        _require_root_and_tools()
        t0 = time.monotonic()
        opts = self.options
        self.version = containerd_version(self.tool("containerd"))
        sweep_stale_instances(opts.base_dir)
        self.images = list(opts.images) if opts.images is not None else build_images(opts.image_cache_dir)
        if not any(img.ref == PAUSE_REF for img in self.images):
            raise HarnessError(f"the images to import lack the sandbox image {PAUSE_REF}")

        opts.base_dir.mkdir(parents=True, exist_ok=True)
        root = Path(_mkdtemp(opts.base_dir))
        suffix = root.name[len(INSTANCE_PREFIX):]
        me = psutil.Process()
        self.record = InstanceRecord(
            root=str(root),
            netns=NETNS_PREFIX + suffix,
            address=str(root / "containerd.sock"),
            cgroup_parent=f"/{NETNS_PREFIX}{suffix}",
            network_name=f"{NETNS_PREFIX}{suffix}",
            owner_pid=me.pid,
            owner_create_time=me.create_time(),
            owner_start_ticks=_start_ticks(me.pid),
            created_host_dirs=[str(d) for d in HOST_SIDE_EFFECT_DIRS if not d.exists()],
        )
        if len(self.address) > UNIX_PATH_MAX - len(".ttrpc"):
            raise HarnessError(f"socket path {self.address} is too long for a unix socket; use a shorter base_dir")
        self.record.save()
        self._log_offset = 0
        try:
            self._start_in(root)
        except BaseException as exc:
            log_tail = self._log_tail()
            self.stop(check=False)
            if log_tail and not isinstance(exc, HarnessError):  # HarnessErrors carry the tail
                log.error("containerd log tail:\n%s", log_tail)
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("containerd %s (%s) ready in %.2fs (netns %s)", root, ".".join(map(str, self.version)),
                 self.start_seconds, self.netns)

    def _start_in(self, root: Path) -> None:
        assert self.record is not None
        opts = self.options
        for sub in ("root", "state", "tmp", "opt", "runc", "pod-logs"):
            (root / sub).mkdir()
        self._cni = CniConfig(name_prefix=self.record.network_name, root=root / "cni", networks=opts.networks)
        self._cni.write()
        render = render_config_v3 if self.version[0] >= 2 else render_config
        self.config_path.write_text(render(self.root, opts, self._cni))

        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self._set_netns_sysctls()
        self._launch()
        import_images(self.address, self.images, namespace=CRI_NAMESPACE, ctr=self.tool("ctr"))
        # CRI learns about imported images from containerd's events, asynchronously.
        for img in self.images:
            wait_for(f"CRI to list image {img.ref}", functools.partial(self.cri.image_status, img.ref),
                     IMAGE_VISIBLE_TIMEOUT_S)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stop containerd alone (its shims, and so its pods, keep running) and start it again."""
        assert self.proc is not None and self.record is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self._launch()

    def _launch(self) -> None:
        assert self.record is not None
        opts = self.options
        root = self.root
        env = {"PATH": STANDARD_PATH, "HOME": "/root", "TMPDIR": str(root / "tmp"), **opts.extra_env}
        # containerd_dir first: containerd 2.x cannot use Debian's 1.6 runc shim.
        path_dirs = [d for d in (opts.containerd_dir, opts.bin_dir) if d is not None]
        env["PATH"] = ":".join([*map(str, path_dirs), STANDARD_PATH])
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # nsenter --net only: a new mount namespace (as `ip netns exec` makes)
            # would hide containerd's mounts from teardown and from the tests.
            self.proc = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.netns}", "--",
                 self.tool("containerd"), "--config", str(self.config_path), "--log-level", opts.log_level],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=root, env=env, start_new_session=True,
            )
        finally:
            logf.close()
        self.record.containerd_pid = self.proc.pid
        self.record.save()

        self._cri = CriClient(
            self.address, log_root=root / "pod-logs", timeout=opts.call_timeout, cgroup_root=self.record.cgroup_parent
        )
        self._wait_ready(opts.start_timeout)

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"containerd exited with {self.proc.returncode} during startup; log tail:\n{self._log_tail()}"
                )
            try:
                self.cri.version(timeout=2.0)
                return True if not self.cri.not_ready_conditions() else None
            except CriError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    # containerd serves, but without the CRI service: the plugin failed to load.
                    raise HarnessError(f"containerd's CRI plugin did not load; log tail:\n{self._log_tail()}") from None
                return None

        try:
            wait_for("containerd's CRI to become ready", ready, timeout, interval=0.1)
        except TimeoutError as exc:
            raise HarnessError(f"{exc}; log tail:\n{self._log_tail()}") from None

    def stop(self, check: bool = True) -> None:
        """Removes every pod, stops containerd, then tears down everything of the instance.

        With check=True, raises LeakError if something survived the teardown.
        """
        if self.record is None:
            return
        t0 = time.monotonic()
        problems: list[str] = []
        if self._cri is not None:
            if self.proc is not None and self.proc.poll() is None:
                self._remember_ids()
                problems += [f"pod cleanup: {e}" for e in self.cri.remove_all_pods(POD_CLEANUP_TIMEOUT_S)]
            self._cri.close()
            self._cri = None
        if self.proc is not None:
            _terminate(self.proc.pid, CONTAINERD_TERM_TIMEOUT_S, popen=self.proc)
        self._keep_logs()
        report = teardown(self.record)  # logs what it had to force
        record, self.record, self.proc, self._cni = self.record, None, None, None
        self.last_record = record
        self.stop_seconds = time.monotonic() - t0
        log.info("containerd %s stopped in %.2fs", record.root, self.stop_seconds)
        leftovers = [f"left behind: {x}" for x in find_leftovers(record)]
        problems += report.failed + leftovers
        for p in problems:
            log.warning("teardown of %s: %s", record.root, p)
        if check and (problems or report.forced):
            raise LeakError("containerd instance teardown: " + "; ".join(report.forced + problems))

    def _remember_ids(self) -> None:
        """Pod and container ids, to find their shim sockets later."""
        assert self.record is not None
        try:
            ids = {p.id for p in self.cri.list_pods()} | {c.id for c in self.cri.list_containers()}
        except CriError:
            return
        self.record.seen_ids = sorted(set(self.record.seen_ids) | ids)
        self.record.save()

    def _keep_logs(self) -> None:
        if self.options.keep_logs_dir is None or self.record is None or not self.log_path.exists():
            return
        dest = self.options.keep_logs_dir / f"{self.root.name}.log"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.log_path, dest)
        log.info("containerd log kept at %s", dest)

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, HarnessError):
            return ""

    def check_alive(self) -> None:
        """Raises HarnessError if containerd is not running (e.g. it crashed in an earlier test)."""
        if self.proc is None or self.record is None:
            raise HarnessError("containerd instance not started")
        if self.proc.poll() is not None:
            raise HarnessError(f"containerd exited with {self.proc.returncode}; log tail:\n{self._log_tail()}")

    # -- pod networking -----------------------------------------------------------

    def _set_netns_sysctls(self) -> None:
        ipv6 = Path("/proc/sys/net/ipv6")
        if not ipv6.is_dir():  # IPv6 disabled at boot (ipv6.disable=1)
            dual = [n.name for n in self.options.networks if n.subnet6]
            if dual:
                raise HarnessError(f"networks {dual} need IPv6, which this kernel has disabled")
            return

        def write() -> None:
            for key, value in NETNS_SYSCTLS.items():
                Path("/proc/sys", key).write_text(value)

        in_netns(self.netns_path, write)

    def run_in_netns(self, argv: Sequence[str], timeout: float = NETNS_COMMAND_TIMEOUT_S
                     ) -> subprocess.CompletedProcess[str]:
        """Runs a host command in containerd's netns (the pods' "node"), output captured, never raises
        on a non-zero exit. Only the netns is entered: the command sees the host's files and mounts."""
        return subprocess.run(["nsenter", f"--net={self.netns_path}", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def pod_netns(self, pod_id: str) -> Path:
        """The pod's network namespace, as its sandbox's OCI spec names it for the runtime."""
        spec = json.loads((self.root / "state" / "io.containerd.runtime.v2.task" / "k8s.io" / pod_id
                           / "config.json").read_text())
        paths = [ns.get("path") for ns in spec["linux"]["namespaces"] if ns.get("type") == "network"]
        if not paths or not paths[0]:
            raise HarnessError(f"pod {pod_id} has no network namespace of its own")
        return Path(paths[0])

    def run_in_pod_netns(self, pod_id: str, argv: Sequence[str],
                         timeout: float = NETNS_COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Runs a host command in the pod's host-side netns (where CNI put its interfaces)."""
        return subprocess.run(["nsenter", f"--net={self.pod_netns(pod_id)}", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def netns_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this (the test) process that lives in containerd's netns, so the test can talk
        to hostPorts, bridge addresses and crictl's port-forward listener directly."""
        return in_netns(self.netns_path, lambda: socket.socket(family, kind))

    def connect(self, host: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from containerd's netns to host:port (an IP literal or localhost);
        `timeout` stays the socket's timeout."""
        addr = "127.0.0.1" if host == "localhost" else host
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self.netns_socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def networks(self) -> tuple[CniNetwork, ...]:
        return self.options.networks

    def bridge_gateway(self, network_index: int = 0, *, ipv6: bool = False) -> str:
        """The bridge's address on network `network_index` (the pods' gateway, e.g. 10.88.0.1): the
        host side of the bridge, in containerd's netns. The bridge exists once a pod joined it."""
        net = self.networks[network_index]
        if not ipv6:
            return net.gateway
        if net.gateway6 is None:
            raise HarnessError(f"network {net.name} has no IPv6 subnet")
        return net.gateway6

    def ipam_allocations(self, network_name: str | None = None) -> dict[str, str]:
        """IP -> container (sandbox) id of every address host-local holds now, in the network of
        that name or in all; an address missing after StopPodSandbox was released."""
        return self.cni.allocations(network_name)

    def cni_del_records(self, pod_id: str) -> list[dict[str, Any]]:
        """What the recording CNI plugin saw in the pod's netns at each DEL, oldest first: one dict
        per interface and DEL (keys time, ifname, network, netns, netns_present, links, qdiscs,
        ingress_filters, errors, attempt). containerd repeats DEL on each StopPodSandbox; the
        later ones have an empty netns."""
        return self.cni.del_records(pod_id)

    # -- leak checks while running ---------------------------------------------

    def shim_processes(self) -> list[psutil.Process]:
        assert self.record is not None
        return _instance_processes(self.record)

    def leaks(self) -> list[str]:
        """What should not exist while no pod is expected: pods, containers, shims and processes
        naming the instance dir, mounts under it, cgroup tasks, CNI cache entries, shim sockets."""
        assert self.record is not None
        found: list[str] = []
        found += [f"pod {p.metadata.name} ({p.id}, state {p.state})" for p in self.cri.list_pods()]
        found += [f"container {c.metadata.name} ({c.id})" for c in self.cri.list_containers()]
        containerd = frozenset({self.proc.pid}) if self.proc is not None else frozenset()
        procs = _instance_processes(self.record, by_mention=True, exclude=containerd)
        found += [f"process {p.pid} {' '.join(_cmdline(p))}" for p in procs]
        found += [f"mount {m}" for m in mounts_under(self.root)]
        found += [f"process {pid} in cgroup {cg}" for cg, pid in _cgroup_tasks(self.record.cgroup_parent)]
        found += [f"CNI cache {f}" for f in CNI_CACHE_RESULTS.glob(f"{self.record.network_name}-*")]
        self._scan_log_ids()
        found += [f"shim socket {s}" for s in _existing_shim_sockets(self.record, scan_log=False)]
        return found

    def _scan_log_ids(self) -> None:
        """Adds the ids in the part of containerd.log not read yet to record.seen_ids
        (the log grows large over a session; rereading it per test would be slow)."""
        assert self.record is not None
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            chunk = f.read()
            # Stop at the last newline so an id is never cut in two.
            end = chunk.rfind(b"\n") + 1
            self._log_offset += end
            ids = _HEX_ID.findall(chunk[:end].decode(errors="replace"))
            self.record.seen_ids = sorted(set(self.record.seen_ids) | set(ids))

    def assert_no_leaks(self, timeout: float = LEAK_SETTLE_TIMEOUT_S) -> None:
        """Waits up to `timeout` for leaks() to clear (shims exit asynchronously), else
        cleans up and raises LeakError naming what was left."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leaks()
            # Pods and containers the CRI still lists never go away by themselves.
            if not found or time.monotonic() >= deadline or found[0].startswith(("pod ", "container ")):
                break
            time.sleep(0.2)
        if found:
            self.reset()
            raise LeakError("left behind by the test: " + "; ".join(found))

    def reset(self) -> None:
        """Forcefully brings a running instance back to 'no pods': CRI removal, then kills."""
        assert self.record is not None
        self._remember_ids()
        errors = self.cri.remove_all_pods(POD_CLEANUP_TIMEOUT_S)
        for e in errors:
            log.warning("reset: %s", e)
        for proc in self.shim_processes():
            _kill_tree(proc)
        _kill_cgroup_tasks(self.record.cgroup_parent)
        self._scan_log_ids()
        _remove_shim_sockets(self.record, scan_log=False)


# ----------------------------------------------------------------------------
# Config


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")


def _toml_table(name: str, values: Mapping[str, object]) -> str:
    lines = [f"[{name}]"] + [f"  {k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def runtime_handlers(root: Path, opts: ContainerdOptions) -> list[RuntimeHandler]:
    husk_options = {"ConfigPath": str(opts.husk_config)} if opts.husk_config is not None else None
    return [
        # runc's state root in the temp dir instead of /run/containerd/runc.
        RuntimeHandler(RUNC_HANDLER, RUNC_RUNTIME_TYPE, options={"Root": str(root / "runc"), "SystemdCgroup": False}),
        RuntimeHandler(HUSK_HANDLER, opts.husk_runtime_type, pod_annotations=opts.husk_pod_annotations,
                       options=husk_options, privileged_without_host_devices=True),
        *opts.extra_handlers,
    ]


# CRI settings both config versions share (1.6: the CRI plugin's table; 2.x: its
# runtime plugin's, and the stream server in the CRI plugin's).
CRI_RUNTIME_SETTINGS: dict[str, object] = {
    # The kernel refuses negative oom_score_adj, which CRI uses for sandboxes.
    "restrict_oom_score_adj": True,
    "enable_selinux": False,
    "disable_apparmor": True,
    # Pod netns bind mounts under <state>/netns instead of /var/run/netns.
    "netns_mounts_under_state_dir": True,
}
CRI_STREAM_SETTINGS: dict[str, object] = {"stream_server_address": "127.0.0.1", "stream_server_port": "0"}


def _instance_tables(root: Path, version: int, disabled_plugins: Sequence[str]) -> list[str]:
    """What makes the instance private: every path under `root`."""
    return [
        _toml_value_lines({
            "version": version,
            "root": root / "root",
            "state": root / "state",
            "temp": root / "tmp",
            "disabled_plugins": list(disabled_plugins),
        }),
        _toml_table("grpc", {"address": root / "containerd.sock"}),
        _toml_table("ttrpc", {"address": root / "containerd.sock.ttrpc"}),
        # The opt plugin would otherwise create /opt/containerd on the host.
        _toml_table('plugins."io.containerd.internal.v1.opt"', {"path": root / "opt"}),
    ]


def _handler_tables(runtimes: str, root: Path, opts: ContainerdOptions, **common: object) -> list[str]:
    """One table (and its .options table) per runtime handler under `runtimes`."""
    parts: list[str] = []
    for h in runtime_handlers(root, opts):
        table = f"{runtimes}.{json.dumps(h.name)}"
        values: dict[str, object] = {"runtime_type": h.runtime_type, **common}
        if h.pod_annotations:
            values["pod_annotations"] = list(h.pod_annotations)
        if h.container_annotations:
            values["container_annotations"] = list(h.container_annotations)
        if h.privileged_without_host_devices:
            values["privileged_without_host_devices"] = True
        parts.append(_toml_table(table, values))
        if h.options is not None:
            parts.append(_toml_table(f"{table}.options", dict(h.options)))
    return parts


def render_config(root: Path, opts: ContainerdOptions, cni: CniConfig) -> str:
    """containerd 1.6 config (version 2); every path of the instance is under `root`.

    Key names checked against `containerd config default` of Debian's 1.6.20.
    """
    cri = '"io.containerd.grpc.v1.cri"'
    parts = [
        # Snapshotters that cannot work here; disabling them only removes log noise.
        *_instance_tables(root, 2, [
            "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
        ]),
        _toml_table(f"plugins.{cri}", {
            "sandbox_image": PAUSE_REF, "disable_cgroup": False, **CRI_RUNTIME_SETTINGS, **CRI_STREAM_SETTINGS,
        }),
        _toml_table(f"plugins.{cri}.containerd", {
            "default_runtime_name": opts.default_handler,
            "snapshotter": "overlayfs",
        }),
        *_handler_tables(f"plugins.{cri}.containerd.runtimes", root, opts),
        # One bin dir only in 1.6 (the instance's: system plugins + the recording plugin);
        # max_conf_num = how many of the sorted conflists a pod is attached to.
        _toml_table(f"plugins.{cri}.cni", {
            "bin_dir": cni.bin_dir, "conf_dir": cni.conf_dir, "max_conf_num": len(cni.networks),
        }),
    ]
    return "\n".join(parts)


def render_config_v3(root: Path, opts: ContainerdOptions, cni: CniConfig) -> str:
    """containerd 2.x config (version 3), the same instance as render_config's.

    Key names checked against `containerd config default` of the 2.3.4 build (which
    prints version 4 and reads 3 natively): CRI is split into an images plugin (with
    the pinned sandbox image) and a runtime plugin (handlers, CNI); the stream server
    stays in the CRI plugin.
    """
    images = 'plugins."io.containerd.cri.v1.images"'
    runtime = 'plugins."io.containerd.cri.v1.runtime"'
    parts = [
        # NRI is on by default in 2.x, with a socket of the host's (/var/run/nri).
        *_instance_tables(root, 3, ["io.containerd.nri.v1.nri"]),
        _toml_table(images, {"snapshotter": "overlayfs"}),
        _toml_table(f"{images}.pinned_images", {"sandbox": PAUSE_REF}),
        _toml_table(runtime, CRI_RUNTIME_SETTINGS),
        _toml_table(f"{runtime}.containerd", {"default_runtime_name": opts.default_handler}),
        # podsandbox: containerd runs each pod's pause task through the shim's Task API
        # (the default, as with 1.6), not the shim's Sandbox API.
        *_handler_tables(f"{runtime}.containerd.runtimes", root, opts, sandboxer="podsandbox"),
        _toml_table(f"{runtime}.cni", {
            "bin_dirs": [cni.bin_dir], "conf_dir": cni.conf_dir, "max_conf_num": len(cni.networks),
        }),
        _toml_table('plugins."io.containerd.grpc.v1.cri"', CRI_STREAM_SETTINGS),
    ]
    return "\n".join(parts)


def containerd_version(binary: str) -> tuple[int, int, int]:
    """(major, minor, patch) from `containerd --version`.

    :raise HarnessError: it does not run or names no version.
    """
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"{binary} --version: {exc}") from exc
    # "containerd github.com/containerd/containerd 1.6.20~ds1 ..." or "... /v2 v2.3.4 "
    found = _VERSION.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise HarnessError(f"{binary} --version: no version in {proc.stdout.strip()!r} {proc.stderr.strip()!r}")
    major, minor, patch = (int(x) for x in found.groups())
    return major, minor, patch


def find_containerd2() -> Path | None:
    """$CONTAINERD2_DIR if set, else the shared 2.x build's bin dir; None if it has no containerd."""
    directory = Path(os.environ.get(CONTAINERD2_ENV) or DEFAULT_CONTAINERD2_DIR)
    binary = directory / "containerd"
    return directory if binary.is_file() and os.access(binary, os.X_OK) else None


def _toml_value_lines(values: Mapping[str, object]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


# ----------------------------------------------------------------------------
# Teardown (also used on instances left over by a crashed run)


@dataclass
class TeardownReport:
    # Things that should have been gone already and had to be killed or removed:
    # after all pods were removed through the CRI, each one is a runtime bug.
    forced: list[str] = field(default_factory=list)
    # Things that could not be removed at all.
    failed: list[str] = field(default_factory=list)


def teardown(rec: InstanceRecord) -> TeardownReport:
    """Kills, unmounts and deletes everything of the instance.

    The temp dir is only removed once nothing is mounted under it, so a stuck
    mount can never make rmtree reach into another filesystem.
    """
    report = TeardownReport()
    root = rec.path
    if rec.containerd_pid and _same_instance_process(rec.containerd_pid, rec):
        _terminate(rec.containerd_pid, CONTAINERD_TERM_TIMEOUT_S)
    # Only what is surely ours gets killed: shims and what works in the temp dir.
    leftovers = _instance_processes(rec, by_cwd=True)
    _ask_for_stack_dumps(leftovers)
    for proc in leftovers:
        report.forced.append(f"killed process {proc.pid}: {' '.join(_cmdline(proc))}")
        _kill_tree(proc)
    tasks = _cgroup_tasks(rec.cgroup_parent)
    if tasks:
        report.forced.append(f"killed {len(tasks)} task(s) in cgroup {rec.cgroup_parent}")
    report.failed += _remove_cgroups(rec.cgroup_parent)
    mounted = mounts_under(root)
    if mounted:
        report.forced.append(f"unmounted {', '.join(mounted)}")
    report.failed += _unmount_all_under(root)
    report.forced += [f"removed shim socket {sock}" for sock in _existing_shim_sockets(rec)]
    _remove_shim_sockets(rec)
    for f in _cni_cache_files(rec):
        report.forced.append(f"removed CNI cache file {f}")
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    if (NETNS_DIR / rec.netns).exists():
        try:
            _run(["ip", "netns", "delete", rec.netns])
        except HarnessError as exc:
            report.failed.append(str(exc))
    for d in rec.created_host_dirs:
        with contextlib.suppress(OSError):  # not empty: someone else uses it now
            Path(d).rmdir()
    if mounts_under(root):
        report.failed.append(f"not removing {root}: still mounted under it")
    elif root.exists() and not report.failed:
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            report.failed.append(f"could not remove {root}")
    for item in report.forced:
        log.warning("teardown of %s: %s", root, item)
    return report


def find_leftovers(rec: InstanceRecord) -> list[str]:
    """Everything of a stopped instance that still exists (empty = clean)."""
    procs = _instance_processes(rec, by_cwd=True, by_mention=True)
    found = [f"process {p.pid}: {' '.join(_cmdline(p))}" for p in procs]
    found += [f"mount {m}" for m in mounts_under(rec.path)]
    if (NETNS_DIR / rec.netns).exists() or rec.netns in _netns_names():
        found.append(f"netns {rec.netns}")
    found += [f"cgroup {d}" for d in _cgroup_dirs(rec.cgroup_parent)]
    found += [f"CNI cache {f}" for f in _cni_cache_files(rec)]
    found += [f"shim socket {s}" for s in _existing_shim_sockets(rec)]
    if rec.path.exists():
        found.append(f"temp dir {rec.path}")
    return found


def sweep_stale_instances(base_dir: Path = DEFAULT_BASE_DIR) -> list[str]:
    """Tears down instances whose owning process is gone (a killed test run); returns their roots."""
    swept: list[str] = []
    for root in sorted(base_dir.glob(INSTANCE_PREFIX + "*")):
        try:
            rec = InstanceRecord.load(root)
        except (OSError, ValueError, TypeError):
            continue
        if _owner_alive(rec):
            continue
        log.warning("cleaning up stale containerd instance %s (owner pid %d gone)", root, rec.owner_pid)
        for p in teardown(rec).failed:
            log.error("stale instance %s: %s", root, p)
        swept.append(str(root))
    return swept


def _owner_alive(rec: InstanceRecord) -> bool:
    """Whether the process that started the instance still runs. Its start in ticks
    since boot tells it from a later process with its pid; psutil's create_time()
    would not: it moves with every step of the wall clock, and a step of a few
    seconds (NTP) made one test worker tear down another's live containerd."""
    if rec.owner_start_ticks:
        return _start_ticks(rec.owner_pid) == rec.owner_start_ticks
    try:
        return abs(psutil.Process(rec.owner_pid).create_time() - rec.owner_create_time) < 1.0
    except psutil.Error:
        return False


def _start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (0 when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: count after its end.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _same_instance_process(pid: int, rec: InstanceRecord) -> bool:
    """True if `pid` is still the containerd started with this instance's config (pids get reused)."""
    try:
        return str(rec.path / "config.toml") in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _instance_processes(
    rec: InstanceRecord, *, by_cwd: bool = False, by_mention: bool = False, exclude: frozenset[int] = frozenset()
) -> list[psutil.Process]:
    """Shims of the instance (their command line names its address); with by_cwd also
    anything working inside the temp dir (shims sit in their bundle); with by_mention
    anything naming a path in it (virtiofsd sharing a bundle, a QEMU using one)."""
    root = str(rec.path)
    skip = exclude | {os.getpid()}
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in skip:
            continue
        cmdline = proc.info["cmdline"] or []
        is_shim = any(os.path.basename(a).startswith("containerd-shim") for a in cmdline[:2])
        if (is_shim and rec.address in cmdline) or (by_mention and any(root + "/" in a for a in cmdline)):
            found.append(proc)
            continue
        if by_cwd:
            try:
                cwd = proc.cwd()
            except psutil.Error:
                continue
            if cwd == root or cwd.startswith(root + "/"):
                found.append(proc)
    return found


def _terminate(pid: int, timeout: float, popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, wait, SIGKILL."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            _wait_gone(proc, timeout)
        except psutil.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
            proc.kill()
            _wait_gone(proc, PROCESS_KILL_TIMEOUT_S)
    except psutil.NoSuchProcess:
        pass
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(PROCESS_KILL_TIMEOUT_S)  # reap it


def _wait_gone(proc: psutil.Process, timeout: float) -> None:
    """Until ``proc`` has exited. A zombie has: reaping it is its parent's business
    (psutil's wait() would poll a zombie that is not our child until the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() >= deadline:
            raise psutil.TimeoutExpired(timeout, pid=proc.pid)
        time.sleep(PROCESS_POLL_S)


def _ask_for_stack_dumps(procs: list[psutil.Process]) -> None:
    """A husk shim daemon still alive here is stuck: have it log where (SIGUSR1) first."""
    daemons = [p for p in procs if _cmdline(p)[:1] == [SHIM_NAME] and _cmdline(p)[-1:] == ["serve"]]
    for proc in daemons:
        argv = _cmdline(proc)
        shim_id = argv[argv.index("-id") + 1] if "-id" in argv[:-1] else "<id>"
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGUSR1)
            log.warning("shim daemon %d still running at teardown: its stacks go to "
                        "/var/log/husk/%s.log", proc.pid, shim_id)
    if daemons:
        time.sleep(STACK_DUMP_WAIT_S)


def _kill_tree(proc: psutil.Process) -> None:
    try:
        victims = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=PROCESS_KILL_TIMEOUT_S)


# -- cgroups -------------------------------------------------------------------


def _cgroup_mounts() -> list[Path]:
    return [Path(m.mount_point) for m in _mountinfo() if m.fstype in ("cgroup", "cgroup2")]


def _cgroup_dirs(cgroup_parent: str) -> list[Path]:
    """Existing directories of the instance's cgroup subtree, deepest first."""
    rel = cgroup_parent.lstrip("/")
    dirs: list[Path] = []
    for mnt in _cgroup_mounts():
        top = mnt / rel
        if top.is_dir():
            dirs += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_tasks(cgroup_parent: str) -> list[tuple[str, int]]:
    tasks: list[tuple[str, int]] = []
    for d in _cgroup_dirs(cgroup_parent):
        with contextlib.suppress(OSError):
            tasks += [(str(d), int(pid)) for pid in (d / "cgroup.procs").read_text().split()]
    return tasks


def _kill_cgroup_tasks(cgroup_parent: str) -> None:
    for d in _cgroup_dirs(cgroup_parent):
        # A frozen task cannot die until thawed.
        with contextlib.suppress(OSError):
            (d / "freezer.state").write_text("THAWED")
    pids = {pid for _, pid in _cgroup_tasks(cgroup_parent)}
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.kill()
            procs.append(p)
    psutil.wait_procs(procs, timeout=PROCESS_KILL_TIMEOUT_S)


def _remove_cgroups(cgroup_parent: str) -> list[str]:
    if _cgroup_tasks(cgroup_parent):
        _kill_cgroup_tasks(cgroup_parent)
    deadline = time.monotonic() + CGROUP_EMPTY_TIMEOUT_S
    while True:
        failed: list[str] = []
        for d in _cgroup_dirs(cgroup_parent):
            try:
                d.rmdir()
            except OSError as exc:
                failed.append(f"rmdir {d}: {exc.strerror}")
        if not failed or time.monotonic() >= deadline:
            return failed
        time.sleep(0.1)


# -- mounts --------------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    mount_point: str
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def _mountinfo() -> list[MountInfo]:
    out: list[MountInfo] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        out.append(MountInfo(int(f[0]), _unescape(f[4]), r[0] if r else "", r[1] if len(r) > 1 else ""))
    return out


@contextlib.contextmanager
def scratch_dirs(name: str, work_base: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """A scratch dir and a husk state dir for one command (demo, a benchmark), both gone
    on the way out. The state dir is short, under /run (unix socket paths are limited);
    a shim that had to be killed leaves its share mounts in it, and those go first:
    nothing is removed through a mount."""
    work = Path(tempfile.mkdtemp(prefix=f"husk-{name}-", dir=work_base))
    state = Path("/run") / f"husk-{name}-{secrets.token_hex(3)}"
    try:
        yield work, state
    finally:
        remove_state_dir(state)
        shutil.rmtree(work, ignore_errors=True)


def remove_state_dir(state: Path) -> None:
    """Remove a husk state dir, unmounting first what a killed shim or `husk run` left
    mounted in it (a container's rootfs bind among them): nothing is removed through
    a mount."""
    for point in mounts_under(state):  # deepest first
        subprocess.run(["umount", "--lazy", point], check=False, timeout=60)
    if left := mounts_under(state):
        print(f"not removing {state}: still mounted: {', '.join(left)}", file=sys.stderr)
    else:
        shutil.rmtree(state, ignore_errors=True)


def mounts_under(root: Path | str) -> list[str]:
    """Mount points at or below `root`, deepest (and most recent) first."""
    root_s = str(root)
    found = [(i, m.mount_point) for i, m in enumerate(_mountinfo())
             if m.mount_point == root_s or m.mount_point.startswith(root_s + "/")]
    found.sort(key=lambda im: (im[1].count("/"), im[0]), reverse=True)
    return [mp for _, mp in found]


def _umount(path: str, flags: int) -> int:
    if _libc.umount2(path.encode(), flags) == 0:
        return 0
    return ctypes.get_errno()


def _unmount_all_under(root: Path) -> list[str]:
    for _attempt in range(3):
        points = mounts_under(root)
        if not points:
            return []
        for mp in points:
            err = _umount(mp, 0)
            if err in (errno.EBUSY, errno.EAGAIN):
                log.warning("%s busy; lazy unmount", mp)
                err = _umount(mp, MNT_DETACH)
            if err not in (0, errno.EINVAL, errno.ENOENT):
                log.warning("umount %s: %s", mp, os.strerror(err))
    return [f"still mounted: {mp}" for mp in mounts_under(root)]


# -- shim sockets, netns ---------------------------------------------------------


def shim_socket_path(containerd_address: str, namespace: str, group_id: str) -> Path:
    """containerd 1.6's SocketAddress(): /run/containerd/s/sha256(address/ns/id)."""
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group_id).encode()).hexdigest()
    return SHIM_SOCKET_DIR / digest


def _known_ids(rec: InstanceRecord, scan_log: bool = True) -> set[str]:
    """Pod/container ids seen through the CRI, those that still have a bundle, and every
    64-hex id in containerd's debug log (a failed RunPodSandbox never shows in the CRI)."""
    ids = set(rec.seen_ids)
    if scan_log:
        with contextlib.suppress(OSError):
            ids |= set(_HEX_ID.findall((rec.path / "containerd.log").read_text(errors="replace")))
    for sub in ("io.containerd.runtime.v2.task/" + CRI_NAMESPACE, "io.containerd.grpc.v1.cri/sandboxes"):
        d = rec.path / "state" / sub
        if d.is_dir():
            ids |= {p.name for p in d.iterdir()}
    return ids


def _shim_sockets(rec: InstanceRecord, scan_log: bool = True) -> list[Path]:
    return [shim_socket_path(rec.address, CRI_NAMESPACE, i) for i in sorted(_known_ids(rec, scan_log))]


def _cni_cache_files(rec: InstanceRecord) -> list[Path]:
    """libcni's result cache (/var/lib/cni/results/<network>-<sandbox>-<ifname>); containerd's
    implicit loopback network is called cni-loopback in every instance, so match it by id."""
    found = list(CNI_CACHE_RESULTS.glob(f"{rec.network_name}-*"))
    found += [f for i in sorted(_known_ids(rec)) for f in CNI_CACHE_RESULTS.glob(f"cni-loopback-{i}-*")]
    return found


def _existing_shim_sockets(rec: InstanceRecord, scan_log: bool = True) -> list[Path]:
    return [s for s in _shim_sockets(rec, scan_log) if s.exists()]


def _remove_shim_sockets(rec: InstanceRecord, scan_log: bool = True) -> None:
    for sock in _existing_shim_sockets(rec, scan_log):
        log.warning("removing leftover shim socket %s", sock)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """Calls fn on a short-lived thread switched into the network namespace `netns`
    (setns changes only the calling thread, so the rest of the process stays where it
    is). A socket made there keeps that netns for its whole life."""
    result: list[T] = []
    failure: list[BaseException] = []

    def setns(fd: int) -> None:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")

    def run() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(target)
                finally:
                    os.close(target)
                try:
                    result.append(fn())
                finally:
                    setns(own)
            finally:
                os.close(own)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"in-netns-{netns.name}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _netns_names() -> list[str]:
    try:
        return [p.name for p in NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------


def _mkdtemp(base: Path) -> str:
    # Short random suffix: it also names the netns (IFNAMSIZ-free, but kept short
    # so socket paths stay far below the unix path limit).
    for _ in range(100):
        path = base / (INSTANCE_PREFIX + secrets.token_hex(4))
        try:
            path.mkdir(mode=0o711)
            return str(path)
        except FileExistsError:
            continue
    raise HarnessError(f"could not create a temp dir in {base}")


# iptables: portmap's hostPort rules; flock: serializes portmap (cni.py); tc: the recording CNI plugin.
REQUIRED_TOOLS = ("containerd", "ctr", "nsenter", "ip", "tc", "iptables", "flock", "apt-get", "dpkg-deb")


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        raise HarnessError("the CRI harness needs root (network namespaces, mounts, cgroups)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise HarnessError(f"missing tools {missing}: install Debian's containerd, util-linux, iproute2, iptables")
    if not CNI_BIN_DIR.is_dir():
        raise HarnessError(f"{CNI_BIN_DIR} missing: install containernetworking-plugins")


def _run(argv: list[str], timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def main() -> None:
    """`python -m tests.cri.harness`: start an instance and keep it until Ctrl-C (for poking with ctr)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--husk-config", type=Path, default=None)
    parser.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN_DIR)
    parser.add_argument("--containerd-dir", type=Path, default=None,
                        help=f"another containerd build's bin dir (e.g. {DEFAULT_CONTAINERD2_DIR})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ContainerdOptions(husk_config=args.husk_config, bin_dir=args.bin_dir, containerd_dir=args.containerd_dir)
    with Containerd.started(options) as cd:
        print(f"containerd ready: address {cd.address}, netns {cd.netns}, log {cd.log_path}", flush=True)
        print(f"  {cd.tool('ctr')} -a {cd.address} -n {CRI_NAMESPACE} containers ls", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
