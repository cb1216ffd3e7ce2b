"""pytest fixtures for CRI end-to-end tests.

Owns the session-wide private containerd (one per xdist worker; a second one,
containerd 2.x, for the tests that run against each), the test images, and the
per-test leak check. Load with
`pytest_plugins = ["tests.cri.fixtures"]` in tests/conftest.py; override
`containerd_options` there to point the husk handler at a config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Generator, Iterator

import pytest

from .cri import CriClient
from .harness import CONTAINERD2_MISSING, DEFAULT_KEEP_LOGS_DIR, Containerd, ContainerdOptions, find_containerd2
from .images import BuiltImage, build_images

log = logging.getLogger(__name__)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("CRI tests need root (network namespaces, mounts, cgroups)")


@pytest.fixture(scope="session")
def cri_images() -> list[BuiltImage]:
    """The busybox and pause image tarballs (built once, cached in build/images)."""
    _require_root()
    return build_images()


@pytest.fixture(scope="session")
def containerd_options(cri_images: list[BuiltImage]) -> ContainerdOptions:
    """Options of the session containerd; override to set husk_config, extra_env, ..."""
    return ContainerdOptions(images=cri_images, keep_logs_dir=DEFAULT_KEEP_LOGS_DIR)


@pytest.fixture(scope="session")
def containerd(containerd_options: ContainerdOptions) -> Iterator[Containerd]:
    """A private containerd for the whole session; its teardown fails if anything survives it."""
    _require_root()
    with Containerd.started(containerd_options) as cd:
        yield cd


@pytest.fixture(scope="session")
def containerd2(containerd_options: ContainerdOptions) -> Iterator[Containerd]:
    """The session containerd's twin, run by containerd 2.x (find_containerd2); skips without one."""
    _require_root()
    directory = find_containerd2()
    if directory is None:
        pytest.skip(CONTAINERD2_MISSING)
    with Containerd.started(dataclasses.replace(containerd_options, containerd_dir=directory)) as cd:
        yield cd


# The session containerds a test runs against with each_containerd / each_cri.
EACH_CONTAINERD = [pytest.param("containerd", id="containerd1.6"), pytest.param("containerd2", id="containerd2")]


@pytest.fixture(params=EACH_CONTAINERD)
def each_containerd(request: pytest.FixtureRequest) -> Containerd:
    """The test runs once with the session containerd (1.6) and once with containerd2."""
    cd: Containerd = request.getfixturevalue(request.param)
    return cd


@pytest.fixture
def each_cri(each_containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    """each_containerd's CRI client, leak-checked like `cri`."""
    with leak_checked(each_containerd, request) as client:
        yield client


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remembers whether the test body failed, for leak_checked's teardown."""
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True
    return report


@contextlib.contextmanager
def leak_checked(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    """The instance's CRI client, checked for leaks around one test.

    After the test, pods, containers, shim processes and sockets, mounts under
    the instance dir, tasks in its cgroups and CNI cache entries must all be
    gone (the test removes its pods); otherwise they are cleaned up and
    LeakError names them. After a failed test they are cleaned up quietly:
    the failure is the thing to report, not the cleanup it skipped.
    """
    test_id = request.node.nodeid
    containerd.check_alive()
    earlier = containerd.leaks()
    if earlier:
        # Left by a test that did not use this check: not this test's fault.
        log.warning("cleaning up before %s: %s", test_id, "; ".join(earlier))
        containerd.reset()
    yield containerd.cri
    containerd.check_alive()
    if request.node.stash.get(_CALL_FAILED, False):
        leftovers = containerd.leaks()
        if leftovers:
            log.warning("cleaning up after failed %s: %s", test_id, "; ".join(leftovers))
            containerd.reset()
        return
    containerd.assert_no_leaks()


@pytest.fixture
def cri(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    """The session containerd's CRI client; the test errors if it leaves anything behind."""
    with leak_checked(containerd, request) as client:
        yield client
