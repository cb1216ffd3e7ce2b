"""CNI configuration for a harness-owned containerd.

Owns the network list the CRI plugin loads: a Linux bridge with host-local
IPAM on a private subnet. The bridge and the host-side veths are created in
the network namespace containerd runs in, which the harness creates for this
one instance, so nothing touches the host network. The IPAM state lives in the
instance's temp dir. containerd's CRI adds the loopback network by itself
(it always loads `loopback` from the CNI bin dir before the conf dir's list).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CNI_BIN_DIR = Path("/usr/lib/cni")
# Plugins the generated config and containerd's implicit loopback network need.
REQUIRED_PLUGINS = ("bridge", "host-local", "loopback")
CNI_VERSION = "1.0.0"
DEFAULT_SUBNET = "10.88.0.0/16"
BRIDGE_NAME = "husk-br0"


@dataclass(frozen=True)
class CniConfig:
    network_name: str
    conf_dir: Path
    ipam_dir: Path
    subnet: str = DEFAULT_SUBNET
    bin_dir: Path = CNI_BIN_DIR

    def check_plugins(self) -> None:
        missing = [p for p in REQUIRED_PLUGINS if not (self.bin_dir / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CNI plugins {missing} not found in {self.bin_dir} (Debian package containernetworking-plugins)"
            )

    def network_list(self) -> dict[str, object]:
        return {
            "cniVersion": CNI_VERSION,
            "name": self.network_name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE_NAME,
                    "isGateway": True,
                    # No NAT: pods only need to reach each other and the bridge,
                    # and iptables rules would be one more thing to clean up.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.ipam_dir),
                    },
                }
            ],
        }

    def write(self) -> Path:
        """Writes the network list into conf_dir and returns its path."""
        self.check_plugins()
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.ipam_dir.mkdir(parents=True, exist_ok=True)
        path = self.conf_dir / "10-husk-test.conflist"
        path.write_text(json.dumps(self.network_list(), indent=2) + "\n")
        return path
