"""The test harness's idea of which containerd instances are stale, and of a process
being gone: both decide whether it tears down a containerd another test still uses."""
from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest

from tests.cri import harness


def _record(owner_pid: int, create_time: float, start_ticks: int) -> harness.InstanceRecord:
    return harness.InstanceRecord(root="/nonexistent", netns="n", address="a", cgroup_parent="/c",
                                  network_name="n", owner_pid=owner_pid,
                                  owner_create_time=create_time, owner_start_ticks=start_ticks)


def test_start_ticks_are_the_kernels_start_time_of_the_process() -> None:
    me = psutil.Process()
    ticks = harness._start_ticks(me.pid)
    assert ticks > 0
    assert abs(ticks / os.sysconf("SC_CLK_TCK") - me._proc.create_time(monotonic=True)) < 0.02


def test_an_owner_outlives_a_step_of_the_wall_clock() -> None:
    """The CI failure: the wall clock stepped 16 s, so psutil's create_time() of a live
    worker no longer matched its record and another worker swept its containerd."""
    me = psutil.Process()
    stepped = _record(me.pid, me.create_time() - 16, harness._start_ticks(me.pid))
    assert harness._owner_alive(stepped)


def test_an_owner_that_exited_or_whose_pid_was_reused_is_gone() -> None:
    proc = subprocess.Popen(["true"])
    ticks = harness._start_ticks(proc.pid)
    proc.wait()
    assert not harness._owner_alive(_record(proc.pid, 0.0, ticks))
    me = psutil.Process()
    assert not harness._owner_alive(_record(me.pid, me.create_time(), harness._start_ticks(me.pid) - 1))


def test_records_of_older_harnesses_still_compare_create_times() -> None:
    me = psutil.Process()
    assert harness._owner_alive(_record(me.pid, me.create_time(), 0))
    assert not harness._owner_alive(_record(me.pid, me.create_time() - 16, 0))


def test_a_zombie_is_gone_without_being_reaped() -> None:
    """A process that is not our child stays a zombie until its own parent reaps it;
    waiting for it to vanish would wait out the timeout."""
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "`true` did not exit"
            time.sleep(0.01)
        harness._wait_gone(psutil.Process(proc.pid), timeout=1.0)
        assert os.waitpid(proc.pid, os.WNOHANG)[0] == proc.pid, "the zombie was reaped"
    finally:
        proc.returncode = 0


def test_waiting_for_a_live_process_times_out() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(psutil.TimeoutExpired):
            harness._wait_gone(psutil.Process(proc.pid), timeout=0.2)
    finally:
        proc.kill()
        proc.wait()
