"""The shim's side of the agent channel: a typed async gRPC client and its transport."""
