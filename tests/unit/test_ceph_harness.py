"""The Ceph test cluster's keys and config (tests/cri/ceph.py), without starting it."""
from __future__ import annotations

import base64
import configparser
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.cri.ceph import (CEPHX_AES, CEPHX_SECRET_BYTES, MON_PORT, RADOS_CLASS_DIR, CephCluster,
                            CephUser, generate_key)


def _conf(tmp_path: Path) -> configparser.ConfigParser:
    cluster = CephCluster(Path("/run/netns/none"), tmp_path)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(cluster._render_conf())
    return parser


def test_generated_keys_are_cephx_aes_keys() -> None:
    raw = base64.b64decode(generate_key())
    kind, _, _, length = struct.unpack("<HIIH", raw[:12])
    assert (kind, length, len(raw)) == (CEPHX_AES, CEPHX_SECRET_BYTES, 12 + CEPHX_SECRET_BYTES)
    assert generate_key() != generate_key()


@pytest.mark.skipif(shutil.which("ceph-authtool") is None, reason="ceph-authtool (ceph-common) "
                    "is not installed")
def test_ceph_reads_the_generated_keyring(tmp_path: Path) -> None:
    user = CephUser("client.qemu", caps={"mon": "profile rbd", "osd": "profile rbd pool=rbd"})
    keyring = tmp_path / "keyring"
    keyring.write_text(user.keyring())
    done = subprocess.run(["ceph-authtool", "-l", str(keyring)], capture_output=True,
                          text=True, check=True, timeout=30)
    assert f"key = {user.key}" in done.stdout and 'caps osd = "profile rbd pool=rbd"' in done.stdout


def test_conf_keeps_per_daemon_settings_out_of_global(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    for option in ("keyring", "admin_socket", "log_file", "pid_file"):
        assert not conf.has_option("global", option), option
    for daemon in ("mon", "osd"):
        assert conf.get(daemon, "admin_socket").startswith(str(tmp_path))
    assert conf.get("osd", "keyring").startswith(str(tmp_path))
    assert conf.get("client", "admin_socket") == ""


def test_conf_has_the_pitfall_settings(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    assert Path(conf.get("osd", "osd_class_dir")) == RADOS_CLASS_DIR and RADOS_CLASS_DIR.is_absolute()
    assert conf.get("osd", "osd_objectstore") == "memstore"
    assert conf.get("osd", "osd_fast_shutdown") == "false"
    assert float(conf.get("global", "paxos_propose_interval")) < 1
    assert conf.get("global", "mon_data_avail_warn") == "1"
    assert f"127.0.0.1:{MON_PORT}" in conf.get("global", "mon_host")
    assert all(conf.get("global", f"auth_{k}_required") == "cephx"
               for k in ("cluster", "service", "client"))


def test_stop_without_start_removes_the_dir(tmp_path: Path) -> None:
    root = tmp_path / "ceph"
    (root / "run").mkdir(parents=True)
    (root / "run" / "mon.a.pid").write_text("1\n")  # not ours: never killed
    cluster = CephCluster(Path("/run/netns/none"), root)
    assert cluster.daemon_pids() == {} and cluster.processes() == []
    cluster.stop()
    assert not root.exists()
