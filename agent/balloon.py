"""Memory the guest hands back to the host, and a template's warm-up.

Every husk VM has a virtio-balloon with free page reporting: once its driver
is loaded, the guest tells QEMU about free memory (every couple of seconds)
and QEMU releases it on the host. The agent lowers the reporting order from
the kernel's 2 MiB blocks to single pages: a guest's free memory after boot is
scattered (its initramfs, its init code, what its agent freed), and a page not
reported stays in the host's memory, and in a template in every pod restored
from it. (Linux 6.1 overwrites the kernel parameter when the driver
registers, so it is set afterwards.) A guest that will become
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
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
SINGLE_PAGES = 0
# The kernel's own is pageblock_order (9: 2 MiB blocks); MAX_ORDER - 1 is 10.
MAX_REPORTING_ORDER = 10
REPORTING_ORDER_PARAM = "husk.page_reporting_order"


def reporting_order(cmdline: dict[str, str]) -> int:
    """The order the kernel command line asks for (husk.page_reporting_order=N, for an
    operator who wants the kernel's 2 MiB blocks back: 9), else single pages."""
    text = cmdline.get(REPORTING_ORDER_PARAM)
    if text is None:
        return SINGLE_PAGES
    if not text.isdigit() or int(text) > MAX_REPORTING_ORDER:
        log.error("%s=%s is not an order from 0 to %d; reporting single pages",
                  REPORTING_ORDER_PARAM, text, MAX_REPORTING_ORDER)
        return SINGLE_PAGES
    return int(text)


async def start_free_page_reporting(reaper: Reaper, order: int = SINGLE_PAGES,
                                    order_path: Path = REPORTING_ORDER) -> bool:
    """Load the balloon driver and report free blocks of 2**order pages and larger
    (single pages by default); False (logged) when the driver cannot be loaded."""
    try:
        await run_program(reaper, ["modprobe", BALLOON_MODULE], MODPROBE_TIMEOUT_S,
                          f"modprobe {BALLOON_MODULE}")
    except AgentError as e:
        log.warning("free page reporting is off: %s", e)
        return False
    try:
        order_path.write_text(f"{order}\n")
    except OSError as e:
        log.warning("free page reporting stays at the kernel's order: %s", e)
    log.info("free page reporting on (%s loaded)", BALLOON_MODULE)
    return True


async def warm_up_for_template(reaper: Reaper, order: int = SINGLE_PAGES,
                               drop_caches: Path = DROP_CACHES) -> None:
    """Before a template's agent serves: free page reporting on; clean page cache
    dropped (the guest re-reads what it uses)."""
    await start_free_page_reporting(reaper, order)
    try:
        drop_caches.write_text("3\n")
    except OSError as e:
        log.warning("warming up for a template: cannot drop caches: %s", e)
