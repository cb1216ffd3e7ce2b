"""Direct-volume records (Kata's format) and the PVC annotation path that writes them."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shim.storage.directvolume import (MOUNT_INFO, DirectVolumes, MountInfo, VolumeRecordError,
                                       lvm_device, resolve_device)
from shim.storage.publish import CephAccess, ceph_monitors, decide

TARGET = "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount"


def test_records_are_where_and_what_kata_writes(tmp_path: Path) -> None:
    volumes = DirectVolumes(tmp_path / "dv")
    info = MountInfo("block", "/dev/rbd0", "ext4", {"createFilesystem": "true"}, ("noatime",))
    path = volumes.add(TARGET, info)
    # Kata: filepath.Join(root, b64.URLEncoding.EncodeToString([]byte(volumePath)), "mountInfo.json")
    assert path == tmp_path / "dv" / base64.urlsafe_b64encode(TARGET.encode()).decode() / MOUNT_INFO
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"volume-type": "block", "device": "/dev/rbd0",
                                            "fstype": "ext4", "metadata": {"createFilesystem": "true"},
                                            "options": ["noatime"]}
    assert volumes.get(TARGET) == info and info.create_filesystem
    assert volumes.get("/not/a/direct/volume") is None
    volumes.remove(TARGET)
    assert volumes.get(TARGET) is None and not path.parent.exists()


def test_a_record_written_by_kata_is_read() -> None:
    kata = ('{"volume-type":"block","device":"/dev/sdb","fstype":"xfs",'
            '"metadata":{"fsGroup":"2000"},"options":["rw"]}')
    assert MountInfo.from_json(kata) == MountInfo("block", "/dev/sdb", "xfs", {"fsGroup": "2000"},
                                                 ("rw",))


@pytest.mark.parametrize("bad, reason", [
    ('{"volume-type":"directvol","device":"/dev/sdb"}', "volume-type"),
    ('{"volume-type":"block","device":"sdb"}', "absolute"),
    ('{"volume-type":"rbd","metadata":{"pool":"rbd","image":"i","userKey":"AQD..."}}', "secret"),
    ('{"volume-type":"rbd","metadata":{"pool":"rbd"}}', "image"),
    ('{"volume-type":"lvm","metadata":{"vg":"vg0","lv":"../x"}}', "lv"),
    ('{"volume-type":"block","device":"/dev/sdb","fstype":"ext4,rw"}', "fstype"),
    ('{"volume-type":"block","device":"/dev/sdb","options":["rw,exec"]}', "options"),
    ('["block"]', "object"),
])
def test_bad_records_are_refused_with_the_reason(bad: str, reason: str) -> None:
    with pytest.raises(VolumeRecordError, match=reason):
        MountInfo.from_json(bad)


def test_one_pod_per_volume(tmp_path: Path) -> None:
    volumes = DirectVolumes(tmp_path)
    volumes.add(TARGET, MountInfo("block", "/dev/loop7"))
    volumes.claim(TARGET, "sandbox-a")
    volumes.claim(TARGET, "sandbox-a")  # the same pod again (a second container)
    with pytest.raises(VolumeRecordError, match="sandbox-a"):
        volumes.claim(TARGET, "sandbox-b")
    volumes.release(TARGET, "sandbox-a")
    volumes.claim(TARGET, "sandbox-b")
    assert volumes.user(TARGET) == "sandbox-b"
    with pytest.raises(VolumeRecordError, match="no direct-volume record"):
        volumes.claim("/other", "sandbox-b")


def test_lvm_names_map_to_device_mappers_node(tmp_path: Path) -> None:
    assert lvm_device("vg-data", "pvc-1a2b") == Path("/dev/mapper/vg--data-pvc--1a2b")
    with pytest.raises(VolumeRecordError):
        lvm_device("vg", "../../etc")
    # Resolution needs a block device at that node: a regular file is refused.
    (tmp_path / "mapper").mkdir()
    (tmp_path / "mapper" / "vg-lv").write_text("")
    with pytest.raises(VolumeRecordError, match="not a block device"):
        resolve_device(MountInfo("lvm", metadata={"vg": "vg", "lv": "lv"}), tmp_path)
    with pytest.raises(VolumeRecordError, match="No such file"):
        resolve_device(MountInfo("lvm", metadata={"vg": "vg", "lv": "nope"}), tmp_path)


def test_a_loop_device_resolves_as_block(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        assert resolve_device(MountInfo("block", loop)) == Path(loop)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


# Section: the annotation path

ANNOTATION = "volume.katacontainers.io/direct-mode"


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "client.qemu.key"
    path.write_text("AQBmZXN0a2V5IGZvciBodXNrIHRlc3Rz\n")
    path.chmod(0o600)
    return str(path)


def test_each_annotation_value_leads_to_its_record(tmp_path: Path, key_file: str) -> None:
    ctx = {"pool": "rbd", "imageName": "csi-vol-1", "clusterID": "c1"}
    ceph = CephAccess("qemu", key_file, ("10.0.0.1:3300",))
    block = decide({ANNOTATION: "block"}, {}, "pvc-1", device="/dev/rbd3", fstype="ext4")
    assert block == MountInfo("block", "/dev/rbd3", "ext4", {"volumeId": "pvc-1"})
    lvm = decide({ANNOTATION: "block"}, {"openebs.io/volgroup": "lvmvg"}, "pvc-2", fstype="xfs")
    assert lvm is not None and lvm.volume_type == "lvm"
    assert (lvm.metadata["vg"], lvm.metadata["lv"]) == ("lvmvg", "pvc-2")
    rbd = decide({ANNOTATION: "rbd"}, ctx, "pvc-3", fstype="ext4", ceph=ceph)
    assert rbd is not None and rbd.volume_type == "rbd" and rbd.device == "rbd/csi-vol-1"
    assert rbd.metadata["monitors"] == "10.0.0.1:3300" and rbd.metadata["keyFile"] == key_file
    assert "AQB" not in rbd.to_json(), "the key itself went into the record"
    for annotations in ({}, {ANNOTATION: ""}, {ANNOTATION: "virtio-fs"}, {ANNOTATION: "BLOCK"}):
        assert decide(annotations, ctx, "pvc-4", device="/dev/rbd3", ceph=ceph) is None


def test_direct_mode_without_what_it_needs_is_an_error(tmp_path: Path, key_file: str) -> None:
    with pytest.raises(VolumeRecordError, match="block device"):
        decide({ANNOTATION: "block"}, {}, "pvc-1")
    with pytest.raises(VolumeRecordError, match="key file"):
        decide({ANNOTATION: "rbd"}, {"pool": "p", "imageName": "i"}, "v")
    os.chmod(key_file, 0o644)
    with pytest.raises(VolumeRecordError, match="0600"):
        decide({ANNOTATION: "rbd"}, {"pool": "p", "imageName": "i"}, "v",
               ceph=CephAccess("qemu", key_file, ("m:1",)))


def test_monitors_come_from_ceph_csi_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps([{"clusterID": "c1", "monitors": ["10.1.1.1:6789", "10.1.1.2:6789"]}]))
    assert ceph_monitors("c1", config) == ("10.1.1.1:6789", "10.1.1.2:6789")
    with pytest.raises(VolumeRecordError, match="c2"):
        ceph_monitors("c2", config)


def test_publish_cli_writes_a_record_or_none(tmp_path: Path) -> None:
    config = tmp_path / "husk.toml"
    config.write_text(f'[storage]\ndirect_volumes_dir = "{tmp_path / "dv"}"\n')

    def husk(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(config),
                               "direct-volume", *args], capture_output=True, text=True)

    done = husk("publish", "--volume-path", TARGET, "--volume-id", "pvc-1", "--annotations",
                json.dumps({ANNOTATION: "block"}), "--device", "/dev/rbd0", "--fstype", "ext4")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["direct"] is True
    assert DirectVolumes(tmp_path / "dv").get(TARGET) is not None
    done = husk("publish", "--volume-path", TARGET, "--annotations", "{}")
    assert json.loads(done.stdout) == {"direct": False, "volume-type": "", "record": ""}
    assert DirectVolumes(tmp_path / "dv").get(TARGET) is None
    bad = husk("add", "--volume-path", TARGET, "--mount-info", '{"volume-type":"nfs"}')
    assert bad.returncode == 1 and "volume-type" in bad.stderr


@pytest.mark.parametrize("monitors, servers", [
    ("10.0.0.1:3300,10.0.0.2:6789", [("10.0.0.1", "3300"), ("10.0.0.2", "6789")]),
    ("[fd00::1]:6789", [("fd00::1", "6789")]),
    ("v2:10.0.0.1:3300/0", [("10.0.0.1", "3300")]),
    # `ceph mon dump`'s address vectors: the first address of each monitor.
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0],[v2:10.0.0.2:3300/0,v1:10.0.0.2:6789/0]",
     [("10.0.0.1", "3300"), ("10.0.0.2", "3300")]),
    ("[v2:[fd00::1]:3300/0,v1:[fd00::1]:6789/0]", [("fd00::1", "3300")]),
    ("mon.example", [("mon.example", "3300")]),
])
def test_monitor_addresses_in_every_form_ceph_writes(monitors: str,
                                                     servers: list[tuple[str, str]]) -> None:
    from shim.storage.blockvolume import _servers
    assert [(s["host"], s["port"]) for s in _servers(monitors)] == servers
