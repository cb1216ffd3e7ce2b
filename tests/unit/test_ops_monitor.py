"""`husk monitor` and `husk exec`'s pod lookup against real management sockets.

The pods' shims are stood in for by ManageServers answering what a shim answers
(the snapshot's shape is the one shim.sandbox.pod builds; the CRI test in
tests/integration/test_cri_operability.py scrapes real pods).
"""
from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from shim.ids import SANDBOXES_DIR
from shim.config import ConfigError, parse_listen
from shim.ops.monitor import PodsCollector
from shim.ops.pods import PodNotFound, find_pods, resolve_pod
from shim.sandbox.manage import MANAGE_SOCKET, ManageServer
from shim.ttrpc.errors import Code
from shim.ttrpc.services import MethodStats

pytestmark = pytest.mark.timeout(60)

def _snapshot(sandbox_id: str, name: str, namespace: str = "default") -> dict[str, Any]:
    create = MethodStats()
    create.observe(Code.OK, 0.003)
    create.observe(Code.OK, 2.0)
    create.observe(Code.NOT_FOUND, 0.2)
    usage = {"cpu_user_s": 1.5, "cpu_system_s": 0.5, "rss_bytes": 100 << 20, "pss_bytes": 60 << 20}
    stats = {"cpu_usage_ns": 3_000_000_000, "cpu_user_ns": 2_000_000_000,
             "cpu_system_ns": 1_000_000_000, "memory_usage_bytes": 5 << 20,
             "memory_limit_bytes": 64 << 20, "memory_max_usage_bytes": 6 << 20,
             "memory_cache_bytes": 1 << 20, "memory_rss_bytes": 4 << 20, "pids_current": 2,
             "pids_limit": 0, "oom_kills": 1}
    guest = {"memory_total_bytes": 400 << 20, "memory_available_bytes": 300 << 20,
             "memory_free_bytes": 200 << 20, "cpu_user_ns": 10**9, "cpu_system_ns": 2 * 10**9,
             "cpu_idle_ns": 3 * 10**9, "cpu_iowait_ns": 0, "cpu_steal_ns": 0, "load1": 0.5,
             "load5": 0.25, "load15": 0.0, "online_cpus": 2, "processes": 40, "uptime_s": 9.0,
             "containers": {"c1": stats}}
    return {"sandbox_id": sandbox_id, "accel": "tcg",
            "pod": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
            "shim": {"pid": 1, "rpc": {"Create": dataclasses.asdict(create)},
                     "events": {"sent": {"/tasks/start": 2}, "dropped": {"/tasks/oom": 1},
                                "pending": 0}},
            "host": {"qemu": usage, "shim": usage}, "container_names": {"c1": "app"},
            "guest": guest}


