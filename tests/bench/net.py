"""make bench-net: TCP throughput and round-trip latency of husk pods against runc pods.

One containerd, both handlers, one handler after the other so each is measured
alone: a server pod and a client pod are booted once, then BENCH_RUNS rounds
(default 5) of four measurements, medians printed as JSON (and written to
build/bench/net.json) with the husk/runc ratios and every run's raw value:

- pod_to_pod: the client container talks to the server pod's IP across the
  bridge, timed by the client's own clock (adjtimex; busybox's date has no
  %N), so ExecSync's round trip into a VM is not in the figures;
- node_to_pod: this process, with sockets made in containerd's netns (the
  pods' node), talks to the same server.

Busybox only in the containers. Its nc relays through a 1 KiB buffer, which
would measure nc rather than the network, so nc only connects and hands the
socket to the real ends with -e: dd writes 64 KiB blocks straight into it and
dd reads them out on the server; sh's `echo`/`read` and cat are the echo ends.
runc's latency swings with whether the scheduler puts both ends on one CPU (a
wakeup across CPUs costs several times more in a VM host); the raw runs show it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tests.bench import emit, machine
from tests.conftest import write_test_config
from tests.cri.cri import CriClient, Pod
from tests.cri.harness import REPO_ROOT, Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
HANDLERS = ("runc", "husk")
PATHS = ("pod_to_pod", "node_to_pod")
# Metric -> decimals kept in the JSON.
METRICS = {"throughput_mbit_s": 1, "latency_ms": 4}
OUTPUT = REPO_ROOT / "build" / "bench" / "net.json"

SINK_PORT = 5001
ECHO_PORT = 5002
BLOCK = 64 << 10
# What one latency request is (the same on both paths).
REQUEST = ("one round trip of 2 bytes (\"x\\n\") echoed by cat in the server pod, "
           "sequential, on one established TCP connection (connection setup excluded)")

# In-container clock in microseconds (adjtimex prints the realtime clock to the µs).
CLOCK_FN = """clock() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d%06d", s, u}'; }"""
# The server: per connection, the sink reads "<blocks>\n" then exactly that many blocks
# and answers with dd's "N+0 records in"; the echo port returns every byte.
SERVER = (f"nc -ll -p {SINK_PORT} -e sh -c "
          f"'read n; exec dd of=/dev/null bs={BLOCK} count=\"$n\" iflag=fullblock 2>&1' & "
          f"exec nc -ll -p {ECHO_PORT} -e cat")
# Run by nc -e on the client with the socket as stdin/stdout and $1 = blocks; the
# result ("<start_us> <end_us> <sink's answer>") goes to stderr.
SEND = CLOCK_FN + f"""
t0=$(clock); echo "$1"; dd if=/dev/zero bs={BLOCK} count="$1" 2>/dev/null
answer=$(cat); echo "$t0 $(clock) $answer" >&2"""
# $1 = requests; one warm-up round trip (the connection is up by then), then the timed ones.
PING = CLOCK_FN + """
echo x; read -r _ || exit 1
t0=$(clock); i=0
while [ "$i" -lt "$1" ]; do echo x; read -r _ || exit 1; i=$((i+1)); done
echo "$t0 $(clock)" >&2"""
RECORDS_IN = re.compile(r"(\d+)\+(\d+) records in")

LISTEN_TIMEOUT_S = 60.0
EXEC_TIMEOUT_S = 300
SOCKET_TIMEOUT_S = 300.0
NODE_SEND_CHUNK = 1 << 20


@dataclass(frozen=True)
class Workload:
    """What one round sends: the same for both handlers, so the figures compare directly."""

    payload_mib: int
    requests: int

    @property
    def blocks(self) -> int:
        return self.payload_mib * (1 << 20) // BLOCK


# Sized for husk under TCG: ~10 s a round here (a runc round takes under a second).
WORKLOAD = Workload(payload_mib=512, requests=2000)
# One untimed round first: under TCG the first run of nc/dd/sh code pays for its translation.
WARMUP = Workload(payload_mib=4, requests=20)


