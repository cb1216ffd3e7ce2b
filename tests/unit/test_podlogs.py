"""Pruning /var/log/husk: old logs of exited shims go, a live shim's log never does."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shim.util import podlogs

DAY = podlogs.SECONDS_PER_DAY


def _log(directory: Path, name: str, age_days: float, now: float) -> Path:
    path = directory / name
    path.write_text("a shim's lines\n")
    os.utime(path, (now - age_days * DAY, now - age_days * DAY))
    return path


# A live shim: holds its log for as long as it runs (until its stdin closes).
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from shim.util import podlogs
    podlogs.hold(Path(sys.argv[1]))
    print("held", flush=True)
    sys.stdin.read()
""")


def test_old_logs_of_exited_shims_go_and_a_live_shims_stays(tmp_path: Path) -> None:
    now = time.time()
    old = _log(tmp_path, "old.log", 8, now)
    young = _log(tmp_path, "young.log", 1, now)
    live = _log(tmp_path, "live.log", 30, now)  # an idle pod's shim writes rarely
    zygote = _log(tmp_path, "zygote.log", 30, now)
    other = _log(tmp_path, "notes.txt", 30, now)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = podlogs.prune(tmp_path, 7, keep_names=frozenset({"zygote.log"}), now=now)
        assert result is not None
        assert result.removed == ["old.log"] and result.in_use == 1
        assert not old.exists()
        assert young.exists() and live.exists() and zygote.exists() and other.exists()
    finally:
        holder.communicate("", timeout=30)
    # The shim has exited, its lock with it: the next pruning takes the file.
    os.utime(tmp_path / podlogs.PRUNE_STAMP, (now - 2 * podlogs.PRUNE_INTERVAL_S,) * 2)
    result = podlogs.prune(tmp_path, 7, now=now)
    assert result is not None and "live.log" in result.removed and not live.exists()


def test_pruning_runs_once_per_interval(tmp_path: Path) -> None:
    now = time.time()
    _log(tmp_path, "a.log", 10, now)
    assert podlogs.prune(tmp_path, 7, now=now) is not None
    late = _log(tmp_path, "b.log", 10, now)
    assert podlogs.prune(tmp_path, 7, now=now + 60) is None, "ran again within the interval"
    assert late.exists()
    result = podlogs.prune(tmp_path, 7, now=now + podlogs.PRUNE_INTERVAL_S + 1)
    assert result is not None and result.removed == ["b.log"]


def test_beyond_the_count_the_oldest_go(tmp_path: Path) -> None:
    now = time.time()
    for i in range(5):
        _log(tmp_path, f"{i}.log", i / 10, now)  # 0.log is the newest
    result = podlogs.prune(tmp_path, 0, now=now, keep_max=3)  # 0 days: by count only
    assert result is not None
    assert sorted(result.removed) == ["3.log", "4.log"]
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["0.log", "1.log", "2.log"]


def test_a_symlink_named_like_a_log_is_not_followed(tmp_path: Path) -> None:
    now = time.time()
    target = _log(tmp_path, "target.txt", 30, now)
    (tmp_path / "link.log").symlink_to(target)
    result = podlogs.prune(tmp_path, 7, now=now)
    assert result is not None and result.removed == []
    assert target.exists()
