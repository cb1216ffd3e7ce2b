"""The CRI harness's pod-networking parts that need no containerd: the CNI network lists and
bin dir, host-local allocations, the recording CNI plugin run by hand, CRI port mappings,
finding crictl, and sockets made in another netns."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2 as api

from tests.cri import crictl
from tests.cri.cni import (DEFAULT_NETWORK, RECORD_PLUGIN, RECORD_PLUGIN_SOURCE, REQUIRED_PLUGINS, CniConfig,
                           CniNetwork)
from tests.cri.cri import _port_mapping
from tests.cri.harness import ContainerdOptions, in_netns, render_config

DUAL = CniNetwork("a", "husk-br0", "10.88.0.0/16", "fd00:88::/64")
SECOND = CniNetwork("b", "husk-br1", "10.89.0.0/16")
POD_ID = "ab" * 32
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setns needs CAP_SYS_ADMIN")


def _config(tmp_path: Path, *networks: CniNetwork) -> CniConfig:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    for name in (*REQUIRED_PLUGINS, "tuning"):
        (plugins / name).write_text("#!/bin/sh\n")
    return CniConfig(name_prefix="husk-test-0", root=tmp_path / "cni", networks=networks or (DEFAULT_NETWORK,),
                     plugin_dir=plugins)


def test_default_network_is_the_one_the_harness_always_had(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    conf: Any = cfg.network_list(0)
    bridge, portmap, record = conf["plugins"]
    assert (bridge["bridge"], bridge["ipam"]["ranges"]) == ("husk-br0", [[{"subnet": "10.88.0.0/16"}]])
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    assert record == {"type": RECORD_PLUGIN, "recordDir": str(cfg.del_records_dir)}
    assert ContainerdOptions().networks == (DEFAULT_NETWORK,)
    assert DEFAULT_NETWORK.gateway == "10.88.0.1"


def test_dual_stack_primary_and_a_secondary_network(tmp_path: Path) -> None:
    cfg = _config(tmp_path, DUAL, SECOND)
    primary: Any = cfg.network_list(0)
    secondary: Any = cfg.network_list(1)
    ipam = primary["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd00:88::/64"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert (primary["name"], secondary["name"]) == ("husk-test-0-a", "husk-test-0-b")
    # No default routes and no hostPorts on the second network; the recorder is last everywhere.
    assert [p["type"] for p in secondary["plugins"]] == ["bridge", RECORD_PLUGIN]
    assert secondary["plugins"][0]["ipam"]["routes"] == []
    assert (DUAL.gateway, DUAL.gateway6, SECOND.gateway6) == ("10.88.0.1", "fd00:88::1", None)


def test_write_fills_the_bin_dir_and_one_conflist_per_network_in_order(tmp_path: Path) -> None:
    cfg = _config(tmp_path, CniNetwork("zzz", "br-z", "10.1.0.0/24"), CniNetwork("aaa", "br-a", "10.2.0.0/24"))
    paths = cfg.write()
    assert sorted(paths) == paths, "containerd takes the first file name as eth0"
    assert [json.loads(p.read_text())["name"] for p in paths] == ["husk-test-0-zzz", "husk-test-0-aaa"]
    assert (cfg.bin_dir / "tuning").resolve() == cfg.plugin_dir / "tuning"
    assert os.access(cfg.bin_dir / RECORD_PLUGIN, os.X_OK)
    assert (cfg.bin_dir / RECORD_PLUGIN).read_bytes() == RECORD_PLUGIN_SOURCE.read_bytes()
    wrapper = (cfg.bin_dir / "portmap").read_text()
    assert str(cfg.lock_path) in wrapper and str(cfg.plugin_dir / "portmap") in wrapper
    config = render_config(tmp_path, ContainerdOptions(), cfg)
    assert f'bin_dir = "{cfg.bin_dir}"' in config and "max_conf_num = 2" in config


@pytest.mark.parametrize("bad", [
    dict(name="a", bridge="x" * 16, subnet="10.0.0.0/8"),
    dict(name="a", bridge="br", subnet="fd00::/64"),
    dict(name="a", bridge="br", subnet="10.0.0.0/8", subnet6="10.1.0.0/16"),
    dict(name="Bad_Name", bridge="br", subnet="10.0.0.0/8"),
])
def test_network_descriptions_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CniNetwork(**bad)


def test_networks_must_not_share_a_bridge(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bridge"):
        _config(tmp_path, DUAL, CniNetwork("b", "husk-br0", "10.89.0.0/16"))


def test_allocations_read_host_locals_files(tmp_path: Path) -> None:
    cfg = _config(tmp_path, DUAL, SECOND)
    a = cfg.ipam_dir / "husk-test-0-a"
    b = cfg.ipam_dir / "husk-test-0-b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "lock").write_text("")
        (d / "last_reserved_ip.0").write_text("10.88.0.2")
    (a / "10.88.0.2").write_text(f"{POD_ID}\r\neth0")
    (a / "fd00:88::2").write_text(f"{POD_ID}\r\neth0")
    (b / "10.89.0.7").write_text("other\r\neth1")
    assert cfg.allocations() == {"10.88.0.2": POD_ID, "fd00:88::2": POD_ID, "10.89.0.7": "other"}
    assert cfg.allocations("b") == {"10.89.0.7": "other"}
    with pytest.raises(KeyError):
        cfg.allocations("nope")


def _plugin(command: str, conf: dict[str, Any] | str, **env: str) -> subprocess.CompletedProcess[str]:
    stdin = conf if isinstance(conf, str) else json.dumps(conf)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": POD_ID, "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent", **env}
    return subprocess.run([sys.executable, str(RECORD_PLUGIN_SOURCE)], input=stdin, capture_output=True,
                          text=True, env=full_env, timeout=60, check=False)


PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.88.0.2/16", "interface": 0}]}


def test_record_plugin_passes_add_through_and_answers_version_and_check(tmp_path: Path) -> None:
    conf = {"cniVersion": "0.4.0", "name": "n", "type": RECORD_PLUGIN, "prevResult": PREV}
    add = _plugin("ADD", conf)
    assert add.returncode == 0, add.stdout + add.stderr
    assert json.loads(add.stdout) == {**PREV, "cniVersion": "0.4.0"}
    version = _plugin("VERSION", {"cniVersion": "1.0.0"})
    assert json.loads(version.stdout)["supportedVersions"][-1] == "1.0.0"
    assert (_plugin("CHECK", conf).returncode, _plugin("CHECK", conf).stdout) == (0, "")
    unchained = _plugin("ADD", {"cniVersion": "1.0.0", "name": "n"})
    assert unchained.returncode == 1 and json.loads(unchained.stdout)["code"] == 7
    too_new = _plugin("ADD", {**conf, "cniVersion": "9.9.9"})
    assert too_new.returncode == 1 and json.loads(too_new.stdout)["code"] == 1


def test_record_plugin_del_without_netns_records_that_and_succeeds_quietly(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    conf = {"cniVersion": "1.0.0", "name": "n", "type": RECORD_PLUGIN, "recordDir": str(cfg.del_records_dir)}
    for netns in ("", str(tmp_path / "gone")):
        result = _plugin("DEL", conf, CNI_NETNS=netns)
        assert (result.returncode, result.stdout) == (0, ""), result.stderr
    # Garbage in still means DEL succeeds (and says why on stderr).
    broken = _plugin("DEL", "{not json", CNI_NETNS="")
    assert (broken.returncode, broken.stdout) == (0, "") and "recordDir" in broken.stderr
    records = cfg.del_records(POD_ID)
    assert [(r["attempt"], r["netns_present"], r["netns"]) for r in records] == \
        [(1, False, ""), (2, False, str(tmp_path / "gone"))]
    assert sorted(p.name for p in cfg.del_records_dir.iterdir()) == [f"{POD_ID}-eth0.2.json", f"{POD_ID}-eth0.json"]
    assert "gone" in records[1]["errors"][0]


@needs_root
def test_record_plugin_snapshots_a_live_netns(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    conf = {"cniVersion": "1.0.0", "name": "n", "type": RECORD_PLUGIN, "recordDir": str(cfg.del_records_dir)}
    # Our own netns: read-only commands, and it surely has a loopback.
    result = _plugin("DEL", conf, CNI_NETNS="/proc/self/ns/net", CNI_IFNAME="lo")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    (record,) = cfg.del_records(POD_ID)
    assert record["netns_present"] and "lo" in {link["ifname"] for link in record["links"]}
    assert isinstance(record["qdiscs"], list) and isinstance(record["ingress_filters"], list)


def test_port_mappings_become_cri_port_mappings() -> None:
    assert _port_mapping((80, 8080, "tcp")) == api.PortMapping(protocol=api.Protocol.TCP, container_port=80,
                                                               host_port=8080)
    assert _port_mapping((53, 0, "UDP")).protocol == api.Protocol.UDP
    with pytest.raises(ValueError, match="protocol"):
        _port_mapping((80, 80, "ICMP"))


def test_find_crictl_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "crictl"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv(crictl.CRICTL_ENV, str(fake))
    assert crictl.find_crictl() is None, "not executable"
    fake.chmod(0o755)
    assert crictl.find_crictl() == fake
    monkeypatch.setenv(crictl.CRICTL_ENV, str(tmp_path / "missing"))
    assert crictl.find_crictl() is None
    assert str(crictl.DEFAULT_CRICTL) in crictl.CRICTL_MISSING


@needs_root
def test_in_netns_leaves_the_calling_thread_where_it_was() -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    sock = in_netns(Path("/proc/self/ns/net"), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.close()
    assert os.readlink("/proc/thread-self/ns/net") == before
    with pytest.raises(FileNotFoundError):
        in_netns(Path("/run/netns/husk-no-such-netns"), lambda: None)
