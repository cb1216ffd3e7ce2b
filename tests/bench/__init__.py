"""Benchmarks (`make bench-*`): commands that print JSON, not tests."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import psutil


def machine(state: Path | None = None) -> dict[str, Any]:
    """What the figures were measured on; with husk's state dir, the accelerator its VMs
    used (from the shim's cached probe)."""
    found: dict[str, Any] = {"cpus": os.cpu_count(), "cpu_model": _cpu_model(),
                             "kernel": platform.release(),
                             "mem_gib": round(psutil.virtual_memory().total / (1 << 30))}
    if state is not None:
        probe = state / "accel-probe.json"
        found["accel"] = (str(json.loads(probe.read_text())["accel"]).upper()
                          if probe.exists() else "unknown")
    return found


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median of every numeric field over the rounds."""
    keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}


def emit(result: dict[str, Any], output: Path | None = None) -> None:
    """Print the JSON, and keep it in ``output`` (build/bench/<name>.json)."""
    text = json.dumps(result, indent=2)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    print(text)
