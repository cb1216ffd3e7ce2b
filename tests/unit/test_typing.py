"""The host and guest code type-check under mypy --strict (settings in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mypy_strict() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "shim", "agent"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
