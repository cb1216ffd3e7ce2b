"""Smoke tests of the CRI harness itself, driven with Debian's runc.

They show that a private containerd runs pods and containers end to end
(images, CNI in the instance's netns, logs, exec, graceful stop) and that
stopping it leaves nothing behind, so the husk tests can rely on the harness.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cri.cni import DEFAULT_SUBNET
from tests.cri.cri import ContainerState, CriClient, PodSandboxState, parse_cri_log
from tests.cri.fixtures import leak_checked
from tests.cri.harness import (
    CONTAINERD2_MISSING,
    CRI_NAMESPACE,
    DEFAULT_KEEP_LOGS_DIR,
    Containerd,
    ContainerdOptions,
    LeakError,
    find_containerd2,
    find_leftovers,
    mounts_under,
    shim_socket_path,
)
from tests.cri.images import BUSYBOX, BUSYBOX_REF, PAUSE, PAUSE_REF, BuiltImage, build_images

HANDLER = "runc"
# Exits 0 on SIGTERM, after saying so on stdout.
GRACEFUL_LOOP = "trap 'echo bye; exit 0' TERM; while :; do sleep 1 & wait $!; done"
STOP_GRACE_S = 30
EXIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def runc_containerd(cri_images: list[BuiltImage]) -> Iterator[Containerd]:
    """An instance of our own: the session one needs the guest image, runc does not."""
    with Containerd.started(ContainerdOptions(images=cri_images, keep_logs_dir=DEFAULT_KEEP_LOGS_DIR)) as cd:
        yield cd


@pytest.fixture
def runc_cri(runc_containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[CriClient]:
    with leak_checked(runc_containerd, request) as client:
        yield client


@pytest.mark.cri
@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", [pytest.param(1, id="containerd1.6"), pytest.param(2, id="containerd2")])
def test_runc_pod_end_to_end_leaves_nothing_behind(cri_images: list[BuiltImage], version: int) -> None:
    containerd_dir = find_containerd2() if version == 2 else None
    if version == 2 and containerd_dir is None:
        pytest.skip(CONTAINERD2_MISSING)
    options = ContainerdOptions(images=cri_images, keep_logs_dir=DEFAULT_KEEP_LOGS_DIR, containerd_dir=containerd_dir)
    with Containerd.started(options) as cd:
        assert cd.version[0] == version
        cri = cd.cri
        record = cd.record
        assert record is not None
        root, netns = cd.root, cd.netns
        assert netns in _netns_list()

        pod = cri.run_pod("smoke", handler=HANDLER)
        status = cri.pod_status(pod.id)
        assert status.state == PodSandboxState.SANDBOX_READY
        assert status.runtime_handler == HANDLER
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(DEFAULT_SUBNET)

        one_shot = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", "echo hello; echo oops >&2"], name="oneshot")
        exited = cri.wait_container_exit(one_shot, timeout=EXIT_TIMEOUT_S)
        assert exited.exit_code == 0
        assert Path(exited.log_path).parent == pod.log_directory
        log = cri.read_log(one_shot)
        assert log.stdout == "hello\n"
        assert log.stderr == "oops\n"

        server = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", GRACEFUL_LOOP], name="server")
        assert cri.container_status(server).state == ContainerState.CONTAINER_RUNNING
        assert cri.exec_sync(server, ["sh", "-c", "echo $((6*7))"], timeout=30) == (0, b"42\n", b"")
        failing = cri.exec_sync(server, ["sh", "-c", "echo nope >&2; exit 7"], timeout=30)
        assert (failing.exit_code, failing.stdout, failing.stderr) == (7, b"", b"nope\n")

        # While the pod runs: its shim, rootfs/shm/netns mounts and the CNI bridge exist.
        assert cd.shim_processes(), "no containerd-shim process carries this instance's address"
        if containerd_dir is not None:  # the build's own runc shim: Debian's 1.6 one fails under 2.x
            assert {Path(p.exe()).parent for p in cd.shim_processes()} == {containerd_dir.resolve()}
        assert mounts_under(root)
        assert "husk-br0" in _run(["ip", "-n", netns, "link", "show"])
        assert "husk-br0" not in _run(["ip", "link", "show"]), "the CNI bridge leaked into the host netns"

        t0 = time.monotonic()
        cri.stop_container(server, timeout=STOP_GRACE_S)
        assert time.monotonic() - t0 < STOP_GRACE_S / 2, "StopContainer waited for SIGKILL: TERM was not delivered"
        stopped = cri.container_status(server)
        assert stopped.state == ContainerState.CONTAINER_EXITED
        assert stopped.exit_code == 0
        assert cri.read_log(server).stdout == "bye\n"

        for cid in (one_shot, server):
            cri.remove_container(cid)
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
        assert cri.list_pods() == []
        cd.assert_no_leaks()

    # Containerd.started() raises LeakError itself; check independently of it too.
    assert find_leftovers(record) == []
    assert not root.exists()
    assert netns not in _netns_list()
    assert not [m for m in _run(["cat", "/proc/self/mountinfo"]).splitlines() if str(root) in m]
    assert not [
        p for p in _run(["ps", "-eo", "args"]).splitlines() if "containerd-shim" in p and record.address in p
    ]


@pytest.mark.cri
@pytest.mark.timeout(300)
def test_pods_reach_each_other_over_the_private_bridge(runc_cri: CriClient) -> None:
    cri = runc_cri
    a = cri.run_pod("net-a", handler=HANDLER)
    b = cri.run_pod("net-b", handler=HANDLER)
    try:
        ip_a = cri.pod_status(a.id).network.ip
        ip_b = cri.pod_status(b.id).network.ip
        assert ip_a != ip_b
        listener = cri.run_container(a, BUSYBOX_REF, ["sh", "-c", GRACEFUL_LOOP])
        prober = cri.run_container(b, BUSYBOX_REF, ["sh", "-c", GRACEFUL_LOOP])
        assert cri.exec_sync(listener, ["hostname"], timeout=30).out.strip() == "net-a"
        ping = cri.exec_sync(prober, ["ping", "-c", "1", "-W", "5", ip_a], timeout=30)
        assert ping.exit_code == 0, ping.out + ping.err
    finally:
        for pod in (a, b):
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)


@pytest.mark.cri
@pytest.mark.timeout(300)
def test_leak_check_reports_and_removes_a_forgotten_pod(runc_containerd: Containerd) -> None:
    containerd = runc_containerd
    pod = containerd.cri.run_pod("forgotten", handler=HANDLER)
    containerd.cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    with pytest.raises(LeakError) as excinfo:
        containerd.assert_no_leaks(timeout=0.5)
    message = str(excinfo.value)
    assert pod.id in message
    assert "containerd-shim-runc-v2" in message
    assert "mount " in message
    assert containerd.leaks() == []

    # A shim that exits without unlinking its socket (containerd never removes it).
    stale = shim_socket_path(containerd.address, CRI_NAMESPACE, pod.id)
    stale.write_bytes(b"")
    try:
        with pytest.raises(LeakError, match="shim socket"):
            containerd.assert_no_leaks(timeout=0.5)
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


@pytest.mark.cri
@pytest.mark.timeout(300)
def test_images_are_deterministic_and_cached(tmp_path: Path) -> None:
    first = {img.ref: img for img in build_images(tmp_path / "a")}
    second = {img.ref: img for img in build_images(tmp_path / "b")}
    assert set(first) == {BUSYBOX.ref, PAUSE.ref}
    for ref in first:
        assert first[ref].manifest_digest == second[ref].manifest_digest
        assert first[ref].tarball.read_bytes() == second[ref].tarball.read_bytes()
    mtime = first[PAUSE_REF].tarball.stat().st_mtime_ns
    again = {img.ref: img for img in build_images(tmp_path / "a")}
    assert again[PAUSE_REF].tarball.stat().st_mtime_ns == mtime, "an up-to-date image was rebuilt"


def test_parse_cri_log_joins_partial_lines_per_stream() -> None:
    text = (
        "2024-01-01T00:00:00.000000001Z stdout P par\n"
        "2024-01-01T00:00:00.000000002Z stderr F err line\n"
        "2024-01-01T00:00:00.000000003Z stdout F tial\n"
        "2024-01-01T00:00:00.000000004Z stdout F \n"
        "2024-01-01T00:00:00.000000005Z stdout P  two spaces\n"
    )
    parsed = parse_cri_log(text)
    assert parsed.stdout == "partial\n\n two spaces"
    assert parsed.stderr == "err line\n"
    with pytest.raises(ValueError):
        parse_cri_log("not a cri log line\n")


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _netns_list() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]
