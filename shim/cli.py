"""``husk``: run one container in its own VM without containerd; manage direct volumes.

    husk run --rootfs DIR [-t] [-i] [--vcpus N] [--memory-mib M] -- CMD [ARG...]
    husk probe-accel
    husk check [--json] [--containerd-config PATH]
    husk env [--containerd-config PATH]
    husk exec [-t] [-i] POD [-- CMD [ARG...]]
    husk monitor [--listen HOST:PORT]
    husk direct-volume add --volume-path P --mount-info JSON
    husk direct-volume remove --volume-path P
    husk direct-volume stats --volume-path P
    husk direct-volume resize --volume-path P --size BYTES
    husk direct-volume publish --volume-path P --volume-id ID --annotations JSON ...

``run`` boots a VM, runs CMD from the local rootfs directory, streams its
output, and exits with its exit code. Ctrl-C (or SIGTERM) tears everything
down before exiting. ``check`` tests every host requirement (exit 1 when a pod
could not run); ``env`` prints the configuration and versions in effect as TOML.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
import termios
import time
import tty
from pathlib import Path
from collections.abc import Coroutine
from typing import Any

from shim import errors, oci
from shim.config import ConfigError, load_config
from shim.ops import check, console, env, pods
from shim.sandbox import manage
from shim.sandbox.description import PodDescription
from shim.ids import SANDBOXES_DIR
from shim.storage.directvolume import DirectVolumes, MountInfo, VolumeRecordError
from shim.storage.publish import CephAccess, decide, publish
from shim.sandbox.sandbox import Sandbox
from shim.vm.accel import probe

log = logging.getLogger("husk")

CONTAINER_ID = "main"
STDIN_CHUNK = 32 * 1024


@dataclasses.dataclass
class RunTimes:
    """Seconds since QEMU was spawned."""

    qmp_ready_s: float = 0.0
    agent_ready_s: float = 0.0
    container_started_s: float = 0.0
    first_output_s: float = 0.0


async def _copy_output(sandbox: Sandbox, stderr: bool, out: Any, times: RunTimes) -> None:
    assert sandbox.agent is not None and sandbox.vm is not None
    async for chunk in sandbox.agent.read_output(CONTAINER_ID, "", stderr=stderr):
        if chunk and not times.first_output_s:
            times.first_output_s = time.monotonic() - sandbox.vm.times.spawned_at
        out.write(chunk)
        out.flush()


async def _copy_stdin(sandbox: Sandbox) -> None:
    assert sandbox.agent is not None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", 0))
    try:
        while data := await reader.read(STDIN_CHUNK):
            await sandbox.agent.write_stdin(CONTAINER_ID, "", data)
        await sandbox.agent.close_stdin(CONTAINER_ID, "")
    finally:
        transport.close()


def _forward_window_size(sandbox: Sandbox) -> None:
    """Send the terminal's size now and on every SIGWINCH."""
    loop = asyncio.get_running_loop()

    def resize() -> None:
        assert sandbox.agent is not None
        size = os.get_terminal_size(0)
        loop.create_task(sandbox.agent.tty_resize(CONTAINER_ID, "", size.lines, size.columns))

    resize()
    loop.add_signal_handler(signal.SIGWINCH, resize)


async def run_container(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    overrides = {k: str(v) for k, v in (("io.husk.vcpus", args.vcpus),
                                         ("io.husk.memory_mib", args.memory_mib)) if v}
    config = config.with_pod_annotations(overrides)
    if args.debug:
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime,
                                                                          debug=True))
    sandbox = Sandbox(PodDescription(f"run-{secrets.token_hex(6)}", hostname=args.hostname), config)
    times = RunTimes()
    try:
        await sandbox.start()
        assert sandbox.agent is not None and sandbox.vm is not None
        times.qmp_ready_s = sandbox.times.qmp_ready_s
        times.agent_ready_s = sandbox.times.agent_ready_s
        root = sandbox.shared.bind_rootfs(CONTAINER_ID, Path(args.rootfs).resolve(),
                                          readonly=args.readonly)
        spec = oci.default_spec(args.command, root, args.hostname, env=args.env,
                                cwd=args.cwd, terminal=args.tty, readonly_root=args.readonly)
        await sandbox.agent.create_container(CONTAINER_ID, spec,
                                             close_stdin=not args.interactive)
        copies = [asyncio.create_task(_copy_output(sandbox, False, sys.stdout.buffer, times))]
        if not args.tty:
            copies.append(asyncio.create_task(
                _copy_output(sandbox, True, sys.stderr.buffer, times)))
        await sandbox.agent.start_container(CONTAINER_ID)
        spawned = sandbox.vm.times.spawned_at
        times.container_started_s = time.monotonic() - spawned
        stdin_task = asyncio.create_task(_copy_stdin(sandbox)) if args.interactive else None
        if args.tty and sys.stdin.isatty():
            _forward_window_size(sandbox)
        status = await sandbox.agent.wait_process(CONTAINER_ID, "")
        await asyncio.gather(*copies)
        if stdin_task:
            stdin_task.cancel()
        if args.timings:
            print(json.dumps({"accel": sandbox.accel.accel.value if sandbox.accel else "",
                              **dataclasses.asdict(times), "pids": sandbox.pids()}),
                  file=sys.stderr)
        await sandbox.agent.remove_container(CONTAINER_ID)
        return status
    finally:
        await asyncio.shield(sandbox.stop())


