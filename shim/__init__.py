"""husk host side: the containerd shim, the VM launcher and the agent client."""

__version__ = "0.1.0"
# What the shim reports as its version (Connect, -v, -info).
SHIM_VERSION = f"husk-{__version__}"
# The runtime type containerd maps to containerd-shim-husk-v2.
RUNTIME_TYPE = "io.containerd.husk.v2"
# The shim binary containerd derives from it, and what its daemons show in ps.
SHIM_NAME = "containerd-shim-husk-v2"
