"""Shared fixtures: the guest image, a husk config for tests, leak checks."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cri.harness import (DEFAULT_KEEP_LOGS_DIR, HUSK_RUNTIME_TYPE, ContainerdOptions,
                               RuntimeHandler, remove_state_dir)
from tests.cri.images import BuiltImage
from tests.rootfs import make_busybox_rootfs

pytest_plugins = ["tests.cri.fixtures"]

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "build" / "guest"
GUEST_FILES = ("vmlinuz", "initrd.img", "rootfs.img")
TEMPLATES_DIR = REPO / "build" / "templates"
# The husk state dir of the CRI tests' containerd (short: socket paths have a limit).
HUSK_CRI_STATE = Path("/run") / f"husk-cri-{secrets.token_hex(4)}"
# A second husk handler whose guests run with the agent's test hooks on.
HOSTILE_HANDLER = "husk-hostile"


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The guest image `make guest-image` built; a missing one fails loudly, never skips."""
    missing = [f for f in GUEST_FILES if not (GUEST_DIR / f).exists()]
    if missing:
        pytest.fail(f"guest image incomplete ({', '.join(missing)} missing in {GUEST_DIR}): "
                    "run `make guest-image`")
    return GUEST_DIR


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


def _toml_lines(values: dict[str, object]) -> list[str]:
    return [f"{k} = {v!r}".replace("'", '"') for k, v in values.items()]


def write_test_config(path: Path, state_dir: Path, agent: dict[str, object] | None = None,
                      templates_dir: Path = TEMPLATES_DIR, templates: bool | None = None,
                      debug_console: bool = False, **hypervisor: object) -> Path:
    lines = ["[hypervisor]", *_toml_lines({"guest_dir": str(GUEST_DIR), **hypervisor})]
    if agent:
        lines += ["[agent]", *_toml_lines(agent)]
    # Direct-volume records of the tests' pods, apart from a node's real ones.
    lines += ["[storage]", f'direct_volumes_dir = "{state_dir}/direct-volumes"']
    # One template directory for the whole run (its templates are per VM shape);
    # HUSK_TEST_TEMPLATES=off runs everything with cold boots instead.
    if templates is None:
        templates = os.environ.get("HUSK_TEST_TEMPLATES") != "off"
    lines += ["[template]", f'dir = "{templates_dir}"', f"enabled = {str(templates).lower()}"]
    lines += ["[runtime]", f'state_dir = "{state_dir}"']
    lines += ["[debug]", f"console = {str(debug_console).lower()}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def husk_state_dir() -> Iterator[Path]:
    """A short private state dir (unix socket paths must stay under 106 bytes)."""
    state = Path("/run") / f"husk-test-{secrets.token_hex(4)}"
    yield state
    remove_state_dir(state)  # a killed `husk run` leaves the container's rootfs bound in it


def our_processes(marker: str) -> list[str]:
    """QEMU/virtiofsd/shim processes whose command line mentions ``marker``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd and proc.pid != os.getpid() and any(
                name in cmd for name in ("qemu-system", "virtiofsd", "shim")):
            found.append(f"{proc.pid}: {cmd[:200]}")
    return found


def open_files() -> set[str]:
    """What this process's fds point to (pipe:[inode], socket:[inode], paths).

    Leak checks compare these, not a count: fds of earlier tests (a grpc channel,
    a collected object's file) may close while a test runs, hiding a leak of its own.
    """
    targets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets.add(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def mounts_below(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@pytest.fixture(scope="session")
def containerd_options(cri_images: list[BuiltImage], guest_image: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdOptions]:
    """The CRI tests' containerd: handlers runc and husk (husk with its own state dir)."""
    config_dir = tmp_path_factory.mktemp("husk")
    # Ten VMs booting at once under TCG on two cores take minutes, not seconds.
    # max_vcpus above the host's CPUs: the resize tests grow a pod to 3 vCPUs.
    config = write_test_config(config_dir / "husk.toml", HUSK_CRI_STATE,
                               agent={"dial_timeout_s": 300.0, "request_timeout_s": 120.0},
                               max_vcpus=4)
    # The hostile-guest tests: the agent's test hooks on, and a keepalive quick
    # enough to see a stalled agent within seconds; the debug console on (husk exec's
    # tests; the main handler has it off, as husk.toml's default).
    hostile = write_test_config(config_dir / "husk-hostile.toml", HUSK_CRI_STATE,
                                agent={"keepalive_interval_s": 3.0, "keepalive_misses": 3,
                                       "dial_timeout_s": 300.0},
                                kernel_params="husk.test_hooks=1", debug_console=True)
    handler = RuntimeHandler(HOSTILE_HANDLER, HUSK_RUNTIME_TYPE,
                             options={"ConfigPath": str(hostile)},
                             privileged_without_host_devices=True)
    yield ContainerdOptions(images=cri_images, husk_config=config,
                            keep_logs_dir=DEFAULT_KEEP_LOGS_DIR, extra_handlers=(handler,))
    shutil.rmtree(HUSK_CRI_STATE, ignore_errors=True)
