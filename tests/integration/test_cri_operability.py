"""Operating husk pods through the CRI: `husk monitor`'s series and `husk exec`'s console.

The monitor and `husk exec` run as an operator runs them (the installed `husk`
command, the CRI containerd's husk.toml), against real pods in real VMs.
"""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import HOSTILE_HANDLER
from tests.cri.cri import CriClient, wait_for
from tests.cri.harness import DEFAULT_BIN_DIR, ContainerdOptions
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(600)]

HUSK = str(DEFAULT_BIN_DIR / "husk")
HUSK_LOG_DIR = Path("/var/log/husk")
MONITOR_START_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 30.0
EXEC_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture
def monitor(containerd_options: ContainerdOptions) -> Iterator[str]:
    """`husk monitor` for the CRI containerd's pods; yields its /metrics URL."""
    port = _free_port()
    proc = subprocess.Popen([HUSK, "--config", str(containerd_options.husk_config), "monitor",
                             "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"

    def serving() -> bool | None:
        assert proc.poll() is None, f"husk monitor exited: {proc.communicate()[1]}"
        try:
            _scrape(url)
        except (urllib.error.URLError, ConnectionError):
            return None
        return True

    try:
        wait_for("husk monitor to serve", serving, MONITOR_START_TIMEOUT_S)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _of_pod(samples: list[Sample], sandbox_id: str, name: str) -> list[Sample]:
    return [s for s in samples if s.name == name and s.labels.get("sandbox_id") == sandbox_id]


def test_monitor_reports_a_pods_series_with_its_labels_until_it_goes(
        cri: CriClient, monitor: str) -> None:
    pod = cri.run_pod("monitored", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], name="sleeper")
    meta = pod.config.metadata
    started = time.monotonic()
    samples = _scrape(monitor)
    scrape_s = time.monotonic() - started

    [up] = _of_pod(samples, pod.id, "husk_pod_up")
    assert up.value == 1
    assert up.labels == {"sandbox_id": pod.id, "pod_name": "monitored",
                         "pod_namespace": meta.namespace, "pod_uid": meta.uid}
    host_pss = {s.labels["component"]: s.value
                for s in _of_pod(samples, pod.id, "husk_host_memory_pss_bytes")}
    assert host_pss.get("qemu", 0) > 16 << 20 and host_pss.get("shim", 0) > 1 << 20, host_pss
    guest_memory = {s.labels["kind"]: s.value
                    for s in _of_pod(samples, pod.id, "husk_guest_memory_bytes")}
    assert 0 < guest_memory["available"] < guest_memory["total"], guest_memory
    [cpus] = _of_pod(samples, pod.id, "husk_guest_online_cpus")
    assert cpus.value >= 1
    container_memory = [s for s in _of_pod(samples, pod.id, "husk_container_memory_bytes")
                        if s.labels["kind"] == "usage"]
    assert [(s.labels["container_id"], s.labels["container_name"]) for s in container_memory] \
        == [(cid, "sleeper")]
    assert container_memory[0].value > 0
    creates = [s for s in _of_pod(samples, pod.id, "husk_shim_rpc_requests_total")
               if s.labels["method"] == "Create" and s.labels["code"] == "OK"]
    assert creates and creates[0].value >= 2, "the sandbox's and the container's Create"
    sent = {s.labels["topic"] for s in _of_pod(samples, pod.id, "husk_shim_events_sent_total")}
    assert "/tasks/start" in sent, sent
    print(f"one scrape of {len(samples)} samples took {scrape_s * 1000:.0f} ms")

    cri.stop_and_remove_pod(pod.id)
    samples = _scrape(monitor)
    assert not [s for s in samples if s.labels.get("sandbox_id") == pod.id]
    [pods] = [s for s in samples if s.name == "husk_monitor_pods"]
    assert pods.value >= 0


def _husk_exec(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HUSK, "--config", str(config), "exec", *args], capture_output=True,
                          text=True, timeout=EXEC_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_husk_exec_runs_in_the_guest_only_where_the_console_is_on(
        cri: CriClient, containerd_options: ContainerdOptions) -> None:
    config = containerd_options.husk_config
    assert config is not None
    off = cri.run_pod("console-off", handler="husk")
    refused = _husk_exec(config, off.id, "--", "true")
    assert refused.returncode == 125
    assert "[debug] console = true" in refused.stderr, refused.stderr

    # The hostile handler's husk.toml turns the console on.
    on = cri.run_pod("console-on", handler=HOSTILE_HANDLER)
    # Outside every container: the agent's state (crun's root) is there, and it is root.
    script = "hostname; test -d /run/husk/crun && echo agent-state; id -u; exit 7"
    ran = _husk_exec(config, f"{on.config.metadata.namespace}/console-on", "--", "sh", "-c",
                     script)
    assert ran.returncode == 7, ran.stderr
    assert ran.stdout.split() == ["console-on", "agent-state", "0"], ran.stdout
    missing = _husk_exec(config, on.id[:12], "--", "no-such-program")
    assert missing.returncode == 127 and "no-such-program" in missing.stdout

    log = (HUSK_LOG_DIR / f"{on.id}.log").read_text()
    assert "debug console opened by pid" in log and "exited with status 7" in log
    for pod in (off, on):
        cri.stop_and_remove_pod(pod.id)
