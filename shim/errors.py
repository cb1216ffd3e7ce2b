"""Domain errors raised inside the shim.

Modules raise these with a message naming the cause; only the task service
edge turns them into ttrpc/gRPC status codes (shim.task.errors).
"""
from __future__ import annotations


class HuskError(Exception):
    """Root of the shim's own errors."""


class NotFoundError(HuskError):
    pass


class AlreadyExistsError(HuskError):
    pass


class InvalidArgumentError(HuskError):
    pass


class FailedPreconditionError(HuskError):
    pass


class UnavailableError(HuskError):
    """A dependency (the VM, the agent) is gone or not reachable."""


class DeadlineExceededError(HuskError):
    pass


class ResourceExhaustedError(HuskError):
    """Out of something finite: the VM's vCPU or DIMM slots, its maximum size."""


class UnimplementedError(HuskError):
    pass


class InternalError(HuskError):
    pass
