"""What the shim accepts as an id (containerd's, and ours in paths and file names).

containerd ids are [A-Za-z0-9][A-Za-z0-9_.-]*. Anything that becomes a path
component or a file name must match this: no "/", no "..", no NUL. Stdlib
only: the manager's ``start`` imports it before anything heavier.
"""
from __future__ import annotations

import re

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A pod's run directory is <state_dir>/sb/<sandbox id> (short: socket paths live there).
SANDBOXES_DIR = "sb"


def is_valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None
