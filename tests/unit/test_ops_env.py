"""``husk env``: its TOML parses back to what was gathered; nothing secret is printed."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shim import __version__
from shim.ops import env
from shim.vm.accel import Accel, AccelChoice


@pytest.fixture(autouse=True)
def fake_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    async def choose(mode: str, qemu: str, state_dir: Path) -> AccelChoice:
        return AccelChoice(Accel.TCG, "KVM unusable: test")
    monkeypatch.setattr(env, "choose_accel", choose)


def test_to_toml_round_trips_awkward_values() -> None:
    doc = {"format_version": 1, "a": {"quote": 'say "hi"\\', "newline": "one\ntwo\ttab",
                                      "del": "x\x7fy", "bell": "\x07", "unicode": "ü😀",
                                      "list": ["a", "b"], "empty": [], "yes": True,
                                      "ratio": 0.5, "dotted.key": "v",
                                      "sub": {"deeper": {"n": -3}}}}
    assert tomllib.loads(env.to_toml(doc)) == doc


def test_secret_keys_are_redacted_but_paths_are_not() -> None:
    values = {"ceph_key": "AQB...", "password": "p", "api_token": "t", "key_file": "/etc/k",
              "token_path": "/run/t", "kernel": "/boot/vmlinux", "monkey": "ok"}
    assert env._redact(values) == {"ceph_key": env.REDACTED, "password": env.REDACTED,
                                   "api_token": env.REDACTED, "key_file": "/etc/k",
                                   "token_path": "/run/t", "kernel": "/boot/vmlinux",
                                   "monkey": "ok"}


def test_env_reports_the_config_in_effect(tmp_path: Path) -> None:
    config = tmp_path / "husk.toml"
    config.write_text('[hypervisor]\nvcpus = 2\nqemu_path = "/nowhere/qemu"\n')
    containerd = tmp_path / "containerd.toml"
    containerd.write_text('version = 3\n[plugins."io.containerd.cri.v1.runtime".containerd'
                          '.runtimes.husk]\nruntime_type = "io.containerd.husk.v2"\n'
                          'pod_annotations = ["io.husk.*"]\n'
                          '[plugins."io.containerd.cri.v1.registry".configs."r".auth]\n'
                          'password = "hunter2"\n')
    text = env.render(str(config), containerd)
    assert "hunter2" not in text
    doc = tomllib.loads(text)
    assert doc["format_version"] == env.FORMAT_VERSION
    assert doc["husk"]["version"] == __version__
    assert doc["config"]["file"] == str(config) and doc["config"]["source"] == "--config"
    assert doc["config"]["hypervisor"]["vcpus"] == 2
    assert doc["config"]["hypervisor"]["memory_mib"] == 512  # a default
    assert doc["qemu"]["version"].startswith("unavailable: cannot run /nowhere/qemu")
    assert doc["containerd"]["config_version"] == 3
    assert doc["containerd"]["husk_handlers"] == ["husk"]
    assert doc["containerd"]["pod_annotations"] == ["io.husk.*"]
    assert doc["host"]["accel"] == "tcg" and doc["host"]["accel_reason"] == "KVM unusable: test"


def test_env_with_a_broken_config_says_why(tmp_path: Path) -> None:
    config = tmp_path / "husk.toml"
    config.write_text("[nope]\n")
    doc = tomllib.loads(env.render(str(config), tmp_path / "missing.toml"))
    assert "unknown section [nope]" in doc["config"]["error"]
    assert doc["config"]["hypervisor"]["vcpus"] == 1
    assert "does not exist" in doc["containerd"]["error"]
