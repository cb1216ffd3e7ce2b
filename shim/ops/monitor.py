"""`husk monitor`: one Prometheus endpoint for every husk pod of the node (like kata-monitor).

Each scrape asks every running pod's shim, over its management socket
(``op: metrics``), for one snapshot: the shim's RPCs and events, the VM's
host processes (CPU, RSS, PSS) and the guest's figures from its agent. Nothing
is polled between scrapes, so a node nobody scrapes pays nothing. Every
series carries the pod's sandbox id, name, namespace and uid; a pod that is
gone is simply not found on the next scrape, so its series disappear.

What the guest reports is bounded by the shim (clipped values, only
containers the shim knows), so a hostile guest cannot add series.
"""
from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from shim import errors
from shim.config import parse_listen
from shim.ids import SANDBOXES_DIR
from shim.ops.pods import find_pods
from shim.sandbox import manage
from shim.ttrpc.services import DURATION_BUCKETS_S

log = logging.getLogger(__name__)

# One pod's snapshot: the shim waits up to 5 s for its guest (METRICS_TIMEOUT_S).
POD_TIMEOUT_S = 8.0
# Pods asked at once during a scrape.
FANOUT = 8
POD_LABELS = ("sandbox_id", "pod_name", "pod_namespace", "pod_uid")
NS = 1e-9


def snapshot(run_dir: Path) -> dict[str, Any]:
    """One pod's figures. :raise errors.HuskError: its shim did not answer."""
    reply = manage.call(run_dir, {"op": "metrics"}, timeout_s=POD_TIMEOUT_S)
    if not reply.get("ok"):
        raise errors.UnavailableError(str(reply.get("error"))[:300])
    return reply


class Families:
    """The metric families of one scrape, filled pod by pod."""

    def __init__(self) -> None:
        g, c = GaugeMetricFamily, CounterMetricFamily
        pod, host = list(POD_LABELS), [*POD_LABELS, "component"]
        container = [*POD_LABELS, "container_id", "container_name"]
        self.up = g("husk_pod_up", "1 if the pod's shim answered this scrape", labels=pod)
        self.info = g("husk_pod_info", "The pod's VM (value 1)", labels=[*pod, "accel"])
        self.rpc = c("husk_shim_rpc_requests", "Task API calls the shim served, by status",
                     labels=[*pod, "method", "code"])
        self.rpc_seconds = HistogramMetricFamily(
            "husk_shim_rpc_duration_seconds", "How long the shim took per Task API call",
            labels=[*pod, "method"])
        self.events_sent = c("husk_shim_events_sent", "Events containerd took from the shim",
                             labels=[*pod, "topic"])
        self.events_dropped = c("husk_shim_events_dropped", "Events the shim gave up on",
                                labels=[*pod, "topic"])
        self.events_pending = g("husk_shim_events_pending", "Events waiting for containerd",
                                labels=pod)
        self.host_cpu = c("husk_host_cpu_seconds", "CPU time of the pod's host processes",
                          labels=[*host, "mode"])
        self.host_rss = g("husk_host_memory_rss_bytes",
                          "Resident memory of the pod's host processes", labels=host)
        self.host_pss = g("husk_host_memory_pss_bytes",
                          "Proportional set size of the pod's host processes (shared pages "
                          "divided among their users)", labels=host)
        self.guest_memory = g("husk_guest_memory_bytes", "The guest's memory (/proc/meminfo)",
                              labels=[*pod, "kind"])
        self.guest_cpu = c("husk_guest_cpu_seconds", "The guest's CPU time (/proc/stat)",
                           labels=[*pod, "mode"])
        self.guest_load = g("husk_guest_load_average", "The guest's load average",
                            labels=[*pod, "period"])
        self.guest_cpus = g("husk_guest_online_cpus", "vCPUs online in the guest", labels=pod)
        self.guest_tasks = g("husk_guest_tasks", "Tasks the guest's kernel runs", labels=pod)
        self.guest_uptime = g("husk_guest_uptime_seconds", "Since the guest booted (or its "
                              "template did)", labels=pod)
        self.container_cpu = c("husk_container_cpu_seconds", "A container's CPU time in the "
                               "guest", labels=[*container, "mode"])
        self.container_memory = g("husk_container_memory_bytes", "A container's memory in "
                                  "the guest", labels=[*container, "kind"])
        self.container_pids = g("husk_container_pids", "Processes in a container",
                                labels=container)
        self.container_ooms = c("husk_container_oom_kills", "Processes the guest's OOM "
                                "killer took in a container", labels=container)
        self.scrape_errors = c("husk_monitor_pod_errors", "Pods whose shim did not answer "
                               "(this monitor's lifetime)", labels=[])
        self.scrape_seconds = g("husk_monitor_scrape_duration_seconds",
                                "How long asking every pod took", labels=[])
        self.pods = g("husk_monitor_pods", "Pods found on this scrape", labels=[])

    def merge(self, other: Families) -> None:
        for name, family in vars(other).items():
            vars(self)[name].samples.extend(family.samples)

    def all(self) -> Iterator[Metric]:
        return (value for value in vars(self).values() if isinstance(value, Metric))

    def add_pod(self, run_dir: Path, data: dict[str, Any] | None) -> None:
        if data is None:
            self.up.add_metric([run_dir.name, "", "", ""], 0)
            return
        pod = data.get("pod") or {}
        labels = [str(data.get("sandbox_id", run_dir.name))] + [
            str(pod.get(k, "")) for k in ("name", "namespace", "uid")]
        self.up.add_metric(labels, 1)
        self.info.add_metric([*labels, str(data.get("accel", ""))], 1)
        self._add_shim(labels, data.get("shim") or {})
        for component, usage in (data.get("host") or {}).items():
            host = [*labels, component]
            self.host_cpu.add_metric([*host, "user"], usage["cpu_user_s"])
            self.host_cpu.add_metric([*host, "system"], usage["cpu_system_s"])
            self.host_rss.add_metric(host, usage["rss_bytes"])
            self.host_pss.add_metric(host, usage["pss_bytes"])
        if "guest" in data:
            self._add_guest(labels, data["guest"], data.get("container_names") or {})

    def _add_shim(self, labels: list[str], shim: dict[str, Any]) -> None:
        for method, stats in (shim.get("rpc") or {}).items():
            for code, count in stats["codes"].items():
                self.rpc.add_metric([*labels, method, code], count)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, DURATION_BUCKETS_S), "+Inf"], stats["buckets"]):
                cumulative += count
                buckets.append((bound, cumulative))
            self.rpc_seconds.add_metric([*labels, method], buckets, stats["seconds_sum"])
        events = shim.get("events") or {}
        for topic, count in (events.get("sent") or {}).items():
            self.events_sent.add_metric([*labels, topic], count)
        for topic, count in (events.get("dropped") or {}).items():
            self.events_dropped.add_metric([*labels, topic], count)
        self.events_pending.add_metric(labels, events.get("pending", 0))

    def _add_guest(self, labels: list[str], guest: dict[str, Any],
                   names: dict[str, str]) -> None:
        for kind in ("total", "available", "free"):
            self.guest_memory.add_metric([*labels, kind], guest[f"memory_{kind}_bytes"])
        for mode in ("user", "system", "idle", "iowait", "steal"):
            self.guest_cpu.add_metric([*labels, mode], guest[f"cpu_{mode}_ns"] * NS)
        for period in ("1", "5", "15"):
            self.guest_load.add_metric([*labels, f"{period}m"], guest[f"load{period}"])
        self.guest_cpus.add_metric(labels, guest["online_cpus"])
        self.guest_tasks.add_metric(labels, guest["processes"])
        self.guest_uptime.add_metric(labels, guest["uptime_s"])
        for container_id, stats in (guest.get("containers") or {}).items():
            container = [*labels, container_id, str(names.get(container_id, ""))]
            self.container_cpu.add_metric([*container, "user"], stats["cpu_user_ns"] * NS)
            self.container_cpu.add_metric([*container, "system"], stats["cpu_system_ns"] * NS)
            for kind in ("usage", "limit", "cache", "rss"):
                self.container_memory.add_metric([*container, kind],
                                                 stats[f"memory_{kind}_bytes"])
            self.container_pids.add_metric(container, stats["pids_current"])
            self.container_ooms.add_metric(container, stats["oom_kills"])


