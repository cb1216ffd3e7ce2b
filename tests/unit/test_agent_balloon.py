"""The free page reporting order the agent sets, from the kernel command line."""
from __future__ import annotations

import pytest

from agent.balloon import SINGLE_PAGES, reporting_order


@pytest.mark.parametrize(("cmdline", "order"), [
    ({}, SINGLE_PAGES),
    ({"husk.page_reporting_order": "9"}, 9),
    ({"husk.page_reporting_order": "0"}, 0),
    ({"husk.page_reporting_order": "11"}, SINGLE_PAGES),  # beyond MAX_ORDER - 1
    ({"husk.page_reporting_order": "-1"}, SINGLE_PAGES),
    ({"husk.page_reporting_order": "nine"}, SINGLE_PAGES),
])
def test_reporting_order(cmdline: dict[str, str], order: int) -> None:
    assert reporting_order(cmdline) == order
