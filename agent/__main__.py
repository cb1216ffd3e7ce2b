"""husk-agent's entry point: arguments, logging, PID-1 duties, starting everything.

In the guest, /sbin/init execs ``python3 -m agent`` as PID 1: the agent then
reaps every orphan (see process.Reaper) and must never exit, since PID 1
exiting panics the kernel; a fatal startup error powers the VM off instead.
Run any other way (tests, husk.debug=1) it makes itself a child subreaper so
container processes are still reparented to it.

Settings come from the arguments, else the kernel command line:
``husk.transport=serial|vsock`` (default serial) and ``husk.debug=1``.
``husk.test_hooks=1`` (test configs only) enables agent.testhooks.
``husk.template=1``: this guest becomes a VM template (shim.sandbox.template);
the agent loads what pods need before it serves, so restored guests have it.
``husk.page_reporting_order=N``: free page reporting in blocks of 2**N pages
(default: the kernel's, 2 MiB; a template reports single pages; agent.balloon).
"""
from __future__ import annotations

import sys

# The agent serves no TLS: asyncio imports ssl only to offer it, and OpenSSL's
# set-up took ~1.2 MiB of every guest's memory. (Before asyncio is imported.)
if "asyncio" not in sys.modules:
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from agent import __version__, balloon, testhooks
from agent.channel import (AGENT_PORT_NAME, LOG_PORT_NAME, PortLogHandler, SerialBridge,
                           VsockBridge, find_virtio_port, wait_for_port)
from agent.config import (DEFAULT_CGROUP_PARENT, DEFAULT_CGROUP_ROOT, DEFAULT_SHARED_DIR,
                          DEFAULT_STATE_DIR, AgentConfig)
from agent.container import Runtime
from agent.process import Reaper
from agent.runtime import Crun
from agent.server import DEFAULT_LISTEN, start_server, unix_path
from agent.service import AgentService

log = logging.getLogger("agent")

TRANSPORTS = ("serial", "vsock", "none")
DEFAULT_TRANSPORT = "serial"
KERNEL_CMDLINE = Path("/proc/cmdline")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_FORMAT = "husk-agent %(asctime)s %(levelname)s %(name)s: %(message)s"
SHUTDOWN_TIMEOUT_S = 15.0
SERVER_STOP_GRACE_S = 1.0
BRIDGE_RESTART_DELAY_S = 1.0
PR_SET_CHILD_SUBREAPER = 36
RB_POWER_OFF = 0x4321FEDC


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="husk-agent", description=__doc__.splitlines()[0])
    p.add_argument("--transport", choices=TRANSPORTS,
                   help="how the host reaches the agent (default: husk.transport= on the "
                        f"kernel command line, else {DEFAULT_TRANSPORT}); none: only the unix socket")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="gRPC address, unix:<path>")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="bundles, crun state, console sockets")
    p.add_argument("--shared-dir", type=Path, default=DEFAULT_SHARED_DIR,
                   help="container rootfs root when the sandbox mounts no shared filesystem")
    p.add_argument("--crun", default="crun", help="the OCI runtime binary")
    p.add_argument("--cgroup-root", type=Path, default=DEFAULT_CGROUP_ROOT)
    p.add_argument("--cgroup-parent", default=DEFAULT_CGROUP_PARENT,
                   help="containers' cgroups are /<parent>/<container id>")
    p.add_argument("--resolv-conf", type=Path,
                   help="where CreateSandbox writes DNS (default: /etc/resolv.conf if writable, "
                        "else <state-dir>/resolv.conf)")
    p.add_argument("--debug", action="store_true", help="debug logging (also husk.debug=1)")
    p.add_argument("--version", action="version", version=f"husk-agent {__version__}")
    return p.parse_args(argv)


def kernel_cmdline(path: Path = KERNEL_CMDLINE) -> dict[str, str]:
    """``key=value`` words of the kernel command line (bare words map to "")."""
    try:
        words = path.read_text().split()
    except OSError:
        return {}
    return {k: v for k, _, v in (w.partition("=") for w in words)}


