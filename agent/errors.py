"""The agent's domain errors; service.py alone turns them into gRPC status codes."""
from __future__ import annotations


class AgentError(Exception):
    """Root of the errors the agent reports to the host as a request failure."""


class InvalidArgumentError(AgentError):
    """The request is malformed: bad JSON, a bad spec, a path escaping its root."""


class NotFoundError(AgentError):
    """An unknown sandbox, container or exec, or a process that already finished."""


class AlreadyExistsError(AgentError):
    """The id is already in use."""


class FailedPreconditionError(AgentError):
    """The object is in the wrong state for the request (start a running container...)."""


class CommandError(AgentError):
    """An external command (crun) failed; the message carries its own error text."""


class GuestError(AgentError):
    """A guest operation failed: a mount, the hostname, writing a file."""


class DeadlineError(AgentError):
    """Something did not happen in time (a command hung, a device never appeared)."""