@dataclass(frozen=True)
class PodPair:
    server: Pod
    client: Pod
    server_ip: str
    client_cid: str


@dataclass(frozen=True)
class Round:
    """One run's figures, named <path>_<metric>."""

    pod_to_pod_throughput_mbit_s: float
    pod_to_pod_latency_ms: float
    node_to_pod_throughput_mbit_s: float
    node_to_pod_latency_ms: float


def _mbit_s(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


def _wait_listening(cri: CriClient, cid: str, ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while time.monotonic() < deadline:
        out = cri.exec_sync(cid, ["netstat", "-ltn"], timeout=30).out
        if all(f":{p} " in out for p in ports):
            return
        time.sleep(0.2)
    raise RuntimeError(f"server container {cid} is not listening on {ports}")


@contextlib.contextmanager
def pod_pair(cri: CriClient, handler: str) -> Iterator[PodPair]:
    """A server and a client pod of `handler`; both stopped and removed on the way out."""
    pods: list[Pod] = []
    try:
        for role in ("server", "client"):
            pods.append(cri.run_pod(f"bench-net-{role}-{handler}", handler=handler))
        server, client = pods
        scid = cri.run_container(server, BUSYBOX_REF, ["sh", "-c", SERVER])
        ccid = cri.run_container(client, BUSYBOX_REF, ["sleep", "86400"])
        _wait_listening(cri, scid, (SINK_PORT, ECHO_PORT))
        yield PodPair(server, client, cri.pod_ips(server.id)[0], ccid)
    finally:
        for pod in reversed(pods):
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)


def _client_exec(cri: CriClient, pair: PodPair, port: int, script: str, arg: int) -> list[str]:
    """Runs `script` under nc -e in the client container; its stderr line, split."""
    result = cri.exec_sync(pair.client_cid, ["nc", pair.server_ip, str(port), "-e",
                                             "sh", "-c", script, "sh", str(arg)],
                           timeout=EXEC_TIMEOUT_S)
    fields = result.err.split()
    if result.exit_code != 0 or len(fields) < 2 or not all(f.isdigit() for f in fields[:2]):
        raise RuntimeError(f"client run failed (exit {result.exit_code}): {result.out}{result.err}")
    return fields


def _check_sink_answer(answer: str, blocks: int) -> None:
    """The sink counted every block: the data really arrived, not just left the sender."""
    match = RECORDS_IN.search(answer)
    if match is None or (int(match[1]), int(match[2])) != (blocks, 0):
        raise RuntimeError(f"sink expected {blocks} blocks, answered {answer!r}")


def pod_to_pod_throughput(cri: CriClient, pair: PodPair, work: Workload) -> float:
    start, end, *answer = _client_exec(cri, pair, SINK_PORT, SEND, work.blocks)
    _check_sink_answer(" ".join(answer), work.blocks)
    return _mbit_s(work.blocks * BLOCK, (int(end) - int(start)) / 1e6)


def pod_to_pod_latency(cri: CriClient, pair: PodPair, work: Workload) -> float:
    start, end, *_ = _client_exec(cri, pair, ECHO_PORT, PING, work.requests)
    return (int(end) - int(start)) / 1e3 / work.requests


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def node_to_pod_throughput(cd: Containerd, pair: PodPair, work: Workload) -> float:
    """Same protocol as the pod's sender; timed until the sink's answer, so every byte arrived."""
    chunk = bytes(NODE_SEND_CHUNK)
    total = work.blocks * BLOCK
    with cd.connect(pair.server_ip, SINK_PORT, timeout=SOCKET_TIMEOUT_S) as sock:
        t0 = time.monotonic()
        sock.sendall(f"{work.blocks}\n".encode())
        for offset in range(0, total, NODE_SEND_CHUNK):
            sock.sendall(chunk[:min(NODE_SEND_CHUNK, total - offset)])
        answer = b""
        while data := sock.recv(4096):
            answer += data
        elapsed = time.monotonic() - t0
    _check_sink_answer(answer.decode(errors="replace"), work.blocks)
    return _mbit_s(total, elapsed)


def node_to_pod_latency(cd: Containerd, pair: PodPair, work: Workload) -> float:
    with cd.connect(pair.server_ip, ECHO_PORT, timeout=SOCKET_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"x\n")
        _recv_exactly(sock, 2)  # warm-up, as in the pod's loop
        t0 = time.monotonic()
        for _ in range(work.requests):
            sock.sendall(b"x\n")
            _recv_exactly(sock, 2)
        return (time.monotonic() - t0) * 1e3 / work.requests


def one_round(cd: Containerd, pair: PodPair, work: Workload) -> Round:
    return Round(pod_to_pod_throughput_mbit_s=pod_to_pod_throughput(cd.cri, pair, work),
                 pod_to_pod_latency_ms=pod_to_pod_latency(cd.cri, pair, work),
                 node_to_pod_throughput_mbit_s=node_to_pod_throughput(cd, pair, work),
                 node_to_pod_latency_ms=node_to_pod_latency(cd, pair, work))


def measure(cd: Containerd, handler: str) -> tuple[list[Round], str]:
    """RUNS rounds on one booted pod pair; also the client's kernel (the guest's for husk)."""
    with pod_pair(cd.cri, handler) as pair:
        kernel = cd.cri.exec_sync(pair.client_cid, ["uname", "-r"]).out.strip()
        one_round(cd, pair, WARMUP)
        rounds = []
        for i in range(RUNS):
            rounds.append(one_round(cd, pair, WORKLOAD))
            print(f"{handler} {i + 1}/{RUNS}: {json.dumps(asdict(rounds[-1]))}", file=sys.stderr)
        return rounds, kernel


def summary(rounds: dict[str, list[Round]], key: str, digits: int) -> dict[str, Any]:
    """One metric: the median per handler, husk/runc (4 significant digits) and every run."""
    runs = {h: [getattr(r, key) for r in rounds[h]] for h in HANDLERS}
    med = {h: statistics.median(values) for h, values in runs.items()}
    return {**{h: round(v, digits) for h, v in med.items()},
            "ratio": float(f"{med['husk'] / med['runc']:.4g}"),
            "runs": {h: [round(v, digits) for v in values] for h, values in runs.items()}}


def main() -> int:
    if RUNS < 1:
        raise SystemExit("BENCH_RUNS must be at least 1")
    started = time.monotonic()
    with scratch_dirs("bnet") as (work, state):
        config = write_test_config(work / "husk.toml", state)
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info")
        rounds: dict[str, list[Round]] = {}
        kernels: dict[str, str] = {}
        with Containerd.started(options) as cd:
            for handler in HANDLERS:
                rounds[handler], kernels[handler] = measure(cd, handler)
        result: dict[str, Any] = {
            "benchmark": "net",
            "machine": {**machine(state), "guest_kernel": kernels["husk"]},
            "runs": RUNS,
            **{path: {metric: summary(rounds, f"{path}_{metric}", digits)
                      for metric, digits in METRICS.items()} for path in PATHS},
            "method": {
                "throughput": (f"{BLOCK >> 10} KiB blocks of zeros over one TCP connection to dd in "
                               "the server pod, timed until the server confirmed every block; "
                               "pod_to_pod from dd in the client pod, node_to_pod from "
                               "containerd's netns (this process)"),
                "latency_request": REQUEST,
                "clock": "pod_to_pod: the client container's (adjtimex); node_to_pod: this process's",
                "workload": asdict(WORKLOAD),
            },
            "seconds": round(time.monotonic() - started, 1),
        }
        emit(result, OUTPUT)
        return 0


if __name__ == "__main__":
    sys.exit(main())
