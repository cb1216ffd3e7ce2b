"""Node operations: check, env, monitor, debug console."""
