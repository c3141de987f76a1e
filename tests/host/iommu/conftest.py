"""Makes ``iommu_rig`` importable (tests run with ``--import-mode=importlib``) and provides the rig."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from iommu_rig import Rig, build_rig


@pytest.fixture
def rig() -> Rig:
    return build_rig()


@pytest.fixture
def make_rig() -> Callable[..., Rig]:
    return build_rig
