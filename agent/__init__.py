"""husk-agent: the gRPC agent that runs as PID 1 inside a husk pod's VM."""

__version__ = "0.1.0"
