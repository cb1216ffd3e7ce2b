"""husk host side: the containerd shim, the VM launcher and the agent client."""

__version__ = "0.1.0"
