"""The shim's side of the agent channel: a typed async gRPC client and its transport."""
import os

# The shim forks QEMU and virtiofsd, which exec at once: gRPC's fork handlers
# have nothing to protect there and only log "skipping fork() handlers".
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
