"""Stand-ins for the shim's neighbours (the guest agent, the VM) in unit tests."""
