"""``husk env``: the configuration and versions in effect, as TOML for a bug report.

The format (documented in README, "Operating husk"): ``format_version`` and the
tables [husk], [config] (with one sub-table per husk.toml section, every value
after defaults), [host], [qemu], [virtiofsd], [containerd] and [guest]. A version
that cannot be read is the string "unavailable: <why>". Nothing secret: only
named fields are reported, never a file copied whole (containerd's config may
hold registry credentials), and a config key that names a secret is redacted.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shim import __version__
from shim.cgroups.host import cgroup_layout
from shim.config import Config, ConfigError, load_config, resolve_config_path
from shim.network.tcfilter import vhost_net_available
from shim.ops import imageid
from shim.ops.check import (DEFAULT_CONTAINERD_CONFIG, TUN_DEVICE, CommandError,
                            ContainerdConfigError, GuestImage, containerd_version,
                            read_containerd_config, tool_version)
from shim.vm.accel import choose_accel
from shim.vm.vsock import vhost_vsock_available

FORMAT_VERSION = 1
OS_RELEASE = Path("/etc/os-release")
# Keys whose values are never printed (none today; a future key must not leak).
SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|(^|_)key$", re.IGNORECASE)
# ...unless it names where a secret is: paths are fine to report.
PATH_KEY = re.compile(r"_(path|file|dir)$")
REDACTED = "<redacted>"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _redact(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: REDACTED if SECRET_KEY.search(k) and not PATH_KEY.search(k) else v
            for k, v in values.items()}


def _version(read: Callable[[], str]) -> str:
    try:
        return read()
    except CommandError as exc:
        return f"unavailable: {exc}"


def _config_source(explicit: str | None) -> str:
    if explicit:
        return "--config"
    if os.environ.get("HUSK_CONFIG"):
        return "HUSK_CONFIG"
    return "standard path" if resolve_config_path(None) else "built-in defaults"


def _os_name() -> str:
    try:
        text = OS_RELEASE.read_text()
    except OSError:
        return ""
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?$', text, re.MULTILINE)
    return match.group(1) if match else ""


def gather(explicit: str | None,
           containerd_config: Path = DEFAULT_CONTAINERD_CONFIG) -> dict[str, Any]:
    """The report as nested dicts (tables) of strings, numbers, booleans and lists."""
    path = resolve_config_path(explicit)
    error = ""
    try:
        config = load_config(explicit)
    except ConfigError as exc:  # the defaults stand in; `error` says why
        config, error = Config(), str(exc)
    hv = config.hypervisor
    choice = asyncio.run(choose_accel(hv.accel, hv.qemu_path, Path(config.runtime.state_dir)))
    vsock = vhost_vsock_available()
    transport = "vsock" if config.agent.transport == "vsock" or (
        config.agent.transport == "auto" and vsock) else "serial"

    containerd: dict[str, Any] = {}
    try:
        binary, version = containerd_version()
        containerd.update(path=binary, version=version)
    except CommandError as exc:
        containerd.update(path="", version=f"unavailable: {exc}")
    containerd["config"] = str(containerd_config)
    try:
        cd = read_containerd_config(containerd_config)
        containerd.update(config_version=cd.version,
                          husk_handlers=[h.name for h in cd.husk_handlers],
                          pod_annotations=sorted({a for h in cd.husk_handlers
                                                  for a in h.pod_annotations}),
                          husk_config_paths=sorted({h.config_path for h in cd.husk_handlers
                                                    if h.config_path}),
                          cgroup_driver=cd.cgroup_driver, error="")
    except ContainerdConfigError as exc:
        containerd["error"] = str(exc)

    guest = GuestImage.locate(config)
    ident = guest.identity or imageid.ImageIdentity()
    sections = {f.name: _redact(dataclasses.asdict(getattr(config, f.name)))
                for f in dataclasses.fields(config)}
    return {
        "format_version": FORMAT_VERSION,
        "husk": {"version": __version__, "python": platform.python_version(),
                 "executable": os.path.abspath(sys.argv[0]), "package": str(Path(__file__).resolve().parents[1])},
        "config": {"file": str(path) if path else "", "source": _config_source(explicit),
                   "error": error, **sections},
        "host": {"kernel": platform.release(), "machine": platform.machine(), "os": _os_name(),
                 "cpus": os.cpu_count() or 0, "cgroup": cgroup_layout(),
                 "accel": choice.accel.value, "accel_reason": choice.reason,
                 "agent_transport": transport, "vhost_vsock": vsock,
                 "vhost_net": vhost_net_available(), "tun": os.access(TUN_DEVICE, os.W_OK)},
        "qemu": {"path": hv.qemu_path, "version": _version(lambda: tool_version(hv.qemu_path,
                                                                                "-version"))},
        "virtiofsd": {"path": config.shared_fs.virtiofsd_path,
                      "version": _version(lambda: tool_version(config.shared_fs.virtiofsd_path))},
        "containerd": containerd,
        "guest": {"kernel_path": str(guest.kernel), "initrd_path": str(guest.initrd),
                  "image_path": str(guest.image), "manifest_path": str(guest.manifest),
                  "manifest_found": guest.identity is not None, "kernel": ident.kernel,
                  "husk_version": ident.husk_version, "agent_sources": ident.agent_sources,
                  "agent_sources_installed": guest.installed_sources, "inputs": ident.inputs},
    }


# Section: TOML


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _string(str(value))


def to_toml(doc: Mapping[str, Any], prefix: str = "") -> str:
    """``doc`` as TOML: scalars first, then each nested mapping as a [table]."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, Mapping)]
    for k, v in doc.items():
        if isinstance(v, Mapping):
            name = f"{prefix}{_key(k)}"
            lines += ["", f"[{name}]", to_toml(v, name + ".")]
    return "\n".join(lines)


def render(explicit: str | None, containerd_config: Path = DEFAULT_CONTAINERD_CONFIG) -> str:
    header = ("# husk env: the configuration and versions in effect, for a bug report.\n"
              "# Format: README.md, \"Operating husk\". No secrets: paste it as it is.\n")
    return header + to_toml(gather(explicit, containerd_config)).strip("\n") + "\n"
