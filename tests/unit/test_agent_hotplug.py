"""The agent brings hot-plugged vCPUs and memory online, on a sysfs tree laid out as Linux's."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.errors import DeadlineError, InvalidArgumentError
from agent.hotplug import Hotplug


def _sysfs(root: Path, cpus: dict[int, str | None], blocks: dict[int, str]) -> Path:
    """cpus: number -> its online file's content (None: no file, as cpu0); blocks: state."""
    cpu_root = root / "devices" / "system" / "cpu"
    for number, online in cpus.items():
        (cpu_root / f"cpu{number}").mkdir(parents=True)
        if online is not None:
            (cpu_root / f"cpu{number}" / "online").write_text(online + "\n")
    (cpu_root / "possible").write_text("0-7\n")  # not a CPU directory
    memory = root / "devices" / "system" / "memory"
    memory.mkdir(parents=True)
    (memory / "block_size_bytes").write_text("8000000\n")  # 128 MiB, in hex as Linux writes it
    for number, state in blocks.items():
        (memory / f"memory{number}").mkdir()
        (memory / f"memory{number}" / "state").write_text(state + "\n")
    return root


def _online(root: Path, cpu: int) -> str:
    return (root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "online").read_text().strip()


def test_new_cpus_and_memory_come_online(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, {0: None, 1: "1", 2: "0", 3: "0"}, {0: "online", 1: "offline"})
    now = asyncio.run(Hotplug(root).settle(3, 256 << 20))
    assert (now.online_vcpus, now.memory_bytes) == (3, 256 << 20)
    assert [_online(root, n) for n in (1, 2, 3)] == ["1", "1", "0"]
    state = root / "devices" / "system" / "memory" / "memory1" / "state"
    assert state.read_text() == "online_movable", "hot-plugged memory must stay unpluggable"


def test_cpus_above_the_wanted_count_go_offline_for_their_unplug(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, {0: None, 1: "1", 2: "1"}, {0: "online"})
    assert asyncio.run(Hotplug(root).settle(1, 0)).online_vcpus == 1
    assert [_online(root, n) for n in (1, 2)] == ["0", "0"]


def test_cpus_that_never_appear_are_a_deadline_error(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, {0: None, 1: "1"}, {0: "online"})
    with pytest.raises(DeadlineError, match="2 CPUs present"):
        asyncio.run(Hotplug(root).settle(4, 0, timeout_s=0.2))


@pytest.mark.parametrize("vcpus", [0, 5000])
def test_impossible_counts_are_refused(tmp_path: Path, vcpus: int) -> None:
    root = _sysfs(tmp_path, {0: None}, {0: "online"})
    with pytest.raises(InvalidArgumentError):
        asyncio.run(Hotplug(root).settle(vcpus, 0))
