"""containerd-shim-husk-v2: the entry point containerd runs.

    <shim> -namespace NS -address A -publish-binary B -id ID [-debug] start
    <shim> -namespace NS -address A -publish-binary B -id ID -bundle B [-debug] delete
    <shim> -info        (containerd 2.x; stdin: runtime options, stdout: RuntimeInfo)

``start`` and ``delete`` are the manager (shim.manager); ``serve`` is the
daemon that ``start`` spawns (shim.daemon). Flags use Go's syntax: one dash,
``-k v`` or ``-k=v``. Only the stdlib is imported before we know which action
runs: ``start`` runs once per container and must stay fast.
"""
from __future__ import annotations

import sys

BOOL_FLAGS = {"debug", "v", "version", "info"}
VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
ACTIONS = ("start", "delete", "serve")


class UsageError(ValueError):
    pass


class ShimArgs:
    """The parsed command line. A plain class, not a dataclass: ``dataclasses``
    imports ``inspect`` (~10 ms of every ``start`` and ``delete``, measured)."""

    def __init__(self) -> None:
        self.action = ""
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.version = False
        # containerd 2.x's introspection: a flag, not an action (old shims choke on
        # unknown actions), answered without an id.
        self.info = False

    def __repr__(self) -> str:
        return f"ShimArgs({vars(self)!r})"


def parse_args(argv: list[str]) -> ShimArgs:
    """Parse Go ``flag``-style arguments.

    :raise UsageError: an unknown flag, a missing value, or an unknown action.
    """
    args = ShimArgs()
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and token != "-":
            name, eq, value = token.lstrip("-").partition("=")
            if name in BOOL_FLAGS:
                on = value.lower() not in ("false", "0") if eq else True
                setattr(args, "version" if name in ("v", "version") else name, on)
            elif name in VALUE_FLAGS:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"flag -{name} needs a value")
                    value = argv[i]
                setattr(args, name.replace("-", "_"), value)
            else:
                raise UsageError(f"unknown flag -{name}")
        elif not args.action:
            if token not in ACTIONS:
                raise UsageError(f"unknown action {token!r} (expected start or delete)")
            args.action = token
        else:
            raise UsageError(f"unexpected argument {token!r}")
        i += 1
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"containerd-shim-husk-v2: {exc}", file=sys.stderr)
        return 2
    if args.version:
        from shim import SHIM_VERSION
        print(f"containerd-shim-husk-v2 {SHIM_VERSION}")
        return 0
    if args.info:
        from shim.info import InfoError, runtime_info
        try:
            sys.stdout.buffer.write(runtime_info(sys.stdin.buffer.read()))
        except InfoError as exc:
            print(f"containerd-shim-husk-v2: {exc}", file=sys.stderr)
            return 1
        sys.stdout.buffer.flush()
        return 0
    if not args.action or not args.id:
        print("containerd-shim-husk-v2: usage: -namespace NS -address A -id ID start|delete",
              file=sys.stderr)
        return 2
    if args.action == "serve":
        from shim import daemon
        return daemon.main(args)
    from shim import manager
    if args.action == "start":
        return manager.start(args)
    return manager.delete(args)


if __name__ == "__main__":
    sys.exit(main())
