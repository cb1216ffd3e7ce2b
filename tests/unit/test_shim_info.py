"""containerd-shim-husk-v2 -info: containerd 2.x's introspection (shim/info.py)."""
from __future__ import annotations

import subprocess
import sys

from google.protobuf import any_pb2

from proto.gen.containerd.runtimeoptions.v1 import api_pb2 as runtimeoptions
from proto.gen.containerd.types import introspection_pb2
from shim.__main__ import parse_args
from shim import SHIM_VERSION

INFO_TIMEOUT_S = 30.0


def run_info(stdin: bytes, *flags: str) -> subprocess.CompletedProcess[bytes]:
    """The shim binary as containerd 2.x runs it: `<shim> -info`, options on stdin."""
    return subprocess.run([sys.executable, "-m", "shim", *flags, "-info"], input=stdin,
                          capture_output=True, timeout=INFO_TIMEOUT_S, check=False)


def test_info_is_a_flag_that_needs_no_id() -> None:
    args = parse_args(["-info"])
    assert args.info and not args.action and not args.id
    assert parse_args(["-debug", "-info=true"]).info


def test_info_answers_a_runtime_info_with_the_options_it_was_given() -> None:
    options = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                          value=runtimeoptions.Options(config_path="/etc/husk/husk.toml")
                          .SerializeToString())
    proc = run_info(options.SerializeToString())
    assert proc.returncode == 0, proc.stderr
    info = introspection_pb2.RuntimeInfo.FromString(proc.stdout)
    assert info.name == "io.containerd.husk.v2"
    assert info.version.version == SHIM_VERSION
    assert info.options == options
    # No features document: husk is not a runc-compatible runtime on the host.
    assert not info.HasField("features") and not info.annotations


def test_info_without_options() -> None:
    proc = run_info(b"", "-debug")
    assert proc.returncode == 0, proc.stderr
    info = introspection_pb2.RuntimeInfo.FromString(proc.stdout)
    assert info.name == "io.containerd.husk.v2" and not info.HasField("options")


def test_info_refuses_options_that_are_not_an_any() -> None:
    proc = run_info(b"\xff\xff\xff")
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"not a protobuf Any" in proc.stderr
