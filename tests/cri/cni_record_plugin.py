#!/usr/bin/python3
"""A test-only CNI plugin that records what a pod's netns looked like at DEL.

The harness chains it last in every network list (cni.py), so libcni runs it
first on DEL, before portmap and bridge undo anything: it sees the pod's
network namespace exactly as the runtime left it (links, qdiscs and ingress
filters a VM runtime may have added). On ADD it passes the previous result
through; on DEL it writes a JSON record into the `recordDir` of its config and
always exits 0 without output, so it can never block a teardown, even when the
netns is already gone (that is recorded too). Standalone and stdlib-only: the
harness copies it into the instance's CNI bin dir and containerd runs it there.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
COMMAND_TIMEOUT_S = 10.0
# CNI error codes (SPEC.md, "Error").
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7


class PluginError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _tool(name: str) -> str:
    # containerd passes its own PATH on; fall back to where Debian puts these.
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}", f"/bin/{name}") if os.path.exists(p)),
        name,
    )


def _in_netns(netns: str, argv: list[str], text: bool = False) -> tuple[Any, str | None]:
    """Runs argv in the netns; returns (parsed JSON output, or its lines with `text`, None)
    or (None, error text)."""
    try:
        proc = subprocess.run([_tool("nsenter"), f"--net={netns}", "--", _tool(argv[0]), *argv[1:]],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(argv)}: {exc}"
    if proc.returncode != 0:
        return None, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
    out = proc.stdout.strip()
    if text:
        return out.splitlines(), None
    try:
        return (json.loads(out) if out else []), None
    except ValueError as exc:
        return None, f"{' '.join(argv)}: output is not JSON ({exc}): {out[:200]!r}"


def snapshot(netns: str, ifname: str) -> dict[str, Any]:
    """What the recording is about: the netns's links, qdiscs and the interface's ingress filters."""
    result: dict[str, Any] = {"netns_present": False, "links": None, "qdiscs": None,
                              "ingress_filters": None, "nat_rules": None, "errors": []}
    if not netns:
        # containerd passes an empty CNI_NETNS once the pod's netns is closed.
        result["errors"].append("CNI_NETNS is empty: the pod's netns is gone")
        return result
    if not os.path.exists(netns):
        result["errors"].append(f"{netns} does not exist: the pod's netns is gone")
        return result
    commands = {
        "links": ["ip", "-d", "-j", "link", "show"],
        "qdiscs": ["tc", "-j", "qdisc", "show"],
        "ingress_filters": ["tc", "-j", "filter", "show", "dev", ifname, "ingress"],
    }
    for key, argv in commands.items():
        value, error = _in_netns(netns, argv)
        result[key] = value
        if error is not None:
            result["errors"].append(error)
        elif key == "links":
            result["netns_present"] = True
    # The netns's own NAT rules (a VM runtime's port-forward redirect lives there).
    result["nat_rules"], error = _in_netns(netns, ["iptables", "-t", "nat", "-S"], text=True)
    if error is not None:
        result["errors"].append(error)
    return result


def write_record(record_dir: str, container_id: str, ifname: str, record: dict[str, Any]) -> str:
    """Writes <id>-<ifname>.json, or <id>-<ifname>.<n>.json for the n-th DEL of the same
    interface; atomically (a reader never sees half a record) and without overwriting."""
    os.makedirs(record_dir, exist_ok=True)
    tmp = os.path.join(record_dir, f".{container_id}-{ifname}.{os.getpid()}.tmp")
    for attempt in itertools.count(1):
        record["attempt"] = attempt
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
        suffix = "" if attempt == 1 else f".{attempt}"
        final = os.path.join(record_dir, f"{container_id}-{ifname}{suffix}.json")
        try:
            os.link(tmp, final)  # refuses to replace: an earlier (or concurrent) DEL has that name
            return final
        except FileExistsError:
            continue
        finally:
            os.unlink(tmp)
    raise AssertionError("unreachable")


def cmd_del(conf: dict[str, Any], env: dict[str, str]) -> None:
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS", "")
    record: dict[str, Any] = {
        "time": time.time(),
        "container_id": container_id,
        "ifname": ifname,
        "netns": netns,
        "network": conf.get("name", ""),
    }
    record.update(snapshot(netns, ifname))
    record_dir = conf.get("recordDir")
    if not record_dir:
        raise PluginError(ERR_INVALID_CONFIG, "recordDir missing from the plugin config")
    write_record(str(record_dir), container_id or "unknown", ifname or "unknown", record)


def main() -> int:
    env = dict(os.environ)
    command = env.get("CNI_COMMAND", "")
    raw = sys.stdin.read()
    try:
        conf: dict[str, Any] = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        conf = {}
        if command != "DEL":
            return _error("", PluginError(ERR_DECODE, f"config is not JSON: {exc}"))
    version = str(conf.get("cniVersion", "0.1.0"))
    if command == "DEL":
        # Whatever happens, DEL succeeds quietly: the record is a test aid, not a gate.
        try:
            cmd_del(conf, env)
        except BaseException:  # noqa: BLE001 - see above
            traceback.print_exc(file=sys.stderr)
        return 0
    try:
        if command == "VERSION":
            _print({"cniVersion": version if version in SUPPORTED_VERSIONS else "1.0.0",
                    "supportedVersions": SUPPORTED_VERSIONS})
            return 0
        if version not in SUPPORTED_VERSIONS:
            raise PluginError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version} not supported ({SUPPORTED_VERSIONS})")
        if command == "ADD":
            if "prevResult" not in conf:
                raise PluginError(ERR_INVALID_CONFIG, "must be chained after a plugin that returns a result")
            _print({**conf["prevResult"], "cniVersion": version})
            return 0
        if command == "CHECK":
            if "prevResult" not in conf:
                raise PluginError(ERR_INVALID_CONFIG, "CHECK needs a prevResult")
            return 0
        raise PluginError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
    except PluginError as exc:
        return _error(version, exc)


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _error(version: str, exc: PluginError) -> int:
    _print({"cniVersion": version or "1.0.0", "code": exc.code, "msg": exc.msg})
    return 1


if __name__ == "__main__":
    sys.exit(main())
