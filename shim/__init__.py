"""husk host side: the containerd shim, the VM launcher and the agent client."""
