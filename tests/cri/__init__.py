"""CRI end-to-end harness: test images, a private containerd, a typed CRI client, pytest fixtures."""
import os

# The harness forks ctr, ip and containerd while gRPC is loaded; they exec at
# once, so gRPC's fork handlers are not needed (and only log noise).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
