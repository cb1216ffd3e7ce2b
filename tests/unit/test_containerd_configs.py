"""containerd configs: the snippets in configs/ for 1.6/1.7 (version 2) and 2.x (version 3),
and the CRI harness's two renderings of one instance."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.cri.cni import REQUIRED_PLUGINS, CniConfig
from tests.cri.harness import (ContainerdOptions, containerd_version, find_containerd2, render_config,
                               render_config_v3)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V2_RUNTIMES = ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")
V3_RUNTIMES = ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes")


def _table(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        doc = doc[key]
    return doc


def test_the_v3_snippet_registers_husk_as_the_v2_one_does() -> None:
    v2 = tomllib.loads((CONFIGS / "containerd-husk.toml").read_text())
    v3 = tomllib.loads((CONFIGS / "containerd2-husk.toml").read_text())
    assert (v2["version"], v3["version"]) == (2, 3)
    husk2 = _table(v2, (*V2_RUNTIMES, "husk"))
    husk3 = _table(v3, (*V3_RUNTIMES, "husk"))
    # containerd runs the pause task through the shim's Task API, as 1.6 does.
    assert husk3.pop("sandboxer") == "podsandbox"
    assert husk3 == husk2


def _cni(tmp_path: Path) -> CniConfig:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in REQUIRED_PLUGINS:
        (plugins / name).write_text("#!/bin/sh\n")
    cni = CniConfig(name_prefix="husk-test-0", root=tmp_path / "cni", plugin_dir=plugins)
    cni.write()
    return cni


def test_the_harness_renders_one_instance_in_both_versions(tmp_path: Path) -> None:
    opts = ContainerdOptions(husk_config=tmp_path / "husk.toml")
    cni = _cni(tmp_path)
    v2 = tomllib.loads(render_config(tmp_path, opts, cni))
    v3 = tomllib.loads(render_config_v3(tmp_path, opts, cni))
    for doc in (v2, v3):
        assert doc["state"] == str(tmp_path / "state")
        assert doc["grpc"]["address"] == str(tmp_path / "containerd.sock")
    runtimes2, runtimes3 = _table(v2, V2_RUNTIMES), _table(v3, V3_RUNTIMES)
    assert set(runtimes3) == set(runtimes2) == {"runc", "husk"}
    for name, handler in runtimes3.items():
        assert handler.pop("sandboxer") == "podsandbox"
        assert handler == runtimes2[name]
    assert runtimes3["husk"]["options"] == {"ConfigPath": str(tmp_path / "husk.toml")}
    images = v3["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == v2["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"]
    cni3 = v3["plugins"]["io.containerd.cri.v1.runtime"]["cni"]
    assert cni3["bin_dirs"] == [str(cni.bin_dir)] and cni3["conf_dir"] == str(cni.conf_dir)
    # NRI (on by default in 2.x) would serve a socket of the host's.
    assert "io.containerd.nri.v1.nri" in v3["disabled_plugins"]


def test_containerd_version_reads_both_builds(tmp_path: Path) -> None:
    fake = tmp_path / "containerd"
    fake.write_text('#!/bin/sh\necho "containerd github.com/containerd/containerd/v2 v2.3.4 "\n')
    fake.chmod(0o755)
    assert containerd_version(str(fake)) == (2, 3, 4)
    fake.write_text('#!/bin/sh\necho "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1"\n')
    assert containerd_version(str(fake)) == (1, 6, 20)


def test_find_containerd2_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINERD2_DIR", str(tmp_path))
    assert find_containerd2() is None
    (tmp_path / "containerd").write_text("#!/bin/sh\n")
    (tmp_path / "containerd").chmod(0o755)
    assert find_containerd2() == tmp_path
