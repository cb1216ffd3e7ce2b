"""The daemon's command line as ps, pgrep and psutil see it."""
from __future__ import annotations

import subprocess
import sys

import psutil

SCRIPT = """
import sys, time
from shim.util.proctitle import set_cmdline
assert set_cmdline(["containerd-shim-husk-v2", *sys.argv[1:]])
print("ready", flush=True)
time.sleep(30)
"""


def test_the_daemon_shows_as_a_shim() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "-namespace", "k8s.io", "-id", "pod1",
                             "serve"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().rstrip(b"\0") == b"containerd-shim-husk-v2 -namespace k8s.io -id pod1 serve"
        assert psutil.Process(proc.pid).cmdline() == [
            "containerd-shim-husk-v2", "-namespace", "k8s.io", "-id", "pod1", "serve"]
        found = subprocess.run(["pgrep", "-f", "^containerd-shim-husk-v2 -namespace k8s.io -id pod1"],
                               capture_output=True, text=True)
        assert found.stdout.split() == [str(proc.pid)]
    finally:
        proc.kill()
        proc.wait()


def test_a_title_longer_than_the_area_is_refused() -> None:
    from shim.util.proctitle import set_cmdline
    assert set_cmdline(["x" * 1_000_000]) is False
