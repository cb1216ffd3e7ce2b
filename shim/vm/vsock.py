"""Guest CID allocation through /dev/vhost-vsock.

The kernel owns the CID namespace: VHOST_VSOCK_SET_GUEST_CID fails with
EADDRINUSE when another VM holds the CID, so a random CID is tried until one
sticks. The open fd reserves it and is handed to QEMU (vhostfd=).
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
from dataclasses import dataclass

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
FIRST_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_CID_ANY
CID_ATTEMPTS = 64


class VsockError(Exception):
    """No guest CID could be reserved."""


@dataclass
class VsockCid:
    cid: int
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def vhost_vsock_available() -> bool:
    return os.access(VHOST_VSOCK_DEVICE, os.R_OK | os.W_OK)


def allocate_cid(rng: random.Random | None = None) -> VsockCid:
    """Reserve a free guest CID; the caller passes ``fd`` to QEMU and closes it after.

    :raise VsockError: the device cannot be opened or no CID was free.
    """
    rng = rng or random.SystemRandom()
    try:
        fd = os.open(VHOST_VSOCK_DEVICE, os.O_RDWR)
    except OSError as exc:
        raise VsockError(f"cannot open {VHOST_VSOCK_DEVICE}: {exc.strerror}") from exc
    for _ in range(CID_ATTEMPTS):
        cid = rng.randint(FIRST_GUEST_CID, MAX_GUEST_CID)
        try:
            fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            return VsockCid(cid, fd)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                os.close(fd)
                raise VsockError(f"VHOST_VSOCK_SET_GUEST_CID failed: {exc.strerror}") from exc
    os.close(fd)
    raise VsockError(f"no free vsock guest CID after {CID_ATTEMPTS} attempts")
