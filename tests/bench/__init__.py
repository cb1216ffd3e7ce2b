"""Benchmarks (`make bench-*`): commands that print JSON, not tests."""
from __future__ import annotations

import os
import platform
import statistics
from typing import Any

import psutil


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "mem_gib": round(psutil.virtual_memory().total / (1 << 30))}


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median of every numeric field over the rounds."""
    keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}
