"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synth_fixtures import small_demo  # noqa: F401  (session fixture: a small generated demo, shared by modules)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CYTONET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real reference data beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA} (set CYTONET_SHARED_DATA to its path)")
    return SHARED_DATA
