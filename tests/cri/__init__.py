"""CRI end-to-end harness: test images, a private containerd, a typed CRI client, pytest fixtures."""
