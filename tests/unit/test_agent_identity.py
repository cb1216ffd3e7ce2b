"""The guest's identity from the host: entropy mixed in and reseeded, the clock set."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent import identity
from agent.errors import GuestError, InvalidArgumentError


@pytest.mark.skipif(os.geteuid() != 0, reason="reseeding the kernel's CRNG needs root")
def test_entropy_reaches_the_kernel_and_reseeds_it() -> None:
    identity.mix_in_entropy(os.urandom(64))  # raises if the write or RNDRESEEDCRNG fails


def test_a_seed_is_bounded_and_a_device_that_refuses_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="at most"):
        identity.mix_in_entropy(b"x" * (identity.MAX_SEED_BYTES + 1))
    not_a_random_device = tmp_path / "urandom"
    not_a_random_device.write_bytes(b"")
    with pytest.raises(GuestError, match="cannot reseed"):
        identity.mix_in_entropy(b"seed", str(not_a_random_device))


def test_the_clock_is_set_only_when_it_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[int] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda clock, ns: set_to.append(ns))
    assert abs(identity.set_clock(time.time_ns())) < identity.CLOCK_SLACK_S
    assert set_to == []
    # A guest restored from a template an hour after it was saved.
    host = time.time_ns() + 3600 * 10**9
    assert identity.set_clock(host) == pytest.approx(3600, abs=1)
    assert set_to == [host]


def test_a_clock_the_kernel_will_not_set_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(clock: int, ns: int) -> None:
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(time, "clock_settime_ns", refuse)
    with pytest.raises(GuestError, match="cannot set the clock"):
        identity.set_clock(time.time_ns() - 10**12)
