"""Direct-volume records: which host volume paths a VM gets as a disk, not through the share.

The format is Kata's (so CSI drivers written for Kata's ``direct-volume`` work
unchanged): for a volume path P, ``<root>/<URL-safe padded base64 of P>/``
holds ``mountInfo.json`` with the keys ``volume-type``, ``device``, ``fstype``,
``metadata`` and ``options``, and, while a pod uses the volume, an empty file
named after that pod's sandbox id. husk's volume types:

- ``block``: ``device`` is a host block device (a mapped RBD, any disk);
- ``rbd``: QEMU opens the Ceph image itself; ``metadata`` names pool, image,
  monitors, user and ``keyFile`` (a root-only file holding the cephx key:
  a record never holds a secret, it is persisted in plain text);
- ``lvm``: ``metadata`` names the volume group and logical volume, which
  resolve to a block device.

Records are written by a CSI node plugin (``husk direct-volume add`` or
``publish``) and read by the shim; both run as root. A record's directory is
0700 and its file 0600.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path("/run/husk/direct-volumes")
KATA_ROOT = Path("/run/kata-containers/shared/direct-volumes")
MOUNT_INFO = "mountInfo.json"
VOLUME_TYPES = ("block", "rbd", "lvm")
MAX_RECORD_BYTES = 64 * 1024
MAX_FIELD_CHARS = 4096
MAX_OPTIONS = 64
FSTYPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
# Metadata keys that would hold a secret: refused, the record is plain text on disk.
SECRET_KEYS = frozenset({"key", "secret", "userkey", "adminkey", "encryptionkey", "password"})
SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")


class VolumeRecordError(Exception):
    """A record is malformed, missing, or held by another pod; the message says which."""


@dataclass(frozen=True)
class MountInfo:
    """One record's content (Kata's DiskMountInfo, with husk's volume types)."""

    volume_type: str
    device: str = ""
    fstype: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.volume_type not in VOLUME_TYPES:
            raise VolumeRecordError(f"volume-type {self.volume_type!r} is not one of "
                                    f"{', '.join(VOLUME_TYPES)}")
        if self.fstype and not FSTYPE.fullmatch(self.fstype):
            raise VolumeRecordError(f"fstype {self.fstype[:40]!r} is not a filesystem type")
        if len(self.options) > MAX_OPTIONS or any(
                not o or "," in o or len(o) > MAX_FIELD_CHARS or "\0" in o for o in self.options):
            raise VolumeRecordError("options must be a short list of mount options "
                                    "without commas")
        for key, value in self.metadata.items():
            if key.lower() in SECRET_KEYS:
                raise VolumeRecordError(
                    f"metadata {key!r} would store a secret in the record; name a root-only "
                    "key file with metadata keyFile instead")
            if len(key) > 128 or len(value) > MAX_FIELD_CHARS or "\0" in key + value:
                raise VolumeRecordError(f"metadata {key[:40]!r} is too long or has a NUL")
        if self.volume_type == "block" and not self.device.startswith("/"):
            raise VolumeRecordError("a block volume's device must be an absolute path")
        if self.volume_type == "rbd":
            missing = [k for k in ("pool", "image") if not self.metadata.get(k)]
            if missing:
                raise VolumeRecordError(f"an rbd volume needs metadata {', '.join(missing)}")
        if self.volume_type == "lvm":
            for key in ("vg", "lv"):
                if not LVM_NAME.fullmatch(self.metadata.get(key, "")) or \
                        self.metadata.get(key, "").startswith("-"):
                    raise VolumeRecordError(f"an lvm volume needs a valid metadata {key}")

    @property
    def create_filesystem(self) -> bool:
        return self.metadata.get("createFilesystem", "").lower() in ("true", "1", "yes")

    @classmethod
    def from_json(cls, text: str | bytes) -> MountInfo:
        """:raise VolumeRecordError: not a record husk can use, with the reason."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise VolumeRecordError(f"mount info is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise VolumeRecordError("mount info must be a JSON object")
        metadata = raw.get("metadata") or {}
        options = raw.get("options") or []
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise VolumeRecordError("metadata must map strings to strings")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise VolumeRecordError("options must be a list of strings")
        fields = {k: raw.get(k, "") for k in ("volume-type", "device", "fstype")}
        if not all(isinstance(v, str) and len(v) <= MAX_FIELD_CHARS for v in fields.values()):
            raise VolumeRecordError("volume-type, device and fstype must be short strings")
        return cls(fields["volume-type"], fields["device"], fields["fstype"], dict(metadata),
                   tuple(options))

    def to_json(self) -> str:
        return json.dumps({"volume-type": self.volume_type, "device": self.device,
                           "fstype": self.fstype, "metadata": dict(self.metadata),
                           "options": list(self.options)}, indent=2)


def encode_volume_path(volume_path: str) -> str:
    """The record directory's name: Kata's base64.URLEncoding (padded) of the path."""
    return base64.urlsafe_b64encode(volume_path.encode()).decode()


@dataclass(frozen=True)
class DirectVolumes:
    """The records under one root directory."""

    root: Path = DEFAULT_ROOT

    def _dir(self, volume_path: str) -> Path:
        if not volume_path.startswith("/") or "\0" in volume_path or \
                len(volume_path) > MAX_FIELD_CHARS:
            raise VolumeRecordError(f"volume path {volume_path[:80]!r} must be absolute")
        return self.root / encode_volume_path(os.path.normpath(volume_path))

    def add(self, volume_path: str, info: MountInfo) -> Path:
        """Write (or replace) the record of ``volume_path``; returns its file."""
        directory = self._dir(volume_path)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        tmp = directory / f".{MOUNT_INFO}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write(info.to_json() + "\n")
        os.replace(tmp, directory / MOUNT_INFO)
        return directory / MOUNT_INFO

    def get(self, volume_path: str) -> MountInfo | None:
        """The record of ``volume_path``, or None if it has none (a shared-fs volume).

        :raise VolumeRecordError: a record exists but is unreadable or malformed.
        """
        path = self._dir(volume_path) / MOUNT_INFO
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VolumeRecordError(f"cannot read {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise VolumeRecordError(f"{path} is not a regular file")
            data = f.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            raise VolumeRecordError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
        try:
            return MountInfo.from_json(data)
        except VolumeRecordError as exc:
            raise VolumeRecordError(f"{path}: {exc}") from exc

    def remove(self, volume_path: str) -> None:
        """Delete the record (Kata's ``remove``: the whole directory)."""
        shutil.rmtree(self._dir(volume_path), ignore_errors=True)

    def user(self, volume_path: str) -> str | None:
        """The sandbox id of the pod using the volume, if any."""
        directory = self._dir(volume_path)
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if entry.name != MOUNT_INFO and SANDBOX_ID.fullmatch(entry.name) \
                        and entry.is_file(follow_symlinks=False):
                    return entry.name
        return None

    def claim(self, volume_path: str, sandbox_id: str) -> None:
        """Mark the volume as used by ``sandbox_id``.

        :raise VolumeRecordError: no record, or another pod uses it.
        """
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise VolumeRecordError(f"invalid sandbox id {sandbox_id[:80]!r}")
        directory = self._dir(volume_path)
        if not (directory / MOUNT_INFO).is_file():
            raise VolumeRecordError(f"volume {volume_path} has no direct-volume record")
        holder = self.user(volume_path)
        if holder is not None and holder != sandbox_id:
            raise VolumeRecordError(f"volume {volume_path} is used by pod sandbox {holder}; "
                                    "a direct volume belongs to one pod at a time")
        fd = os.open(directory / sandbox_id, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def release(self, volume_path: str, sandbox_id: str) -> None:
        with contextlib.suppress(OSError, VolumeRecordError):
            (self._dir(volume_path) / sandbox_id).unlink()


def lvm_device(vg: str, lv: str, dev: Path = Path("/dev")) -> Path:
    """The block device of logical volume ``vg/lv``: device-mapper's node, whose name
    doubles every hyphen of each part (``vg-1``/``lv`` → ``/dev/mapper/vg--1-lv``)."""
    for value, what in ((vg, "volume group"), (lv, "logical volume")):
        if not LVM_NAME.fullmatch(value) or value.startswith("-") or value in (".", ".."):
            raise VolumeRecordError(f"invalid {what} name {value[:80]!r}")
    return dev / "mapper" / f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def resolve_device(info: MountInfo, dev: Path = Path("/dev")) -> Path:
    """The host block device of a block or lvm record.

    :raise VolumeRecordError: missing, or not a block device.
    """
    if info.volume_type == "lvm":
        path = lvm_device(info.metadata["vg"], info.metadata["lv"], dev)
    elif info.volume_type == "block":
        path = Path(info.device)
    else:
        raise VolumeRecordError(f"a {info.volume_type} volume has no host device")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise VolumeRecordError(f"{info.volume_type} volume device {path}: {exc.strerror}") from exc
    if not stat.S_ISBLK(mode):
        raise VolumeRecordError(f"{info.volume_type} volume device {path} is not a block device")
    return path
