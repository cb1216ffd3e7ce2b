"""What the guest sees of host files: the shared directory, container rootfs, volumes."""
