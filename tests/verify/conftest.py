"""Soak tests (``@pytest.mark.soak``) run only when asked for with ``-m soak``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("-m") or ""):
        return
    keep, skipped = [], []
    for item in items:
        (skipped if item.get_closest_marker("soak") else keep).append(item)
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = keep
