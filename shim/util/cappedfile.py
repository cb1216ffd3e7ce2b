"""A log file that stops growing at a cap: for what others decide to write
(the guest's console, QEMU's and virtiofsd's own stderr)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# What an operator may want to read after a boot, and all /run has to spare per stream.
FILE_CAP_BYTES = 1024 * 1024
# Room kept inside the cap for the two notice lines, so the file never exceeds it.
NOTICE_RESERVE_BYTES = 256


@dataclass
class CappedFile:
    """A log file that stops growing at ``cap`` bytes, notices included.

    :raise OSError: from open and write (the caller decides to carry on without it).
    """

    path: Path
    name: str
    cap: int = FILE_CAP_BYTES
    written: int = 0
    dropped: int = 0
    _fd: int = -1

    def __post_init__(self) -> None:
        if self.cap <= NOTICE_RESERVE_BYTES:
            raise ValueError(f"a log file cap of {self.cap} bytes leaves no room for data")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        room = max(0, self.cap - NOTICE_RESERVE_BYTES - self.written)
        if room:
            self._write_all(data[:room])
        if len(data) > room:
            if self.dropped == 0:
                self._notice(f"\n[husk: the {self.name} log reached {self.written} bytes; "
                             "further output is dropped]\n")
            self.dropped += len(data) - room

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.dropped:
                self._notice(f"[husk: dropped {self.dropped} bytes of {self.name} output]\n")
        finally:
            os.close(self._fd)
            self._fd = -1

    def _notice(self, text: str) -> None:
        self._write_all(text.encode()[:self.cap - self.written])

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.written += n
