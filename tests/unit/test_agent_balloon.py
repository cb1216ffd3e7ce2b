"""The free page reporting order the agent sets, from the kernel command line."""
from __future__ import annotations

import pytest

from agent.balloon import reporting_order


@pytest.mark.parametrize(("cmdline", "order"), [
    ({}, None),  # the kernel's own
    ({"husk.page_reporting_order": "9"}, 9),
    ({"husk.page_reporting_order": "0"}, 0),
    ({"husk.page_reporting_order": "11"}, None),  # beyond MAX_ORDER - 1
    ({"husk.page_reporting_order": "-1"}, None),
    ({"husk.page_reporting_order": "nine"}, None),
])
def test_reporting_order(cmdline: dict[str, str], order: int | None) -> None:
    assert reporting_order(cmdline) == order
