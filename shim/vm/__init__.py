"""The pod's virtual machine: QEMU command line, accelerator choice, QMP, virtiofsd."""
