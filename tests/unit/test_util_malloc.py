"""The daemon's malloc setting: a restored pod's RAM copy leaves no memory behind."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# In a fresh interpreter: copy a sparse guest RAM (runs of data pages between
# holes and zero pages) in a worker thread, as the shim does, and report how much
# anonymous memory the process holds more afterwards.
COPY_AND_MEASURE = textwrap.dedent("""
    import json, os, random, sys, threading
    from shim.util.malloc import fix_mmap_threshold
    from shim.vm.ram import copy_sparse, new_guest_ram

    def anonymous_kib():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Anonymous:"):
                return int(line.split()[1])

    fixed = fix_mmap_threshold() if sys.argv[1] == "fixed" else None
    size = 64 << 20
    src, dst = new_guest_ram(size), new_guest_ram(size)
    rng = random.Random(7)
    for page in range(0, size // 4096, 3):
        run = rng.randrange(1, 300)
        if rng.random() < 0.5:
            os.pwrite(src, b"\\1" * 4096 * run, page * 4096)
    thread = threading.Thread(target=lambda: None)
    thread.start(); thread.join()
    before = anonymous_kib()
    thread = threading.Thread(target=copy_sparse, args=(src, dst, size))
    thread.start(); thread.join()
    print(json.dumps({"fixed": fixed, "kept_kib": anonymous_kib() - before}))
""")


def _kept_after_copy(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", COPY_AND_MEASURE, mode], check=True,
                         capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    return json.loads(out)


def test_the_copy_keeps_no_freed_buffers_with_the_threshold_fixed() -> None:
    fixed = _kept_after_copy("fixed")
    assert fixed["fixed"] is True
    assert fixed["kept_kib"] < 512, fixed