@pytest.fixture
async def shims(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    servers: list[ManageServer] = []

    async def start(sandbox_id: str, snapshot: dict[str, Any]) -> None:
        run_dir = tmp_path / SANDBOXES_DIR / sandbox_id
        run_dir.mkdir(parents=True)

        async def metrics(request: dict[str, Any]) -> dict[str, Any]:
            return snapshot

        async def info(request: dict[str, Any]) -> dict[str, Any]:
            return {"sandbox_id": sandbox_id, "pod": snapshot["pod"]}

        server = ManageServer(run_dir, {"metrics": metrics, "info": info}, sandbox_id)
        await server.start()
        servers.append(server)

    yield start
    for server in servers:
        await server.stop()


async def _scrape(state_dir: Path) -> list[Sample]:
    registry = CollectorRegistry(auto_describe=False)
    collector = PodsCollector(state_dir)
    registry.register(collector)
    try:
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
    finally:
        collector.close()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _one(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def test_every_pods_series_carry_its_labels(tmp_path: Path, shims: Any) -> None:
    await shims("aaaa1111", _snapshot("aaaa1111", "web"))
    await shims("bbbb2222", _snapshot("bbbb2222", "db", namespace="prod"))
    samples = await _scrape(tmp_path)
    pod = {"sandbox_id": "bbbb2222", "pod_name": "db", "pod_namespace": "prod",
           "pod_uid": "uid-db"}
    assert _one(samples, "husk_pod_up", **pod) == 1
    assert _one(samples, "husk_pod_info", accel="tcg", **pod) == 1
    assert _one(samples, "husk_shim_rpc_requests_total", method="Create", code="OK", **pod) == 2
    assert _one(samples, "husk_shim_rpc_requests_total", method="Create", code="NOT_FOUND",
                **pod) == 1
    # Cumulative buckets: 3 ms ≤ 5 ms; 200 ms ≤ 250 ms; 2 s ≤ 2.5 s.
    assert _one(samples, "husk_shim_rpc_duration_seconds_bucket", le="0.005", **pod) == 1
    assert _one(samples, "husk_shim_rpc_duration_seconds_bucket", le="0.25", **pod) == 2
    assert _one(samples, "husk_shim_rpc_duration_seconds_bucket", le="+Inf", **pod) == 3
    assert _one(samples, "husk_shim_rpc_duration_seconds_count", **pod) == 3
    assert _one(samples, "husk_shim_events_dropped_total", topic="/tasks/oom", **pod) == 1
    assert _one(samples, "husk_host_memory_pss_bytes", component="qemu", **pod) == 60 << 20
    assert _one(samples, "husk_host_cpu_seconds_total", component="shim", mode="user",
                **pod) == 1.5
    assert _one(samples, "husk_guest_memory_bytes", kind="available", **pod) == 300 << 20
    assert _one(samples, "husk_guest_cpu_seconds_total", mode="system", **pod) == 2.0
    assert _one(samples, "husk_guest_load_average", period="1m", **pod) == 0.5
    assert _one(samples, "husk_container_cpu_seconds_total", container_id="c1",
                container_name="app", mode="user", **pod) == 2.0
    assert _one(samples, "husk_container_oom_kills_total", container_id="c1", **pod) == 1
    assert _one(samples, "husk_monitor_pods") == 2


async def test_a_pod_whose_shim_does_not_answer_is_down_and_counted(tmp_path: Path) -> None:
    run_dir = tmp_path / SANDBOXES_DIR / "dead0000"
    run_dir.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:  # bound, nobody accepts: refused
        sock.bind(str(run_dir / MANAGE_SOCKET))
        samples = await _scrape(tmp_path)
    assert _one(samples, "husk_pod_up", sandbox_id="dead0000") == 0
    assert _one(samples, "husk_monitor_pod_errors_total") == 1


async def test_a_pod_is_found_by_id_prefix_name_or_namespace_and_name(
        tmp_path: Path, shims: Any) -> None:
    await shims("aaaa1111", _snapshot("aaaa1111", "web"))
    await shims("aaaa2222", _snapshot("aaaa2222", "web", namespace="prod"))
    await shims("cccc3333", _snapshot("cccc3333", "db"))

    def resolve(name: str) -> str:
        return resolve_pod(tmp_path, name).name

    assert [p.name for p in find_pods(tmp_path)] == ["aaaa1111", "aaaa2222", "cccc3333"]
    assert await asyncio.to_thread(resolve, "aaaa2222") == "aaaa2222"
    assert await asyncio.to_thread(resolve, "cccc") == "cccc3333"
    assert await asyncio.to_thread(resolve, "db") == "cccc3333"
    assert await asyncio.to_thread(resolve, "prod/web") == "aaaa2222"
    with pytest.raises(PodNotFound, match="2 pods are named 'web'"):
        await asyncio.to_thread(resolve, "web")
    with pytest.raises(PodNotFound, match="2 pods have a sandbox id"):
        await asyncio.to_thread(resolve, "aaaa")
    with pytest.raises(PodNotFound, match="no running husk pod"):
        await asyncio.to_thread(resolve, "ccc")  # too short a prefix, and no pod's name


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    for bad in ("localhost", "host:0", "host:99999", "host:http"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


async def test_a_snapshot_missing_figures_marks_only_that_pod_down(
        tmp_path: Path, shims: Any) -> None:
    broken = _snapshot("bbbb2222", "old")
    del broken["guest"]["load1"]  # say, a shim of another husk version
    await shims("aaaa1111", _snapshot("aaaa1111", "web"))
    await shims("bbbb2222", broken)
    samples = await _scrape(tmp_path)
    assert _one(samples, "husk_pod_up", sandbox_id="aaaa1111") == 1
    assert _one(samples, "husk_pod_up", sandbox_id="bbbb2222") == 0
    assert not [s for s in samples if s.labels.get("sandbox_id") == "bbbb2222"
                and s.name != "husk_pod_up"]
    assert _one(samples, "husk_monitor_pod_errors_total") == 1