class PodsCollector(Collector):
    """Asks every pod on each collect() (each scrape)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.errors = 0
        self._lock = threading.Lock()  # scrapes may overlap; the error count is shared
        self._pool = concurrent.futures.ThreadPoolExecutor(FANOUT, "husk-monitor")

    def collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        families = Families()
        pods = find_pods(self.state_dir)
        for run_dir, data in zip(pods, self._pool.map(self._ask, pods)):
            pod = Families()  # a snapshot missing a figure (another husk version) adds nothing
            try:
                pod.add_pod(run_dir, data)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("pod %s: unexpected snapshot (%s: %s)", run_dir.name,
                            type(exc).__name__, exc)
                with self._lock:
                    self.errors += 1
                pod = Families()
                pod.add_pod(run_dir, None)
            families.merge(pod)
        with self._lock:
            families.scrape_errors.add_metric([], self.errors)
        families.pods.add_metric([], len(pods))
        families.scrape_seconds.add_metric([], time.monotonic() - started)
        return list(families.all())

    def _ask(self, run_dir: Path) -> dict[str, Any] | None:
        try:
            return snapshot(run_dir)
        except errors.HuskError as exc:
            if (run_dir / manage.MANAGE_SOCKET).exists():  # else it went away meanwhile
                log.warning("pod %s: %s", run_dir.name, exc)
                with self._lock:
                    self.errors += 1
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(state_dir: Path, listen: str) -> int:
    """Serve until SIGTERM or SIGINT. :raise ConfigError: a bad listen address."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    collector = PodsCollector(state_dir)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.warning("husk monitor: serving http://%s:%d/metrics for the pods in %s", host,
                server.server_port, state_dir / SANDBOXES_DIR)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    collector.close()
    return 0
