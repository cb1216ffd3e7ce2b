"""The shim daemon's log file: written only while the shim holds its lock (the
pruner removes unlocked logs of exited shims)."""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import daemon
from shim.util import podlogs


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(daemon, "LOG_DIR", tmp_path / "logs")
    monkeypatch.chdir(tmp_path)  # no containerd log FIFO here
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield tmp_path / "logs"
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def test_the_shim_logs_to_a_file_it_holds(log_dir: Path) -> None:
    path = daemon._setup_logging("pod1", debug=False)
    assert path == log_dir / "pod1.log"
    logging.getLogger("shim").info("hello")
    assert "hello" in path.read_text()
    probe = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # the pruner's test of a live shim's file
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)


def test_a_log_the_shim_cannot_hold_is_not_written(log_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> int:
        raise OSError("lock refused")
    monkeypatch.setattr(podlogs, "hold", refuse)
    assert daemon._setup_logging("pod2", debug=False) is None
    assert _file_handlers() == []
    logging.getLogger("shim").warning("after")
    assert "after" not in (log_dir / "pod2.log").read_text()
