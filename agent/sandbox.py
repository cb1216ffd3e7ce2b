"""The sandbox: the guest-wide setup of one pod and its containers.

CreateSandbox sets the hostname and DNS and mounts the shared filesystem; the
containers live under it. The shared mount (the first virtio-fs/9p storage, or
the configured shared dir when there is none) is the root every container
rootfs and bind source must resolve into.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from agent.config import ETC_RESOLV_CONF
from agent.container import Container, Runtime
from agent.errors import (AlreadyExistsError, FailedPreconditionError, GuestError,
                          InvalidArgumentError, NotFoundError)
from agent.spec import check_id, is_within, rewrite_spec
from agent.storage import MountedStorage, Storage, SubmountHolds, mount_storage
from agent.volumes import VolumeTools

log = logging.getLogger(__name__)

HOSTNAME_MAX = 64
# "net.ipv4.ip_forward": dot-separated names of /proc/sys entries, nothing else.
SYSCTL_KEY = re.compile(r"[a-z0-9_]+(\.[a-z0-9_-]+)+")
SYSCTL_KEY_MAX = 256
SYSCTL_VALUE_MAX = 4096
SHARED_FS_DRIVERS = ("virtio-fs", "9p")


def apply_sysctls(sysctls: dict[str, str], proc_sys: Path) -> None:
    """Write the pod's sysctls to the guest kernel (every one, or none of the rest).

    :raise InvalidArgumentError: a malformed key or value, or one the guest's
        kernel does not have.
    """
    for key, value in sorted(sysctls.items()):
        if not SYSCTL_KEY.fullmatch(key) or len(key) > SYSCTL_KEY_MAX:
            raise InvalidArgumentError(f"invalid sysctl name {key[:80]!r}")
        if len(value) > SYSCTL_VALUE_MAX or any(c in value for c in "\n\0"):
            raise InvalidArgumentError(f"invalid value for sysctl {key}")
        path = proc_sys.joinpath(*key.split("."))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgumentError(
                f"sysctl {key} does not exist in the guest kernel") from None
        except OSError as e:
            raise InvalidArgumentError(f"sysctl {key} cannot be set: {e.strerror}") from e
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise InvalidArgumentError(f"sysctl {key}={value!r}: {e.strerror}") from e
        finally:
            os.close(fd)
        log.info("sysctl %s = %s", key, value)


def write_resolv_conf(lines: list[str], configured: Path | None, state_dir: Path) -> Path:
    """Write resolv.conf where the guest allows it; returns the path written.

    The guest root is read-only: /etc/resolv.conf is used when writable (e.g. a
    symlink into /run), else <state_dir>/resolv.conf.
    """
    for line in lines:
        if "\n" in line or "\0" in line:
            raise InvalidArgumentError(f"dns line {line!r} contains a newline")
    content = "".join(f"{line}\n" for line in lines)
    candidates = [configured] if configured is not None else [ETC_RESOLV_CONF,
                                                               state_dir / "resolv.conf"]
    error: OSError | None = None
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            return path
        except OSError as e:
            error = e
    raise OSError(f"cannot write resolv.conf ({', '.join(map(str, candidates))}): {error}")


class Sandbox:
    """One pod's guest state: its mounts and containers."""

    def __init__(self, runtime: Runtime, sandbox_id: str, storages: list[MountedStorage],
                 shared_root: str) -> None:
        self.id = sandbox_id
        self.storages = storages
        self.shared_root = shared_root
        self.containers: dict[str, Container] = {}
        self._runtime = runtime
        self._creating: set[str] = set()
        self._forgetting: dict[str, asyncio.Task[None]] = {}
        self._submounts = SubmountHolds()
        self._destroyed = False

    @classmethod
    async def create(cls, runtime: Runtime, sandbox_id: str, hostname: str, dns: list[str],
                     storages: list[Storage], sysctls: dict[str, str] | None = None) -> Sandbox:
        """:raise InvalidArgumentError: bad hostname, DNS line, storage or sysctl."""
        check_id("sandbox id", sandbox_id)
        if len(hostname) > HOSTNAME_MAX or "\0" in hostname or "/" in hostname:
            raise InvalidArgumentError(f"invalid hostname {hostname!r}")
        for storage in storages:
            storage.check()
        apply_sysctls(sysctls or {}, runtime.config.proc_sys)
        try:
            if hostname:
                socket.sethostname(hostname)
            if dns:
                path = write_resolv_conf(dns, runtime.config.resolv_conf, runtime.config.state_dir)
                log.info("wrote %d DNS lines to %s", len(dns), path)
        except OSError as e:
            raise GuestError(f"sandbox {sandbox_id}: {e}") from e
        mounted = await mount_all(runtime, storages)
        shared = next((m.storage.mount_point for m in mounted
                       if m.storage.driver in SHARED_FS_DRIVERS), str(runtime.config.shared_dir))
        log.info("created sandbox %s (hostname %r, shared root %s)", sandbox_id, hostname, shared)
        return cls(runtime, sandbox_id, mounted, shared)

    def container(self, container_id: str) -> Container:
        """:raise NotFoundError: no such container."""
        try:
            return self.containers[container_id]
        except KeyError:
            raise NotFoundError(f"container {container_id!r} not found") from None

    async def create_container(self, container_id: str, spec_json: str,
                               storages: list[Storage]) -> Container:
        """Mount the container's volumes, rewrite its spec and crun create it.

        :raise AlreadyExistsError: the id is taken.
        :raise InvalidArgumentError: a malformed spec or storage, or a path escaping.
        """
        check_id("container id", container_id)
        self._check_alive()
        if container_id in self.containers or container_id in self._creating:
            raise AlreadyExistsError(f"container {container_id!r} already exists")
        self._creating.add(container_id)
        try:
            await self._forgotten([container_id])  # crun's state of a removed one of that id
            for storage in storages:
                storage.check()
            volumes = await mount_all(self._runtime, storages)
            try:
                # Bind sources may be the container's volumes or the pod's
                # ephemeral storages (its shared /dev/shm).
                roots = [v.storage.mount_point for v in volumes] + [
                    m.storage.mount_point for m in self.storages
                    if m.storage.driver == "ephemeral"]
                spec = rewrite_spec(spec_json, container_id=container_id,
                                    shared_root=self.shared_root, volume_roots=roots,
                                    cgroup_parent=self._runtime.config.cgroup_parent)
                self._submounts.hold(container_id, self._shared_paths(spec))
                container = await Container.create(self._runtime, container_id, spec, volumes)
            except BaseException:
                unmount_all(volumes)
                self._submounts.release(container_id)
                raise
            if self._destroyed:  # DestroySandbox ran while crun was creating it
                await container.remove()
                self._check_alive()
            self.containers[container_id] = container
            return container
        finally:
            self._creating.discard(container_id)

    async def remove_container(self, container_id: str, timeout: float = 0) -> None:
        """Release the container and answer; ``crun delete`` (~70 ms of a stop under
        TCG) goes on behind. A new container of the same id and DestroySandbox wait
        for it."""
        container = self.container(container_id)
        try:
            await container.release(timeout)
        finally:
            self.containers.pop(container_id, None)
            forgetting = asyncio.create_task(self._forget(container), name=f"forget {container_id}")
            self._forgetting[container_id] = forgetting
            forgetting.add_done_callback(
                lambda done: self._forgetting.pop(container_id, None)
                if self._forgetting.get(container_id) is done else None)

    async def _forget(self, container: Container) -> None:
        await container.forget()
        self._submounts.release(container.id)

    def _shared_paths(self, spec: dict[str, Any]) -> list[str]:
        """The rootfs and the bind sources in the shared directory (rewrite_spec
        resolved them)."""
        shared = os.path.realpath(self.shared_root)
        binds = [m["source"] for m in spec.get("mounts", [])
                 if isinstance(m.get("source"), str) and is_within(m["source"], shared)]
        return [spec["root"]["path"], *binds]

    async def _forgotten(self, container_ids: list[str] | None = None) -> None:
        """Wait for the background ``crun delete`` of these containers (all: None)."""
        pending = [t for cid, t in self._forgetting.items()
                   if container_ids is None or cid in container_ids]
        if pending:
            await asyncio.wait(pending)

    def _check_alive(self) -> None:
        if self._destroyed:
            raise FailedPreconditionError(f"sandbox {self.id} is being destroyed")

    async def destroy(self) -> None:
        """Remove every container, then unmount the sandbox's storages."""
        self._destroyed = True
        ids = list(self.containers)
        results = await asyncio.gather(*(self.remove_container(c) for c in ids),
                                       return_exceptions=True)
        for cid, result in zip(ids, results):
            if isinstance(result, BaseException):
                log.error("sandbox %s: removing container %s failed: %s", self.id, cid, result)
        await self._forgotten()
        self._submounts.release_all()
        unmount_all(self.storages)
        self.storages = []
        log.info("destroyed sandbox %s", self.id)


async def mount_all(runtime: Runtime, storages: list[Storage]) -> list[MountedStorage]:
    """Mount in order; on a failure unmount what was mounted and re-raise."""
    mounted: list[MountedStorage] = []
    try:
        for storage in storages:
            mounted.append(await mount_storage(
                storage, sysfs=runtime.config.sysfs, devfs=runtime.config.devfs,
                tools=VolumeTools(runtime.reaper, runtime.config.sysfs)))
    except BaseException:
        unmount_all(mounted)
        raise
    return mounted


def unmount_all(mounted: list[MountedStorage]) -> None:
    for m in reversed(mounted):
        try:
            m.unmount()
        except OSError as e:
            log.warning("%s", e)

