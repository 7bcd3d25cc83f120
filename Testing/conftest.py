"""Shared pytest fixtures: the real-data folder (skipped with a reason when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _data_root() -> Path | None:
    value = os.environ.get("IDEAL_DATA")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    """``$IDEAL_DATA/acdc`` (SSL4MIS layout) or skip."""
    root = _data_root()
    if root is None or not (root / "acdc" / "val.list").is_file():
        pytest.skip("ACDC data not found: set IDEAL_DATA to a folder holding acdc/ in the SSL4MIS layout (val.list, data/)")
    return root / "acdc"


@pytest.fixture(scope="session")
def sunnybrook_dir() -> Path:
    """``$IDEAL_DATA/sunnybrook`` or skip."""
    root = _data_root()
    if root is None or not (root / "sunnybrook" / "link.csv").is_file():
        pytest.skip("Sunnybrook data not found: set IDEAL_DATA to a folder holding sunnybrook/ (link.csv, dicoms/, contourfiles/)")
    return root / "sunnybrook"
