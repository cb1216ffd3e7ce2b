"""A pod: its VM, shared directory, agent connection and containers."""
