"""Error → status mapping at the RPC edge, and the agent's startup settings."""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from agent.__main__ import kernel_cmdline, parse_args
from agent.errors import (AlreadyExistsError, CommandError, DeadlineError,
                          FailedPreconditionError, GuestError, InvalidArgumentError,
                          NotFoundError)
from agent.server import unix_path
from agent.service import unary


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    @unary
    async def Method(self, request: object) -> object:  # noqa: N802 - an RPC name
        raise self.error


@pytest.mark.parametrize("error, code", [
    (InvalidArgumentError("bad spec"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError("no c1"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError("c1 exists"), grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError("c1 is stopped"), grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineError("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (CommandError("crun create failed: x"), grpc.StatusCode.UNKNOWN),
    (GuestError("mount failed"), grpc.StatusCode.UNKNOWN),
])
async def test_domain_errors_map_to_codes(error: Exception, code: grpc.StatusCode) -> None:
    context = FakeContext()
    with pytest.raises(Aborted):
        await Failing(error).Method(object(), context)
    assert context.code == code
    assert context.details == str(error)


async def test_unexpected_errors_are_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    context = FakeContext()
    with caplog.at_level(logging.ERROR, logger="agent.service"), pytest.raises(Aborted):
        await Failing(KeyError("oops")).Method(object(), context)
    assert context.code == grpc.StatusCode.INTERNAL
    assert "Method" in context.details and "KeyError" in context.details
    assert any(r.exc_info for r in caplog.records)  # with its traceback


def test_kernel_cmdline(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 husk.transport=vsock husk.debug=1 quiet\n")
    assert kernel_cmdline(cmdline) == {"console": "ttyS0", "husk.transport": "vsock",
                                       "husk.debug": "1", "quiet": ""}
    assert kernel_cmdline(tmp_path / "missing") == {}


def test_arguments_and_addresses() -> None:
    args = parse_args(["--transport", "none", "--listen", "unix:///tmp/a.sock"])
    assert args.transport == "none"
    assert unix_path(args.listen) == Path("/tmp/a.sock")
    assert unix_path("unix:/run/husk/agent.sock") == Path("/run/husk/agent.sock")
    assert parse_args([]).transport is None  # then the kernel command line decides
    for bad in ("tcp:1.2.3.4:5", "unix:relative"):
        with pytest.raises(ValueError):
            unix_path(bad)
