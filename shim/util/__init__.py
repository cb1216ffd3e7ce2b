"""Small host-side helpers shared by the VM, agent client and shim modules."""
