"""cri-tools' crictl against a harness containerd.

Owns finding the crictl binary (Debian does not package cri-tools; the test
machines have a static build in ../shared/tools/cri-tools, or $CRICTL) and
running it against one instance. crictl always runs inside containerd's
network namespace: containerd's streaming server (exec, attach, port-forward)
listens on 127.0.0.1 *there*, and the URL it hands out only works from there.
A crictl in the host netns dials the host's 127.0.0.1 and fails. For the same
reason `crictl port-forward`'s local listener is on containerd's loopback, not
the test process's: connect to it with Containerd.connect().

    crictl = find_crictl()
    if crictl is None:
        pytest.skip(CRICTL_MISSING)
    with Crictl(crictl, cd).port_forward(pod.id, 0, 8080) as fwd:
        sock = fwd.connect()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .harness import Containerd, HarnessError, shared_tools_dir

CRICTL_ENV = "CRICTL"
DEFAULT_CRICTL = shared_tools_dir() / "cri-tools" / "crictl"
CRICTL_MISSING = f"crictl not found: put cri-tools' crictl at {DEFAULT_CRICTL} or name it in ${CRICTL_ENV}"
# crictl's own deadline for each CRI call (its --timeout).
CRICTL_CALL_TIMEOUT = "60s"
RUN_TIMEOUT_S = 90.0
PORT_FORWARD_READY_S = 30.0
PORT_FORWARD_STOP_S = 5.0
# client-go's portforward announces each listener like this.
_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


def find_crictl() -> Path | None:
    """$CRICTL if set, else the shared cri-tools build; None if that is not an executable file."""
    path = Path(os.environ.get(CRICTL_ENV) or DEFAULT_CRICTL)
    if not path.is_absolute():
        found = shutil.which(str(path))
        path = Path(found) if found else path
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class PortForward:
    """A running `crictl port-forward`; its listener is on 127.0.0.1 in containerd's netns."""

    containerd: Containerd
    local_port: int
    pod_port: int
    proc: subprocess.Popen[bytes]
    _output: IO[bytes] = field(repr=False)
    # What was printed, kept when the block ends (and the output file goes).
    _final_output: str | None = field(default=None, repr=False)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to the forwarded port (every connection is a new stream to the pod)."""
        return self.containerd.connect("127.0.0.1", self.local_port, timeout)

    def output(self) -> str:
        """What crictl printed so far (stdout and stderr); all of it after the block."""
        if self._final_output is not None:
            return self._final_output
        self._output.seek(0)
        return self._output.read().decode(errors="replace")


@dataclass
class Crictl:
    """crictl bound to one running instance."""

    binary: Path
    containerd: Containerd

    def argv(self, *args: str) -> list[str]:
        endpoint = f"unix://{self.containerd.address}"
        return ["nsenter", f"--net={self.containerd.netns_path}", "--", str(self.binary),
                "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                "--timeout", CRICTL_CALL_TIMEOUT, *args]

    def run(self, *args: str, timeout: float = RUN_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs one crictl command to completion; with check, a non-zero exit raises HarnessError."""
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise HarnessError(f"crictl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    @contextlib.contextmanager
    def port_forward(self, pod_id: str, local_port: int, pod_port: int,
                     ready_timeout: float = PORT_FORWARD_READY_S) -> Iterator[PortForward]:
        """`crictl port-forward POD LOCAL:POD` in the background for the body of the with.

        local_port 0 lets crictl pick one (see .local_port). Returns once the listener
        accepts connections; crictl is stopped on exit, so nothing outlives the block.
        crictl gives up (exits) after the first connection the pod refuses: start the
        pod's server first.
        """
        spec = f"{local_port}:{pod_port}" if local_port else f":{pod_port}"
        # Append mode: crictl shares the file's offset with output(), whose seek(0)
        # would otherwise make crictl's next line overwrite its first.
        with tempfile.TemporaryFile(mode="a+b") as output:
            proc = subprocess.Popen(self.argv("port-forward", pod_id, spec), stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            fwd = PortForward(self.containerd, local_port, pod_port, proc, output)
            try:
                self._wait_listening(fwd, ready_timeout)
                yield fwd
            finally:
                _stop(proc)
                fwd._final_output = fwd.output()

    def _wait_listening(self, fwd: PortForward, timeout: float) -> None:
        """Waits for crictl's "Forwarding from 127.0.0.1:N" line, which it prints once it
        listens (so the port accepts connections from then on). Not a probe connection:
        each connection becomes a stream to the pod, and one the pod refuses (its server
        not up yet) makes crictl drop the whole forward and exit."""
        deadline = time.monotonic() + timeout
        while True:
            m = _FORWARDING.search(fwd.output())
            if m:
                fwd.local_port = int(m.group(1))
                return
            if fwd.proc.poll() is not None:
                raise HarnessError(f"crictl port-forward exited {fwd.proc.returncode}: {fwd.output().strip()}")
            if time.monotonic() >= deadline:
                raise HarnessError(f"crictl port-forward not listening after {timeout:.0f}s: {fwd.output().strip()}")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (crictl stops forwarding), then SIGKILL; reaped either way."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(PORT_FORWARD_STOP_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
