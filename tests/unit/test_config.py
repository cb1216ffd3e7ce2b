"""Config parsing and the pod-annotation allowlist."""
from __future__ import annotations

from pathlib import Path

import pytest

from shim.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_documents_every_key() -> None:
    text = (REPO / "configs" / "husk.toml").read_text()
    config = load_config(str(REPO / "configs" / "husk.toml"))
    assert config.hypervisor.accel == "auto"
    for section in ("hypervisor", "shared_fs", "agent", "runtime"):
        for key in getattr(config, section).__dataclass_fields__:
            assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} undocumented"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'vcpu'"):
        parse_config({"hypervisor": {"vcpu": 2}})


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="memory_mib: expected int"):
        parse_config({"hypervisor": {"memory_mib": "512"}})


def test_bad_choice_is_rejected() -> None:
    with pytest.raises(ConfigError, match="accel"):
        parse_config({"hypervisor": {"accel": "hvf"}})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("host_cpus,expected", [(2, 2), (1, 1), (64, 8), (None, 1)])
def test_max_vcpus_zero_is_the_hosts_cpus_at_most_eight(
        monkeypatch: pytest.MonkeyPatch, host_cpus: int | None, expected: int) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: host_cpus)
    assert Config().hypervisor.max_vcpus == expected
    assert parse_config({"hypervisor": {"max_vcpus": 0}}).hypervisor.max_vcpus == expected
    # An explicit maximum is kept, above the host's CPUs too (TCG runs them as threads).
    assert parse_config({"hypervisor": {"max_vcpus": 12}}).hypervisor.max_vcpus == 12


def test_annotations_override_within_limits() -> None:
    config = parse_config({"hypervisor": {"max_vcpus": 8}}).with_pod_annotations({
        "io.husk.vcpus": "2", "io.husk.memory_mib": "1024", "io.kubernetes.cri.sandbox-id": "x"})
    assert config.hypervisor.vcpus == 2
    assert config.hypervisor.memory_mib == 1024


@pytest.mark.parametrize("key,value,message", [
    ("io.husk.vcpus", "999", "outside"),
    ("io.husk.vcpus", "2,id=x", "decimal integer"),
    ("io.husk.memory_mib", "-5", "decimal integer"),
    ("io.husk.memory_mib", "64", "outside"),
    ("io.husk.kernel_params", "init=/bin/sh", "not supported"),
    ("io.husk.vcpus", "\u00b2", "decimal integer"),  # a digit to str.isdigit()
    ("io.husk.vcpus", "\u0661", "decimal integer"),  # ARABIC-INDIC DIGIT ONE
    ("io.husk.memory_mib", "9" * 5000, "decimal integer"),
])
def test_hostile_annotations_are_rejected(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config().with_pod_annotations({key: value})


def test_tcg_buffer_is_auto_or_at_least_the_minimum() -> None:
    assert Config().hypervisor.tcg_buffer_mib == 0
    assert parse_config({"hypervisor": {"tcg_buffer_mib": 32}}).hypervisor.tcg_buffer_mib == 32
    with pytest.raises(ConfigError, match="tcg_buffer_mib: 8 is too small"):
        parse_config({"hypervisor": {"tcg_buffer_mib": 8}})
    with pytest.raises(ConfigError, match="tcg_buffer_mib: -1 is outside"):
        parse_config({"hypervisor": {"tcg_buffer_mib": -1}})
