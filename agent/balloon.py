"""Memory the guest hands back to the host, and a template's warm-up.

Every husk VM has a virtio-balloon with free page reporting: once its driver
is loaded, the guest tells QEMU about free memory (in 2 MiB blocks, every
couple of seconds) and QEMU releases it on the host. A guest that will become
a VM template (husk.template=1) also drops its clean page cache before it
serves, and reports single free pages until it is restored: a guest's free
memory after boot is scattered (its initramfs, its init code), and a page not
reported would stay in the template and be copied into every pod restored from
it. The restored guest goes back to 2 MiB blocks at its first CreateSandbox
(single pages cost TCG guests CPU: pages the guest frees and soon reuses go
back and forth). ``husk.page_reporting_order=N`` on the kernel command line
sets the order for the guest's life instead. (Linux 6.1 overwrites the kernel's
own parameter when the driver registers, so it is set afterwards.)
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


def reporting_order(cmdline: dict[str, str]) -> int | None:
    """The order the kernel command line asks for (husk.page_reporting_order=N), else
    None: the kernel's own (2 MiB blocks)."""
    text = cmdline.get(REPORTING_ORDER_PARAM)
    if text is None:
        return None
    if not text.isdigit() or int(text) > MAX_REPORTING_ORDER:
        log.error("%s=%s is not an order from 0 to %d; the kernel's is kept",
                  REPORTING_ORDER_PARAM, text, MAX_REPORTING_ORDER)
        return None
    return int(text)


def set_reporting_order(order: int, order_path: Path = REPORTING_ORDER) -> None:
    """Report free blocks of 2**order pages and larger from now on (logged if not)."""
    try:
        order_path.write_text(f"{order}\n")
    except OSError as e:
        log.warning("cannot set the free page reporting order to %d: %s", order, e)
        return
    log.info("free page reporting in blocks of %d pages", 1 << order)


async def start_free_page_reporting(reaper: Reaper, order: int | None = None,
                                    order_path: Path = REPORTING_ORDER) -> bool:
    """Load the balloon driver (and set the reporting order, unless None: the
    kernel's); False (logged) when the driver cannot be loaded."""
    try:
        await run_program(reaper, ["modprobe", BALLOON_MODULE], MODPROBE_TIMEOUT_S,
                          f"modprobe {BALLOON_MODULE}")
    except AgentError as e:
        log.warning("free page reporting is off: %s", e)
        return False
    log.info("free page reporting on (%s loaded)", BALLOON_MODULE)
    if order is not None:
        set_reporting_order(order, order_path)
    return True


async def warm_up_for_template(reaper: Reaper, order: int | None = None,
                               drop_caches: Path = DROP_CACHES,
                               order_path: Path = REPORTING_ORDER) -> int | None:
    """Before a template's agent serves: free page reporting on, single pages; clean
    page cache dropped (the guest re-reads what it uses). Returns the order a guest
    restored from it goes back to (``order``, else the kernel's), None if none."""
    if not await start_free_page_reporting(reaper, None, order_path):
        return None
    if order is None:
        try:
            order = int(order_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("cannot read the free page reporting order: %s", e)
    set_reporting_order(SINGLE_PAGES, order_path)
    try:
        drop_caches.write_text("3\n")
    except OSError as e:
        log.warning("warming up for a template: cannot drop caches: %s", e)
    return order
