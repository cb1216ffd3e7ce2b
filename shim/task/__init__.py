"""containerd.task.v2.Task: the RPCs containerd calls, the events it expects, and stdio."""