def configure_logging(debug: bool, log_port: Path | None) -> PortLogHandler | None:
    """Log to stderr (the console) always, and to the log port when there is one.

    Returns the log port's handler, if the port could be opened.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    root.addHandler(console)
    handler: PortLogHandler | None = None
    if log_port is not None:
        try:
            handler = PortLogHandler(log_port)
        except OSError as e:
            log.warning("cannot open the log port %s: %s", log_port, e)
        else:
            handler.setFormatter(formatter)
            root.addHandler(handler)
    # gRPC's own debug chatter is not ours.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    return handler


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def become_subreaper() -> None:
    """Orphans below us (container processes after crun exits) become our children."""
    if _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def power_off() -> None:
    """PID 1 must not exit (kernel panic): stop the VM so the host notices."""
    os.sync()
    _libc().reboot(RB_POWER_OFF)


async def _keep_running(name: str, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a bridge; if it fails, log and start it again (the agent outlives it)."""
    while True:
        try:
            await start()
            log.warning("%s stopped; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the bridge must come back
            log.exception("%s failed; restarting it", name)
        await asyncio.sleep(BRIDGE_RESTART_DELAY_S)


def _bridge(transport: str, socket_path: str) -> Callable[[], Coroutine[Any, Any, None]] | None:
    if transport == "vsock":
        return lambda: VsockBridge(socket_path).run()
    if transport == "serial":
        async def serial() -> None:
            await SerialBridge(await wait_for_port(AGENT_PORT_NAME), socket_path).run()
        return serial
    return None


async def serve(args: argparse.Namespace, config: AgentConfig, transport: str,
                hooks: testhooks.Hooks | None = None, warm_up: bool = False,
                reporting_order: int | None = None) -> None:
    """Start the reaper, the gRPC server and the bridge; run until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    reaper = Reaper()
    reaper.start()
    reporting: asyncio.Task[bool] | None = None
    restored_order: int | None = None
    if warm_up:
        restored_order = await balloon.warm_up_for_template(reaper, reporting_order)
    else:
        reporting = asyncio.create_task(balloon.start_free_page_reporting(reaper, reporting_order))
    for directory in (config.state_dir, config.crun_root, config.bundles_dir):
        directory.mkdir(parents=True, exist_ok=True)
    runtime = Runtime(config, Crun(config.crun, config.crun_root, reaper), reaper)
    # A restored template guest's first CreateSandbox ends the template's single-page reporting.
    service = AgentService(runtime, hooks, on_first_sandbox=(
        functools.partial(balloon.set_reporting_order, restored_order)
        if restored_order is not None else None))
    server = await start_server(service, args.listen, hooks)
    if hooks is not None:
        await hooks.start()
    bridge_start = _bridge(transport, str(unix_path(args.listen)))
    bridge = (asyncio.create_task(_keep_running(f"{transport} bridge", bridge_start))
              if bridge_start is not None else None)
    stop = asyncio.Event()
    if os.getpid() != 1:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    # As the VM's init the agent takes no signal: containers that share the
    # guest's PID namespace could send it one, and the host stops the VM itself.
    log.info("husk-agent %s ready (pid %d, transport %s)", __version__, os.getpid(), transport)
    await stop.wait()

    log.info("stopping: removing containers")
    if reporting is not None and not reporting.done():
        reporting.cancel()
    if bridge is not None:
        bridge.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bridge
    try:
        await asyncio.wait_for(service.shutdown(), SHUTDOWN_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - stopping anyway
        log.exception("cleanup on shutdown failed")
    if hooks is not None:
        await hooks.stop()
    await server.stop(SERVER_STOP_GRACE_S)
    reaper.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = kernel_cmdline()
    transport = args.transport or cmdline.get("husk.transport") or DEFAULT_TRANSPORT
    port_log = configure_logging(args.debug or cmdline.get("husk.debug") == "1",
                                 find_virtio_port(LOG_PORT_NAME) if transport != "none" else None)
    # A virtio-serial port opens only once: log-flood writes on the handler's fd.
    hooks = testhooks.from_cmdline(cmdline, port_log._fd if port_log is not None else None)
    if transport not in TRANSPORTS:
        log.error("unknown husk.transport=%s; using %s", transport, DEFAULT_TRANSPORT)
        transport = DEFAULT_TRANSPORT
    os.environ.setdefault("PATH", DEFAULT_PATH)
    pid1 = os.getpid() == 1
    if pid1:
        # Python's KeyboardInterrupt handler would let a container's `kill -INT 1`
        # end the agent. With SIG_DFL the kernel drops it: init ignores signals it
        # has no handler for (and children still start with the default).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    else:
        become_subreaper()
    config = AgentConfig(state_dir=args.state_dir, shared_dir=args.shared_dir, crun=args.crun,
                         cgroup_root=args.cgroup_root, cgroup_parent=args.cgroup_parent,
                         resolv_conf=args.resolv_conf)
    status = 0
    try:
        asyncio.run(serve(args, config, transport, hooks,
                          warm_up=cmdline.get("husk.template") == "1",
                          reporting_order=balloon.reporting_order(cmdline)))
        log.info("husk-agent stopped")
    except BaseException:  # noqa: BLE001 - PID 1 must not die
        log.critical("husk-agent failed", exc_info=True)
        status = 1
    if pid1:
        power_off()
    return status


if __name__ == "__main__":
    sys.exit(main())
