"""The PVC annotation path: a CSI node plugin asks husk whether to mount a volume or not.

At NodePublishVolume a plugin (ceph-csi, lvm-localpv, any block driver) calls
decide() (or ``husk direct-volume publish``) with the PVC's annotations, the
volume context and what it staged. ``volume.katacontainers.io/direct-mode``:

- ``block``: the staged host block device becomes a ``block`` record; for
  lvm-localpv (whose context names the volume group) an ``lvm`` record;
- ``rbd``: ceph-csi's context (pool, imageName, clusterID) plus the
  cluster's monitors and the user's key file become an ``rbd`` record: the
  image is never mapped on the host;
- anything else, or absent: no record, and the plugin mounts as usual (the
  volume goes through the shared filesystem).
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.storage.directvolume import DirectVolumes, MountInfo, VolumeRecordError

DIRECT_MODE = "volume.katacontainers.io/direct-mode"
LVM_VOLGROUP = "openebs.io/volgroup"  # lvm-localpv's volume context; the LV is the volume id
CEPH_CSI_CONFIG = Path("/etc/ceph-csi-config/config.json")
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class CephAccess:
    """How QEMU reaches the cluster: the user and a root-only file with its cephx key."""

    user: str
    key_file: str
    monitors: tuple[str, ...] = ()


def check_key_file(path: str) -> None:
    """:raise VolumeRecordError: not a regular file that only root can read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise VolumeRecordError(f"key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o077:
        raise VolumeRecordError(f"key file {path} must be a regular file owned by root "
                                "with mode 0600 or 0400")


def ceph_monitors(cluster_id: str, config: Path = CEPH_CSI_CONFIG) -> tuple[str, ...]:
    """The monitors of ``cluster_id`` from ceph-csi's cluster config (its ConfigMap).

    :raise VolumeRecordError: no such cluster, or the file is unreadable.
    """
    try:
        with open(config, "rb") as f:
            clusters = json.loads(f.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError) as exc:
        raise VolumeRecordError(f"cannot read ceph-csi config {config}: {exc}") from exc
    for cluster in clusters if isinstance(clusters, list) else []:
        if isinstance(cluster, dict) and cluster.get("clusterID") == cluster_id:
            monitors = cluster.get("monitors") or []
            if monitors and all(isinstance(m, str) for m in monitors):
                return tuple(monitors)
    raise VolumeRecordError(f"cluster {cluster_id!r} has no monitors in {config}")


def decide(annotations: Mapping[str, str], volume_context: Mapping[str, str], volume_id: str,
           device: str = "", fstype: str = "", options: Sequence[str] = (),
           ceph: CephAccess | None = None) -> MountInfo | None:
    """The record for this volume, or None when it goes through the shared filesystem.

    :raise VolumeRecordError: direct mode asked for, but what it needs is missing.
    """
    mode = annotations.get(DIRECT_MODE, "")
    metadata = {"volumeId": volume_id} if volume_id else {}
    if mode == "block":
        if vg := volume_context.get(LVM_VOLGROUP, ""):
            return MountInfo("lvm", "", fstype, {**metadata, "vg": vg, "lv": volume_id},
                             tuple(options))
        if not device:
            raise VolumeRecordError("direct-mode block needs the volume's host block device")
        return MountInfo("block", device, fstype, metadata, tuple(options))
    if mode == "rbd":
        if ceph is None:
            raise VolumeRecordError("direct-mode rbd needs the Ceph user and key file")
        check_key_file(ceph.key_file)
        monitors = ceph.monitors or ceph_monitors(volume_context.get("clusterID", ""))
        pool, image = volume_context.get("pool", ""), volume_context.get("imageName", "")
        rbd = {**metadata, "pool": pool, "image": image, "monitors": ",".join(monitors),
               "user": ceph.user, "keyFile": ceph.key_file}
        if namespace := volume_context.get("radosNamespace", ""):
            rbd["namespace"] = namespace
        return MountInfo("rbd", f"{pool}/{image}", fstype, rbd, tuple(options))
    return None


def publish(volumes: DirectVolumes, target_path: str, info: MountInfo | None) -> Path | None:
    """Write the record for ``target_path`` (or remove a stale one when there is none)."""
    if info is None:
        volumes.remove(target_path)
        return None
    return volumes.add(target_path, info)
