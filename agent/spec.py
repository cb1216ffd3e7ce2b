"""OCI spec validation and rewriting for the guest.

The host sends config.json as written for the host; here it is checked (the
agent must not crash on, or be tricked by, a bad spec) and rewritten for the
VM: paths must resolve inside the sandbox's shared mount (or a container
volume), host namespace paths and the network namespace are dropped (containers
share the VM's network, as in Kata), the cgroup moves under the agent's parent,
host-only parts (hooks, LSM labels) go, and a newer spec version is given to the
guest's crun as one it accepts when nothing in the spec is newer than crun.
"""
from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, cast

from agent.errors import InvalidArgumentError

# Ids become directory and cgroup names: the same rule containerd uses.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Mount types whose source is not a path.
SOURCELESS_TYPES = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
                              "shm", "ramfs", "binfmt_misc", "securityfs", "debugfs"})
BIND_OPTIONS = frozenset({"bind", "rbind"})
# Guest paths a bind mount may take as source without being under the shared mount.
WELL_KNOWN_EXACT = ("/dev", "/proc", "/sys")
WELL_KNOWN_TREES = ("/dev", "/sys")
DROPPED_NAMESPACES = frozenset({"network"})
# A namespace entry with a path means "share the pod's". The VM is the pod, so
# the pod's IPC and UTS namespaces are the guest's own (the agent's): its
# hostname is the pod's. A pid entry with a path (shareProcessNamespace, or
# hostPID, which containerd 1.6 also expresses as the sandbox's namespace) is
# the guest's PID namespace too: the "node" a container can see is its VM.
# Other kinds with a path get a new namespace.
POD_SHARED_NAMESPACES = frozenset({"ipc", "uts", "pid"})

# The guest's crun 1.8.1 refuses a spec whose ociVersion does not contain "1.0"
# ("unknown version specified"; crun dropped that check in 1.14.3). containerd 1.6
# writes 1.0.2-dev, 1.7 writes 1.1.0 (which passes: it contains "1.0"), 2.x writes
# 1.2.x or 1.3.0. crun reads the spec through libocispec, which skips keys it does
# not know, so the version is crun's only guard against a newer spec. We hand crun
# a 1.x spec as CRUN_OCI_VERSION only when it sets none of the fields runtime-spec
# added after the one crun 1.8.1's libocispec was generated from (runtime-spec
# v1.0.2-114-g494a5a6, Sep 2022, up to v1.3.0): crun would silently drop those, so
# such a spec is refused by name instead of run as something it did not ask for.
CRUN_OCI_VERSION = "1.0.2"
UNKNOWN_TO_CRUN = (
    ("process", "ioPriority"), ("process", "scheduler"), ("process", "execCPUAffinity"),
    ("linux", "netDevices"), ("linux", "memoryPolicy"), ("linux", "timeOffsets"),
    ("linux", "intelRdt", "schemata"), ("linux", "intelRdt", "enableMonitoring"),
    ("linux", "resources", "cpu", "burst"),
)


def check_id(kind: str, value: str) -> str:
    """:raise InvalidArgumentError: ``value`` is not a usable container/exec/sandbox id."""
    if not ID_PATTERN.match(value):
        raise InvalidArgumentError(
            f"invalid {kind} {value!r}: expected [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 characters")
    return value


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """:raise InvalidArgumentError: ``text`` is not a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def check_absolute_path(path: Any, what: str) -> str:
    """An absolute, normalized path: no '.', '..' or empty components.

    :raise InvalidArgumentError: otherwise.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgumentError(f"{what} must be an absolute path, got {path!r}")
    if "\0" in path:
        raise InvalidArgumentError(f"{what} contains a NUL byte")
    if path != "/" and any(part in ("", ".", "..") for part in path[1:].split("/")):
        raise InvalidArgumentError(f"{what} {path!r} is not normalized (or uses '..')")
    return path


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_within(path: str, roots: Iterable[str]) -> str | None:
    """``path`` with symlinks resolved, if that lies inside one of ``roots``."""
    try:
        real = os.path.realpath(path)
    except OSError:  # e.g. EACCES on a /proc magic link: not a path we can vouch for
        return None
    for root in roots:
        if is_within(real, os.path.realpath(root)):
            return real
    return None


