"""3D smoothing: affine inversion, improvement on a noisy 3D-consistent stack, no-neighbour identity, CLI round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cytonet.cli import main as cli_main
from cytonet.io.transforms import SectionTransform
from cytonet.mapping import smooth3d as s3

AREAS = [{"area_id": 1, "name": "FA", "color": "#e41a1c"}, {"area_id": 2, "name": "PB", "color": "#377eb8"},
         {"area_id": 3, "name": "OC", "color": "#4daf4a"}]
IMAGE_UM, OUTPUT_UM = 8.0, 64.0  # 8 full-res px per output cell


def random_affine(rng: np.random.Generator, z_mm: float = 0.0) -> np.ndarray:
    """Rotation + anisotropic scale + shear in-plane, a tilt into z, translation: any full-rank 3x4."""
    A = np.zeros((3, 4))
    A[:, :2] = rng.normal(0, 0.01, (3, 2))
    A[:2, :2] += np.diag(rng.uniform(0.005, 0.02, 2))
    A[:, 2] = rng.normal(size=3)  # acts on the 0 coordinate: must not matter
    A[:, 3] = rng.normal(0, 5, 3) + [0, 0, z_mm]
    return A


def test_invert_affine_exact_on_random_affines():
    rng = np.random.default_rng(0)
    for _ in range(20):
        A = random_affine(rng)
        cols, rows = rng.uniform(-100, 5000, 500), rng.uniform(-100, 5000, 500)
        xyz = SectionTransform(A).to_mm(cols, rows)
        c2, r2 = s3.invert_affine(A, xyz)
        np.testing.assert_allclose(c2, cols, atol=1e-7)
        np.testing.assert_allclose(r2, rows, atol=1e-7)


def test_invert_transform_with_displacement_field():
    rng = np.random.default_rng(1)
    A = random_affine(rng)
    yy, xx = np.mgrid[0:20, 0:20]
    field = np.stack([0.02 * np.sin(yy / 5), 0.02 * np.cos(xx / 6), 0.01 * np.sin((xx + yy) / 7)]).astype(np.float32)
    T = SectionTransform(A, field, 50.0)
    cols, rows = rng.uniform(0, 900, 300), rng.uniform(0, 900, 300)
    c2, r2 = s3.invert_transform(T, T.to_mm(cols, rows), iterations=8)
    assert np.abs(c2 - cols).max() < 0.05 and np.abs(r2 - rows).max() < 0.05  # px


def truth_at(xyz: np.ndarray) -> np.ndarray:
    """A 3D-consistent area field: three sectors around an axis that drifts slowly with z (ids 1..3)."""
    x, y, z = xyz.T
    ang = np.arctan2(y - 0.1 * z, x + 0.05 * z)
    return 1 + np.floor((ang + math.pi) / (2 * math.pi / 3)).astype(int) % 3


def make_stack(rng: np.random.Generator, n: int = 7, spacing_um: float = 100.0, grid: int = 36,
               noise: float = 1.6) -> tuple[list[s3.SectionMaps], list[np.ndarray]]:
    """Sections through the field with random in-plane poses, independent per-cell noise on the logits."""
    sections, truths = [], []
    cell_px = OUTPUT_UM / IMAGE_UM
    for k in range(n):
        phi, m = rng.uniform(-0.4, 0.4), IMAGE_UM / 1000 * rng.uniform(0.95, 1.05)
        A = np.zeros((3, 4))
        A[:2, :2] = m * np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
        centre = np.array([grid * cell_px / 2, grid * cell_px / 2])
        A[:2, 3] = rng.uniform(-0.1, 0.1, 2) - A[:2, :2] @ centre
        A[2, 3] = k * spacing_um / 1000
        T = SectionTransform(A)
        cols, rows = s3.cell_centres_px((grid, grid), cell_px)
        xyz = T.to_mm(cols, rows)
        truth = truth_at(xyz).reshape(grid, grid)
        tissue = (np.hypot(xyz[:, 0], xyz[:, 1]) < 1.05).reshape(grid, grid)  # a disc of tissue, 1.05 mm radius
        logits = 1.0 * np.eye(3)[truth - 1].transpose(2, 0, 1) + rng.normal(0, noise, (3, grid, grid))
        p = np.exp(logits) / np.exp(logits).sum(0)
        p[:, ~tissue] = np.nan
        sections.append(s3.SectionMaps(f"s{k}", p.astype(np.float32), T, OUTPUT_UM, IMAGE_UM, k * spacing_um))
        truths.append(np.where(tissue, truth, 0))
    return sections, truths


def accuracy(probs: np.ndarray, truth: np.ndarray) -> float:
    t = truth > 0
    return float((np.argmax(np.nan_to_num(probs, nan=-1), 0)[t] + 1 == truth[t]).mean())


def test_smoothing_improves_agreement_with_3d_truth():
    rng = np.random.default_rng(3)
    sections, truths = make_stack(rng)
    before = np.mean([accuracy(s.probs, t) for s, t in zip(sections, truths)])
    smoothed = s3.smooth_stack(sections, sigma_um=150.0, k=2)
    after = np.mean([accuracy(p, t) for p, t in zip(smoothed, truths)])
    assert before < 0.75  # noisy enough for smoothing to matter
    assert after > before + 0.08, (before, after)
    for s, p in zip(sections, smoothed):
        np.testing.assert_array_equal(np.isnan(p[0]), np.isnan(s.probs[0]))  # own tissue only
        np.testing.assert_allclose(np.nansum(p, 0)[~np.isnan(p[0])], 1.0, atol=1e-5)
    # far neighbours weigh (almost) nothing: a tiny sigma gives back the input
    tiny = s3.smooth_stack(sections, sigma_um=1.0, k=2)
    for s, p in zip(sections, tiny):
        np.testing.assert_allclose(p, s.probs, atol=1e-6)


def test_section_without_neighbours_is_unchanged():
    rng = np.random.default_rng(4)
    sections, _ = make_stack(rng, n=3)
    alone = s3.smooth_stack(sections[:1], sigma_um=200.0, k=2)[0]
    np.testing.assert_array_equal(alone, sections[0].probs)
    for s, p in zip(sections, s3.smooth_stack(sections, sigma_um=200.0, k=0)):
        np.testing.assert_array_equal(p, s.probs)
    assert s3.neighbours_of(["a", "b", "c", "d"], "a", 2) == ["b", "c"]
    assert s3.neighbours_of(["a", "b", "c", "d"], "c", 1) == ["b", "d"]


def test_cli_round_trip_in_infer_formats(tmp_path):
    from cytonet.analysis.section_metrics import read_prediction

    rng = np.random.default_rng(5)
    sections, _ = make_stack(rng, n=3, grid=20)
    rows = []
    for s in sections:
        s3.write_maps(tmp_path / "pred", s.name, s.probs, AREAS, OUTPUT_UM, IMAGE_UM,
                      manifest={"network_pixel_size_um": 8.0})
        rows.append({"section_id": s.name, "image": "none.png", "z_um": s.z_um, "transform": s.transform.to_spec()})
    pd.DataFrame(rows[::-1]).to_csv(tmp_path / "sections.csv", index=False)  # table order != z order
    pd.DataFrame([{"brain_id": "b", "sections": "sections.csv", "role": "unknown"}]).to_csv(
        tmp_path / "brains.csv", index=False)
    rc = cli_main(["smooth3d", "--brains", str(tmp_path / "brains.csv"), "--brain", "b",
                   "--pred", str(tmp_path / "pred"),
                  "--out", str(tmp_path / "{brain}_smooth"), "--sigma-um", "150", "--neighbours", "1", "--no-image"])
    assert rc == 0
    out = tmp_path / "b_smooth"
    for s in sections:
        for suffix in (".ome.zarr", "_areas.png", "_entropy.tif", "_overlay.png", "_infer.json"):
            assert (out / f"{s.name}{suffix}").exists(), suffix
        man = json.loads((out / f"{s.name}_infer.json").read_text())
        assert man["smooth3d"]["sigma_um"] == 150 and man["network_pixel_size_um"] == 8.0
        p, _ = s3.read_probabilities(out, s.name)
        assert p.shape == s.probs.shape
        np.testing.assert_array_equal(np.isnan(p[0]), np.isnan(s.probs[0]))
        pred = read_prediction(out, s.name)  # section-metrics reads the smoothed maps as it reads infer's
        assert pred.labels.shape == s.probs.shape[1:]
    mid = json.loads((out / "s1_infer.json").read_text())["smooth3d"]["neighbour_stats"]
    assert set(mid) == {"s0", "s2"} and all(v["mean_distance_um"] == pytest.approx(100.0, abs=1) for v in mid.values())
    assert not list(out.glob(".*tmp*"))
