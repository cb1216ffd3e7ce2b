"""CNI configuration for a harness-owned containerd.

Owns the network lists the CRI plugin loads, one per pod network (the first
is the pod's eth0): a Linux bridge with host-local IPAM on a private subnet
(optionally dual-stack), on the first network `portmap` for hostPort mappings,
and last the harness's recording plugin (cni_record_plugin.py), which on DEL
snapshots the pod netns before that network's other plugins undo anything.
The bridges and host-side veths are created in the network namespace
containerd runs in, which the harness creates for this one instance, so
nothing touches the host network. Everything else lives in the instance's
temp dir: the conflists, the IPAM state, the DEL records, and the CNI bin dir
(links to the system plugins plus the recording plugin: containerd 1.6 takes
a single `bin_dir`). containerd's CRI adds the loopback network by itself (it
always loads `loopback` from the bin dir before the conf dir's lists).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_BIN_DIR = Path("/usr/lib/cni")
# Plugins the generated config and containerd's implicit loopback network need.
REQUIRED_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
CNI_VERSION = "1.0.0"
DEFAULT_SUBNET = "10.88.0.0/16"
BRIDGE_NAME = "husk-br0"
RECORD_PLUGIN = "husk-record"
RECORD_PLUGIN_SOURCE = Path(__file__).with_name("cni_record_plugin.py")
# portmap (1.1.1) creates its shared chains with check-then-create and takes "chain
# exists" only as iptables-legacy reports it (exit 1; iptables-nft exits 4), so two
# portmaps at once (pods set up in parallel) can race and fail a pod with
# "CHAIN_USER_ADD failed (File exists)": the bin dir runs it under an instance-wide lock.
SERIALIZED_PLUGINS = ("portmap",)
IFNAMSIZ = 16  # including the NUL
# host-local keeps these next to the per-IP files in its data dir.
_IPAM_BOOKKEEPING = re.compile(r"^(lock|last_reserved_ip\..*)$")
_NETWORK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class CniNetwork:
    """One pod network: its own conflist, bridge and subnet(s); the first one is the pod's eth0."""

    name: str
    bridge: str
    subnet: str
    # A second host-local range makes the network dual-stack (e.g. fd00:88::/64).
    subnet6: str | None = None
    # The veths' MTU (0 = the bridge plugin's default, 1500).
    mtu: int = 0
    # Extra routes (destination CIDRs) via the bridge, on top of the default ones.
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NETWORK_NAME.match(self.name):
            raise ValueError(f"network name {self.name!r}: use lower-case letters, digits and '-'")
        if not 0 < len(self.bridge) < IFNAMSIZ:
            raise ValueError(f"bridge name {self.bridge!r} must have 1 to {IFNAMSIZ - 1} characters")
        if ipaddress.ip_network(self.subnet).version != 4:
            raise ValueError(f"subnet {self.subnet} of network {self.name} is not IPv4")
        if self.subnet6 is not None and ipaddress.ip_network(self.subnet6).version != 6:
            raise ValueError(f"subnet6 {self.subnet6} of network {self.name} is not IPv6")

    @property
    def gateway(self) -> str:
        """The bridge's IPv4 address: host-local's default gateway, the subnet's first address."""
        return str(ipaddress.ip_network(self.subnet)[1])

    @property
    def gateway6(self) -> str | None:
        return str(ipaddress.ip_network(self.subnet6)[1]) if self.subnet6 else None


DEFAULT_NETWORK = CniNetwork(name="default", bridge=BRIDGE_NAME, subnet=DEFAULT_SUBNET)


