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


def masked_demo_brain(root: Path) -> Path:
    """One small demo brain (demo1, 2 annotated sections) with its tables under ``root`` and tissue masks from the
    ground truth in ``root/masks``; returns the masks folder (what ``cytonet patches --masks-dir`` reads)."""
    from cytonet import synth

    p = synth.DemoParams(n_brains=1, n_unknown=0, sections_per_brain=2, annotate_every=1, pixel_size_um=16.0,
                         size_mm=8.0, artifacts=False)
    synth.write_tables(p, root)
    synth.generate_brain("demo1", p, root)
    masks = root / "masks"
    masks.mkdir()
    for sid in ("demo1_s000", "demo1_s001"):
        (masks / f"{sid}.png").write_bytes((root / "demo1" / "truth" / f"{sid}_tissue.png").read_bytes())
    return masks
