"""Memory the guest hands back to the host, and a template's warm-up.

Every husk VM has a virtio-balloon with free page reporting: once its driver
is loaded, the guest tells QEMU about free memory (in 2 MiB blocks, every
couple of seconds) and QEMU releases it on the host. A guest that will become
a VM template (husk.template=1) also drops its clean page cache before it
serves, so that the template holds as little as possible and every pod
restored from it starts small.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from agent.errors import AgentError
from agent.process import Reaper
from agent.runtime import run_program

log = logging.getLogger(__name__)

BALLOON_MODULE = "virtio_balloon"
MODPROBE_TIMEOUT_S = 30.0
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


async def start_free_page_reporting(reaper: Reaper) -> bool:
    """Load the balloon driver; False (logged) when it cannot be loaded."""
    try:
        await run_program(reaper, ["modprobe", BALLOON_MODULE], MODPROBE_TIMEOUT_S,
                          f"modprobe {BALLOON_MODULE}")
    except AgentError as e:
        log.warning("free page reporting is off: %s", e)
        return False
    log.info("free page reporting on (%s loaded)", BALLOON_MODULE)
    return True


async def warm_up_for_template(reaper: Reaper, drop_caches: Path = DROP_CACHES) -> None:
    """Before a template's agent serves: free page reporting on; clean page cache
    dropped (the guest re-reads what it uses)."""
    await start_free_page_reporting(reaper)
    try:
        drop_caches.write_text("3\n")
    except OSError as e:
        log.warning("warming up for a template: cannot drop caches: %s", e)