@dataclass(frozen=True)
class CniConfig:
    """The CNI files of one instance, all under `root` (<instance>/cni)."""

    # Prefix of the CNI network names; libcni's result cache in /var/lib/cni is
    # keyed by network name, so it must be unique to the instance.
    name_prefix: str
    root: Path
    networks: tuple[CniNetwork, ...] = (DEFAULT_NETWORK,)
    plugin_dir: Path = CNI_BIN_DIR

    def __post_init__(self) -> None:
        if not self.networks:
            raise ValueError("at least one CNI network is needed")
        for what in ("name", "bridge", "subnet"):
            values = [getattr(n, what) for n in self.networks]
            if len(set(values)) != len(values):
                raise ValueError(f"CNI networks must not share a {what}: {values}")

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def del_records_dir(self) -> Path:
        return self.root / "del-records"

    @property
    def lock_path(self) -> Path:
        return self.root / "plugins.lock"

    def cni_name(self, network: CniNetwork) -> str:
        return f"{self.name_prefix}-{network.name}"

    def network(self, name: str) -> CniNetwork:
        for net in self.networks:
            if net.name == name:
                return net
        raise KeyError(f"no CNI network {name!r} (have {[n.name for n in self.networks]})")

    def check_plugins(self) -> None:
        missing = [p for p in REQUIRED_PLUGINS if not (self.plugin_dir / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CNI plugins {missing} not found in {self.plugin_dir} (Debian package containernetworking-plugins)"
            )

    def network_list(self, index: int) -> dict[str, object]:
        net = self.networks[index]
        ranges = [[{"subnet": net.subnet}]]
        routes = [{"dst": "0.0.0.0/0"}]
        if net.subnet6 is not None:
            ranges.append([{"subnet": net.subnet6}])
            routes.append({"dst": "::/0"})
        plugins: list[dict[str, object]] = [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": True,
                # No NAT to the outside: pods only need to reach each other and
                # the bridge, and masquerade rules would be one more thing to clean up.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    # Default routes on the primary network only: a second
                    # IPv4 default route on eth1 fails with EEXIST.
                    "routes": (routes if index == 0 else []) + [{"dst": d} for d in net.routes],
                    "dataDir": str(self.ipam_dir),
                },
                **({"mtu": net.mtu} if net.mtu else {}),
            },
        ]
        if index == 0:
            # hostPort mappings: DNAT in containerd's netns to the pod's primary IPs, as in
            # Kubernetes. Not on the other networks: each portmap adds its own DNAT for the
            # same host port, and which one wins would depend on the parallel setup order.
            # Does nothing for a pod without port mappings.
            plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
        # Last in the chain, so first on DEL: sees the pod netns before this network's
        # plugins undo anything.
        plugins.append({"type": RECORD_PLUGIN, "recordDir": str(self.del_records_dir)})
        return {"cniVersion": CNI_VERSION, "name": self.cni_name(net), "plugins": plugins}

    def conflist_path(self, index: int) -> Path:
        # containerd loads the lists sorted by file name; the first one gets eth0.
        return self.conf_dir / f"{10 + index:02d}-{self.networks[index].name}.conflist"

    def write(self) -> list[Path]:
        """Fills the bin dir and writes one network list per network; returns their paths."""
        self.check_plugins()
        flock = shutil.which("flock")
        if flock is None:
            raise FileNotFoundError("flock not found (Debian package util-linux)")
        for d in (self.conf_dir, self.bin_dir, self.ipam_dir, self.del_records_dir):
            d.mkdir(parents=True, exist_ok=True)
        for plugin in sorted(self.plugin_dir.iterdir()):
            if plugin.name in SERIALIZED_PLUGINS:
                wrapper = self.bin_dir / plugin.name
                wrapper.write_text(f"#!/bin/sh\nexec {flock} {self.lock_path} {plugin} \"$@\"\n")
                wrapper.chmod(0o755)
            else:
                (self.bin_dir / plugin.name).symlink_to(plugin)
        # A copy, not a link: the plugin must be executable whatever mode the checkout gave it.
        record = self.bin_dir / RECORD_PLUGIN
        record.write_bytes(RECORD_PLUGIN_SOURCE.read_bytes())
        record.chmod(0o755)
        paths = []
        for i in range(len(self.networks)):
            path = self.conflist_path(i)
            path.write_text(json.dumps(self.network_list(i), indent=2) + "\n")
            paths.append(path)
        return paths

    def allocations(self, network_name: str | None = None) -> dict[str, str]:
        """IP -> container id of what host-local holds now, in one network (by its
        short name) or in all of them."""
        nets = self.networks if network_name is None else (self.network(network_name),)
        found: dict[str, str] = {}
        for net in nets:
            d = self.ipam_dir / self.cni_name(net)
            if not d.is_dir():
                continue  # host-local creates it at the first ADD
            for f in sorted(d.iterdir()):
                if _IPAM_BOOKKEEPING.match(f.name):
                    continue
                # The file holds "<container id>\r\n<ifname>"; it may go away while we read.
                with contextlib.suppress(FileNotFoundError):
                    found[f.name] = f.read_text().split("\n", 1)[0].strip()
        return found

    def del_records(self, container_id: str) -> list[dict[str, Any]]:
        """The recording plugin's DEL records of one sandbox, oldest first (one per
        interface and DEL: containerd repeats DEL on every StopPodSandbox)."""
        records = [json.loads(f.read_text()) for f in self.del_records_dir.glob(f"{container_id}-*.json")]
        return sorted(records, key=lambda r: (r.get("time", 0.0), r.get("ifname", "")))
