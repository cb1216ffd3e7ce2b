"""Boots a built guest image under QEMU and times it: the host-side half of
selftest.sh.

Owns: the reference QEMU command line for the image, timestamping the serial
console, and reading the self-test verdict. Standard library only.

    python3 guest-image/boottest.py build/guest            # self-test, prints timings
    python3 guest-image/boottest.py build/guest --runs 3   # repeat, report the median
    python3 guest-image/boottest.py build/guest --selftest=no --append husk.debug=1

Exits 0 when every run printed "husk-selftest: PASS".
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# The kernel command line the launcher should use (plus husk.* options).
KERNEL_CMDLINE = ("console=ttyS0 root=/dev/vda quiet panic=-1 "
                  "mitigations=off cryptomgr.notests 8250.nr_uarts=1")
BOOT_TIMEOUT_S = 180.0
UPTIME_RE = re.compile(r"uptime ([0-9.]+)s")
MARKERS = {
    "init": "husk-init: started",
    "grpc": "husk-selftest: import grpc, google.protobuf done",
    "pass": "husk-selftest: PASS",
    "fail": "husk-selftest: FAIL (",
    "agent": "husk-init: starting the agent",
}


@dataclass
class BootResult:
    """What one boot printed, each line with seconds since QEMU was started."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    # QEMU's CPU time (all threads) at each mark: unlike wall time it does not
    # grow when other work on the host competes for the CPU.
    cpu_marks: dict[str, float] = field(default_factory=dict)
    exit_s: float | None = None
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return "pass" in self.marks and "fail" not in self.marks


def qemu_command(image_dir: Path, kernel: str, append: str, memory_mib: int,
                 accel: str, extra: list[str]) -> list[str]:
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", accel,
        "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(image_dir / kernel),
        "-initrd", str(image_dir / "initrd.img"),
        "-append", append,
        "-drive", f"file={image_dir / 'rootfs.img'},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root",
        *extra,
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, in seconds (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" closing the command name, utime and stime are fields 12 and 13.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def boot(cmd: list[str], timeout_s: float, echo: bool) -> BootResult:
    """Runs QEMU to completion (the guest powers itself off) or kills it at the deadline."""
    result = BootResult()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while True:
            remaining = start + timeout_s - time.monotonic()
            if remaining <= 0:
                logger.error("guest did not power off within %.0fs: killing QEMU", timeout_s)
                break
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic() - start
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").rstrip("\r")
                result.lines.append((now, line))
                if echo:
                    print(f"[{now:7.3f}] {line}", flush=True)
                for name, marker in MARKERS.items():
                    if marker in line and name not in result.marks:
                        result.marks[name] = now
                        result.cpu_marks[name] = cpu_seconds(proc.pid)
                        uptime = UPTIME_RE.search(line)
                        if name == "init" and uptime:
                            # The guest clock starts with the kernel: the rest is
                            # QEMU start-up, firmware and loading the kernel.
                            result.marks["kernel"] = now - float(uptime.group(1))
                            result.cpu_marks["kernel"] = 0.0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        result.returncode = proc.wait()
        result.exit_s = time.monotonic() - start
        proc.stdout.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir", type=Path, help="directory with vmlinuz, initrd.img, rootfs.img")
    parser.add_argument("--append", default="", help="extra kernel command line words")
    parser.add_argument("--kernel", choices=("vmlinux", "vmlinuz"), default="vmlinux",
                        help="vmlinux boots via PVH (no decompression), vmlinuz is the bzImage")
    parser.add_argument("--selftest", choices=("yes", "no"), default="yes")
    parser.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                        help="extra QEMU argument (repeat it; e.g. --qemu-arg=-device --qemu-arg=...)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S)
    parser.add_argument("--quiet", action="store_true", help="do not echo the console")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="boottest: %(message)s")

    append = KERNEL_CMDLINE
    if args.selftest == "yes":
        append += " husk.selftest=1"
    if args.append:
        append += " " + args.append
    cmd = qemu_command(args.image_dir, args.kernel, append, args.memory, args.accel, args.qemu_arg)
    logger.info("%s", " ".join(cmd))

    results = []
    for run in range(args.runs):
        res = boot(cmd, args.timeout, echo=not args.quiet)
        results.append(res)
        marks = " ".join(f"{k}={v:.2f}s" + (f"(cpu {res.cpu_marks[k]:.2f}s)" if k != "kernel" else "")
                         for k, v in sorted(res.marks.items(), key=lambda kv: kv[1]))
        logger.info("run %d: %s qemu-exit=%.2fs rc=%s %s", run + 1, marks, res.exit_s,
                    res.returncode, "PASS" if res.passed else "no PASS")
    for name in ("kernel", "init", "grpc", "pass"):
        values = [r.marks[name] for r in results if name in r.marks]
        cpu = [r.cpu_marks[name] for r in results if name in r.cpu_marks]
        if values:
            logger.info("median QEMU start -> %s: %.2fs wall, %.2fs QEMU CPU (of %d)",
                        MARKERS.get(name, "kernel start (estimated)"),
                        statistics.median(values), statistics.median(cpu), len(values))
    if args.selftest == "yes":
        return 0 if all(r.passed for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