async def _until_signalled(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; SIGTERM cancels it like Ctrl-C does (its cleanup still runs)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await work


def _main_run(args: argparse.Namespace) -> int:
    if not args.command:
        print("husk run: no command given (husk run --rootfs DIR -- CMD...)", file=sys.stderr)
        return 2
    saved_tty = None
    if args.tty and sys.stdin.isatty():
        saved_tty = termios.tcgetattr(0)
        tty.setraw(0)
    runner = asyncio.Runner()
    try:
        return runner.run(_until_signalled(run_container(args)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("husk run: interrupted; the VM was stopped", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"husk run: configuration error: {exc}", file=sys.stderr)
        return 2
    except errors.HuskError as exc:
        print(f"husk run: {exc}", file=sys.stderr)
        return 125
    finally:
        runner.close()
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)


def _main_probe(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    choice = asyncio.run(probe(config.hypervisor.qemu_path))
    print(json.dumps({"accel": choice.accel.value, "reason": choice.reason}))
    return 0


def _main_check(args: argparse.Namespace) -> int:
    report = check.run_checks(args.config, Path(args.containerd_config))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def _main_env(args: argparse.Namespace) -> int:
    print(env.render(args.config, Path(args.containerd_config)), end="")
    return 0


def _main_exec(args: argparse.Namespace) -> int:
    """A shell or a command in a pod's guest, outside its containers (the debug console)."""
    config = load_config(args.config)
    shell = not args.command
    interactive = sys.stdin.isatty()
    options = console.ConsoleOptions(tuple(args.command), tty=args.tty or (shell and interactive),
                                     stdin=args.interactive or (shell and interactive))
    try:
        run_dir = pods.resolve_pod(Path(config.runtime.state_dir), args.pod)
        return asyncio.run(console.run(run_dir, options, sys.stdout.buffer))
    except errors.HuskError as exc:
        print(f"husk exec: {exc}", file=sys.stderr)
        return 125


def _main_monitor(args: argparse.Namespace) -> int:
    from shim.ops import monitor  # prometheus_client: only this command needs it
    config = load_config(args.config)
    try:
        return monitor.serve(Path(config.runtime.state_dir), args.listen or config.monitor.listen)
    except (ConfigError, OSError) as exc:
        print(f"husk monitor: {exc}", file=sys.stderr)
        return 2


def _main_direct_volume(args: argparse.Namespace) -> int:
    """Kata's ``direct-volume`` verbs, on husk's (or the configured) record directory."""
    config = load_config(args.config)
    volumes = DirectVolumes(Path(config.storage.direct_volumes_dir))
    try:
        if args.verb in ("stats", "resize"):
            sandbox_id = volumes.user(args.volume_path)
            if sandbox_id is None:
                raise VolumeRecordError(f"no running pod uses {args.volume_path}")
            request: dict[str, Any] = {"op": f"volume-{args.verb}", "volume_path": args.volume_path}
            if args.verb == "resize":
                request["size"] = args.size
            reply = manage.call(Path(config.runtime.state_dir) / SANDBOXES_DIR / sandbox_id,
                                request)
            if not reply.get("ok"):
                raise VolumeRecordError(str(reply.get("error"))[:2000])
            print(json.dumps(reply.get("stats", {})))
        elif args.verb == "add":
            print(volumes.add(args.volume_path, MountInfo.from_json(args.mount_info)))
        elif args.verb == "remove":
            volumes.remove(args.volume_path)
        elif args.verb == "publish":
            ceph = (CephAccess(args.ceph_user, args.ceph_key_file, tuple(args.ceph_monitor))
                    if args.ceph_user or args.ceph_key_file else None)
            info = decide(_json_map(args.annotations, "--annotations"),
                          _json_map(args.volume_context, "--volume-context"), args.volume_id,
                          args.device, args.fstype, args.option, ceph)
            record = publish(volumes, args.volume_path, info)
            print(json.dumps({"direct": info is not None,
                              "volume-type": info.volume_type if info else "",
                              "record": str(record) if record else ""}))
    except (VolumeRecordError, OSError, errors.HuskError) as exc:
        print(f"husk direct-volume {args.verb}: {exc}", file=sys.stderr)
        return 1
    return 0


def _json_map(text: str, what: str) -> dict[str, str]:
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise VolumeRecordError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise VolumeRecordError(f"{what} must be a JSON object")
    return {str(k): str(v) for k, v in value.items()}


def _direct_volume_parser(sub: Any) -> None:
    volume = sub.add_parser("direct-volume", help="direct-volume records (Kata-compatible)")
    verbs = volume.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="write a record: the volume reaches the VM as a disk")
    add.add_argument("--volume-path", required=True)
    add.add_argument("--mount-info", required=True, help="JSON: volume-type, device, fstype, "
                                                         "metadata, options")
    remove = verbs.add_parser("remove", help="delete a record")
    remove.add_argument("--volume-path", required=True)
    stats = verbs.add_parser("stats", help="the guest's usage of a volume of a running pod")
    stats.add_argument("--volume-path", required=True)
    resize = verbs.add_parser("resize", help="grow a volume of a running pod (its disk, then "
                                             "its filesystem in the guest)")
    resize.add_argument("--volume-path", required=True)
    resize.add_argument("--size", required=True, type=int, help="the new size in bytes")
    pub = verbs.add_parser("publish", help="for a CSI node plugin at NodePublishVolume: write "
                                           "a record if the PVC asks for direct mode")
    pub.add_argument("--volume-path", required=True, help="the target path the kubelet gave")
    pub.add_argument("--volume-id", default="")
    pub.add_argument("--annotations", default="{}", help="the PVC's annotations, JSON")
    pub.add_argument("--volume-context", default="{}", help="the CSI volume context, JSON")
    pub.add_argument("--device", default="", help="the staged host block device (block mode)")
    pub.add_argument("--fstype", default="")
    pub.add_argument("--option", action="append", default=[], help="a mount option")
    pub.add_argument("--ceph-user", default="", help="rbd mode: the cephx user (without client.)")
    pub.add_argument("--ceph-key-file", default="", help="rbd mode: a root-only file with its key")
    pub.add_argument("--ceph-monitor", action="append", default=[],
                     help="rbd mode: host:port (default: from ceph-csi's config by clusterID)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="husk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="husk.toml to use (default: $HUSK_CONFIG, "
                                         "/etc/husk/husk.toml)")
    parser.add_argument("--debug", action="store_true", help="verbose logs, guest debug")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run one container in a fresh VM")
    run.add_argument("--rootfs", required=True, help="directory holding the container's rootfs")
    run.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    run.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    run.add_argument("--readonly", action="store_true", help="read-only rootfs")
    run.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE")
    run.add_argument("-w", "--cwd", default="/", help="working directory in the container")
    run.add_argument("--hostname", default="husk")
    run.add_argument("--vcpus", type=int, help="vCPUs for this VM")
    run.add_argument("--memory-mib", type=int, help="memory for this VM, MiB")
    run.add_argument("--timings", action="store_true",
                     help="print boot timings as JSON on stderr")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("probe-accel", help="show which accelerator husk would use, and why")
    checker = sub.add_parser(
        "check", help="test every host requirement: pass, warn (degraded) or fail, with the "
                      "fix; exit 1 when a pod could not run")
    checker.add_argument("--json", action="store_true", help="one JSON object, for tools")
    environ = sub.add_parser(
        "env", help="the configuration and versions in effect, as TOML (format: README, "
                    "'Operating husk'; no secrets), for a bug report",
        description=env.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for inspecting in (checker, environ):
        inspecting.add_argument("--containerd-config", default=str(check.DEFAULT_CONTAINERD_CONFIG),
                                help="containerd's config to inspect (versions 2 and 3)")
    execute = sub.add_parser(
        "exec", help="run a shell (default) or CMD in a pod's guest, outside its containers; "
                     "needs [debug] console = true in husk.toml")
    execute.add_argument("-t", "--tty", action="store_true",
                         help="a terminal for CMD (a shell gets one when stdin is a terminal)")
    execute.add_argument("-i", "--interactive", action="store_true",
                         help="forward stdin to CMD (a shell gets it when stdin is a terminal)")
    execute.add_argument("pod", help="sandbox id, a unique prefix of it, or the pod's name "
                                     "(NAME or NAMESPACE/NAME)")
    execute.add_argument("command", nargs=argparse.REMAINDER)
    watcher = sub.add_parser("monitor", help="serve Prometheus metrics of every husk pod on "
                                             "this node (like kata-monitor)")
    watcher.add_argument("--listen", help="HOST:PORT (default: husk.toml [monitor] listen)")
    _direct_volume_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="husk: %(levelname)s %(name)s: %(message)s")
    # qemu.qmp logs every QMP message at DEBUG and each disconnect at INFO.
    logging.getLogger("qemu.qmp").setLevel(logging.INFO if args.debug else logging.WARNING)
    logging.getLogger("grpc").setLevel(logging.INFO)  # its DEBUG is a line per call
    if args.action == "probe-accel":
        return _main_probe(args)
    if args.action == "direct-volume":
        return _main_direct_volume(args)
    if args.action == "check":
        return _main_check(args)
    if args.action == "env":
        return _main_env(args)
    if args.action == "exec":
        return _main_exec(args)
    if args.action == "monitor":
        return _main_monitor(args)
    return _main_run(args)


if __name__ == "__main__":
    sys.exit(main())
