"""Host cgroups of a sandbox's processes (QEMU, virtiofsd)."""
