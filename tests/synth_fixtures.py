"""Session fixtures for the demo-generator tests (import them in test modules; no conftest needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: small but complete demo: 4 brains (3 known + 1 unknown), 3 sections each, 12 µm/px
SMALL_DEMO = dict(n_brains=4, n_unknown=1, sections_per_brain=3, annotate_every=2, pixel_size_um=12.0,
                  size_mm=22.0, seed=7, n_jobs=2)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo written once per test session."""
    from cytonet.synth import generate_demo

    out = tmp_path_factory.mktemp("synth_demo")
    generate_demo(SMALL_DEMO, out)
    return out