def _string_list(value: Any, what: str, *, non_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgumentError(f"{what} must be a list of strings")
    if non_empty and not value:
        raise InvalidArgumentError(f"{what} must not be empty")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{what} must be a JSON object")
    return value


def _check_process(process: Any, what: str) -> dict[str, Any]:
    process = _object(process, what)
    _string_list(process.get("args"), f"{what}.args", non_empty=True)
    if "env" in process:
        _string_list(process["env"], f"{what}.env")
    if "cwd" in process:
        check_absolute_path(process["cwd"], f"{what}.cwd")
    if "terminal" in process and not isinstance(process["terminal"], bool):
        raise InvalidArgumentError(f"{what}.terminal must be a boolean")
    user = process.get("user")
    if user is not None:
        user = _object(user, f"{what}.user")
        for key in ("uid", "gid"):
            if key in user and (not isinstance(user[key], int) or isinstance(user[key], bool)
                                or user[key] < 0):
                raise InvalidArgumentError(f"{what}.user.{key} must be a non-negative integer")
        gids = user.get("additionalGids", [])
        if not isinstance(gids, list) or not all(isinstance(g, int) and g >= 0 for g in gids):
            raise InvalidArgumentError(f"{what}.user.additionalGids must be a list of integers")
    return cast(dict[str, Any], process)


def _strip_process(process: dict[str, Any]) -> dict[str, Any]:
    # LSM profiles are the host's; the guest kernel has no such policy loaded.
    process.pop("apparmorProfile", None)
    process.pop("selinuxLabel", None)
    process.setdefault("cwd", "/")
    return process


def rewrite_process(process_json: str) -> dict[str, Any]:
    """An exec's OCI Process, checked and stripped for the guest.

    :raise InvalidArgumentError: not a valid Process.
    """
    process = _check_process(parse_json_object(process_json, "process"), "process")
    return _strip_process(copy.deepcopy(process))


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in BIND_OPTIONS or any(o in BIND_OPTIONS for o in options)


def _well_known(source: str) -> bool:
    return source in WELL_KNOWN_EXACT or any(is_within(source, t) for t in WELL_KNOWN_TREES)


def _rewrite_mount(mount: Any, index: int, allowed_roots: Sequence[str]) -> dict[str, Any]:
    what = f"mounts[{index}]"
    mount = _object(mount, what)
    destination = check_absolute_path(mount.get("destination"), f"{what}.destination")
    if "options" in mount:
        _string_list(mount["options"], f"{what}.options")
    mount_type = mount.get("type")
    if mount_type is not None and not isinstance(mount_type, str):
        raise InvalidArgumentError(f"{what}.type must be a string")
    if mount_type in SOURCELESS_TYPES and not _is_bind(mount):
        return cast(dict[str, Any], mount)
    source = mount.get("source")
    where = f"mount {destination}: source"
    check_absolute_path(source, where)
    if _well_known(source):
        return cast(dict[str, Any], mount)
    resolved = resolve_within(source, allowed_roots)
    if resolved is None:
        raise InvalidArgumentError(
            f"{where} {source!r} is outside the shared mount ({', '.join(allowed_roots)})")
    return {**mount, "source": resolved}


def _field(spec: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = spec
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def crun_oci_version(spec: dict[str, Any]) -> Any:
    """The ociVersion to give the guest's crun for ``spec`` (see CRUN_OCI_VERSION).

    :raise InvalidArgumentError: a newer 1.x spec sets a field crun would ignore.
    """
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1.") or "1.0" in version:
        return version  # crun takes it as it is, or refuses it itself
    used = [".".join(path) for path in UNKNOWN_TO_CRUN if _field(spec, path) not in (None, {}, [])]
    if used:
        raise InvalidArgumentError(
            f"OCI spec {version} sets {', '.join(used)}, which the guest's crun does not support")
    return CRUN_OCI_VERSION


def rewrite_spec(spec_json: str, *, container_id: str, shared_root: str,
                 volume_roots: Sequence[str] = (), cgroup_parent: str) -> dict[str, Any]:
    """The container's config.json for the guest.

    :param shared_root: the sandbox's shared mount; root.path must lie under it.
    :param volume_roots: the container's own volume mount points (bind sources too).
    :raise InvalidArgumentError: the spec is malformed or a path escapes.
    """
    spec = copy.deepcopy(parse_json_object(spec_json, "OCI spec"))
    _strip_process(_check_process(spec.get("process"), "process"))
    if "ociVersion" in spec:
        spec["ociVersion"] = crun_oci_version(spec)

    root = _object(spec.get("root"), "root")
    root_path = root.get("path")
    # Not required to be normalized: it is judged by where it resolves to.
    if not isinstance(root_path, str) or not root_path.startswith("/") or "\0" in root_path:
        raise InvalidArgumentError(f"root.path must be an absolute guest path, got {root_path!r}")
    shared = os.path.realpath(shared_root)
    real_root = resolve_within(root_path, [shared])
    if real_root is None or real_root == shared:
        raise InvalidArgumentError(
            f"root.path {root_path!r}: path escaping the rootfs (must be under {shared_root})")
    if not os.path.isdir(real_root):
        raise InvalidArgumentError(f"root.path {root_path!r} is not a directory in the guest")
    root["path"] = real_root

    mounts = spec.get("mounts", [])
    if not isinstance(mounts, list):
        raise InvalidArgumentError("mounts must be a list")
    allowed = [shared_root, *volume_roots]
    spec["mounts"] = [_rewrite_mount(m, i, allowed) for i, m in enumerate(mounts)]

    spec.pop("hooks", None)
    linux = _object(spec.setdefault("linux", {}), "linux")
    namespaces = linux.get("namespaces", [])
    if not isinstance(namespaces, list):
        raise InvalidArgumentError("linux.namespaces must be a list")
    kept = []
    for i, ns in enumerate(namespaces):
        ns = _object(ns, f"linux.namespaces[{i}]")
        if not isinstance(ns.get("type"), str):
            raise InvalidArgumentError(f"linux.namespaces[{i}].type must be a string")
        if ns["type"] in DROPPED_NAMESPACES:
            continue
        # Namespace paths are the host's (the pause container's): meaningless here.
        if "path" in ns and ns["type"] in POD_SHARED_NAMESPACES:
            kept.append({"type": ns["type"], "path": f"/proc/{os.getpid()}/ns/{ns['type']}"})
        else:
            kept.append({"type": ns["type"]})
    linux["namespaces"] = kept
    linux["cgroupsPath"] = f"/{cgroup_parent}/{container_id}"
    linux.pop("mountLabel", None)
    if "resources" in linux:
        _object(linux["resources"], "linux.resources")
    return spec
