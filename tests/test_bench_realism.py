"""The phantom-realism benchmark helpers (benchmarks/realism.py): demo column profiles and the real-data metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import realism  # noqa: E402

TINY = dict(n_brains=2, n_unknown=1, sections_per_brain=1, pixel_size_um=16.0, size_mm=18.0, seed=3, tile_px=128)


@pytest.fixture(scope="module")
def tiny_brain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cytonet.synth import generate_brain

    out = tmp_path_factory.mktemp("realism_demo")
    generate_brain("demo1", TINY, out)
    return out / "demo1"


@pytest.fixture(scope="module")
def columns(tiny_brain: Path) -> dict[str, np.ndarray]:
    from cytonet.io.tables import load_sections

    row = load_sections(tiny_brain / "sections.csv").iloc[0]
    return realism.section_samples(row, column_mm=0.5)


def test_column_profiles_shapes_and_depth_bins(columns: dict[str, np.ndarray]) -> None:
    n = len(columns["area"])
    assert n >= 20, f"only {n} columns kept"
    assert columns["profiles"].shape == (n, realism.N_BINS)
    assert columns["thickness"].shape == (n, 6)
    assert set(np.unique(columns["area"])) <= set(range(1, 7)) and len(np.unique(columns["area"])) >= 4
    edges = columns["bin_edges"]
    assert edges[0] == 0.0 and edges[-1] == 1.0 and np.all(np.diff(edges) > 0)
    assert np.all((columns["profiles"] >= 0) & (columns["profiles"] <= 1))
    # layer I is pale in Nissl: the first depth bin is lighter than the middle of the cortex
    prof = columns["profiles"].mean(0)
    assert prof[0] < prof[6:12].mean() - 0.05
    assert 0 < columns["coverage"] <= 1


def test_layer_thicknesses_match_local_thickness_and_phantom(columns: dict[str, np.ndarray]) -> None:
    from cytonet.synth.demo import brain_model
    from cytonet.synth.params import DemoParams

    thick, local = columns["thickness"], columns["local_thickness"]
    np.testing.assert_allclose(thick.sum(1), local, rtol=1e-6)
    model = brain_model(DemoParams.from_cfg(TINY), 0)
    errors = []
    for k, am in enumerate(model.areas, start=1):
        sel = columns["area"] == k
        if sel.sum() < 3:
            continue
        # oblique cuts can only thicken the cortex in a section
        ratio = np.median(local[sel]) / model.area_thickness[k - 1]
        assert 0.85 < ratio < 1.6, (am.name, ratio)
        # each column's layer shares vary (BigBrain's spread) and follow curvature (Bok), and the renderer's depth
        # field and the section's distance-transform depth differ a little in curved cortex: medians stay close
        frac = np.median(thick[sel] / local[sel, None], axis=0)
        assert np.abs(frac - am.fractions).max() < 0.12, (am.name, frac.round(3), am.fractions.round(3))
        errors.append(np.abs(frac - am.fractions).mean())
    assert len(errors) >= 4 and np.mean(errors) < 0.03, errors


def test_bigbrain_subset_separates_striate_from_motor(shared_data: Path) -> None:
    npz = shared_data / "bigbrain" / "bigbrain_profiles18_subset3000.npz"
    if not npz.exists():
        pytest.skip(f"BigBrain subset not found at {npz}")
    s, index = realism.load_bigbrain(npz, ["FA", "OC"])
    assert set(index) == {"FA", "OC"}
    assert s.profiles.shape[1] == realism.N_BINS and np.all((s.profiles >= 0) & (s.profiles <= 1))
    left, right = s.select(s.group == "L"), s.select(s.group == "R")
    for part in (left, right):
        if min((part.area == "FA").sum(), (part.area == "OC").sum()) < 10:
            pytest.skip(f"subset {npz} holds too few FA/OC vertices in one hemisphere")
    # BigBrain, left -> right: profiles alone separate them only moderately (AUC ~0.83), the layer thicknesses
    # (the wide granular layer IV of OC) make it easy
    assert 0.7 < realism.pair_auc(left, right, "FA", "OC") < 0.97
    assert realism.pair_auc(left, right, "FA", "OC", with_thickness=True) > 0.9
    assert realism.macro_f1(left, right, ["FA", "OC"], with_thickness=True) > 0.8
    iv = s.thickness[:, 3] / s.thickness.sum(1)
    assert np.median(iv[s.area == "OC"]) > 2 * np.median(iv[s.area == "FA"])


def test_bigbrain_missing_area_names_the_file(shared_data: Path) -> None:
    npz = shared_data / "bigbrain" / "bigbrain_profiles18_subset3000.npz"
    if not npz.exists():
        pytest.skip(f"BigBrain subset not found at {npz}")
    with pytest.raises(KeyError, match="subset3000.npz.*XX"):
        realism.load_bigbrain(npz, ["FA", "XX"])


def test_benchmark_skips_without_shared_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import bench_phantom_realism

    monkeypatch.setenv("CYTONET_SHARED_DATA", str(tmp_path / "absent"))
    assert bench_phantom_realism.main(["--out", str(tmp_path / "r.json")]) == 0
    assert "SKIP: real reference data not found" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()
