"""Section metrics: per-area F1/IoU on cortex cells, resampling of the ground truth, uncertain = wrong, no GT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from cytonet.analysis import section_metrics as sm
from cytonet.cli import main as cli_main

AREAS = [{"area_id": 1, "name": "FA", "color": "#e41a1c"}, {"area_id": 2, "name": "PB", "color": "#377eb8"},
         {"area_id": 3, "name": "OC", "color": "#4daf4a"}]
UNC = 255


def write_fake_prediction(pred_dir: Path, name: str, labels: np.ndarray, output_um: float, image_um: float,
                          areas: list[dict] = AREAS) -> Path:
    """Infer's documented area PNG (palette, value = area id) + manifest, without a model or torch."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    pal = np.zeros((256, 3), np.uint8)
    pal[UNC] = 128
    im.putpalette(pal.ravel().tolist())
    im.save(pred_dir / f"{name}_areas.png")
    manifest = {"section": name, "output_um": output_um, "image_pixel_size_um": image_um,
                "uncertain_value": UNC, "uncertain_below": 0.5, "areas": areas, "grid_shape": list(labels.shape),
                "outputs": {"areas_png": f"{name}_areas.png"}}
    (pred_dir / f"{name}_infer.json").write_text(json.dumps(manifest))
    return pred_dir


def brute_mode(gt: np.ndarray, grid: tuple[int, int], cell_px: float, factor: float = 1.0) -> np.ndarray:
    """Reference: mode per cell by looping (ties -> smallest label)."""
    out = np.zeros(grid, gt.dtype)
    ci = np.floor((np.arange(gt.shape[0]) + 0.5) * factor / cell_px).astype(int)
    cj = np.floor((np.arange(gt.shape[1]) + 0.5) * factor / cell_px).astype(int)
    for i in range(grid[0]):
        for j in range(grid[1]):
            vals = gt[np.ix_(ci == i, cj == j)].ravel()
            if vals.size:
                u, n = np.unique(vals, return_counts=True)
                out[i, j] = u[np.argmax(n)]
    return out


def test_scores_match_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (40, 50))  # 0 = not cortex
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.choice([0, 1, 2, 3, UNC], truth.shape))
    pred[truth == 3] = np.where(rng.random((truth == 3).sum()) < 0.5, 1, 3)  # some confusion of OC into FA
    per, summ, conf = sm.section_scores(truth, pred, UNC)
    c = truth > 0
    y, p = truth[c], pred[c]
    areas = [1, 2, 3]
    f1 = f1_score(y, p, labels=areas, average=None, zero_division=0)
    iou = jaccard_score(y, p, labels=areas, average=None, zero_division=0)
    per = per.set_index("area_id")
    np.testing.assert_allclose(per.loc[areas, "f1"], f1, rtol=1e-12)
    np.testing.assert_allclose(per.loc[areas, "iou"], iou, rtol=1e-12)
    assert summ["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert summ["macro_f1"] == pytest.approx(f1_score(y, p, labels=areas, average="macro"))
    assert summ["coverage"] == pytest.approx(np.isin(p, areas).mean())
    assert summ["n_cortex_px"] == c.sum() == per["n_px"].sum()


def test_known_numbers_and_uncertain_is_wrong():
    truth = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    pred = np.array([[1, 1, UNC, 0, 2, 2, 2, 1, 2, 1]])  # uncertain/outside on area 1; outside-cortex preds ignored
    per, summ, _ = sm.section_scores(truth, pred, UNC)
    per = per.set_index("area_id")
    # area 1: tp 2, fp 1 (a 2 predicted as 1), fn 2 (uncertain + outside) -> F1 4/7, IoU 2/5
    assert per.loc[1, ["tp", "fp", "fn", "n_px"]].tolist() == [2, 1, 2, 4]
    assert per.loc[1, "f1"] == pytest.approx(4 / 7) and per.loc[1, "iou"] == pytest.approx(2 / 5)
    # area 2: tp 3, fp 0, fn 1 -> F1 6/7, IoU 3/4
    assert per.loc[2, "f1"] == pytest.approx(6 / 7) and per.loc[2, "iou"] == pytest.approx(3 / 4)
    assert summ["accuracy"] == pytest.approx(5 / 8)
    assert summ["macro_f1"] == pytest.approx((4 / 7 + 6 / 7) / 2)
    assert summ["coverage"] == pytest.approx(6 / 8)
    # an all-uncertain prediction scores zero, however "right" its probabilities were
    _, s0, _ = sm.section_scores(truth, np.where(truth > 0, UNC, 0), UNC)
    assert s0["accuracy"] == 0 and s0["macro_f1"] == 0 and s0["coverage"] == 0


def test_area_only_predicted_lowers_nothing_but_is_listed():
    truth = np.array([[1, 1, 1, 1]])
    pred = np.array([[1, 1, 1, 3]])
    per, summ, _ = sm.section_scores(truth, pred, UNC)
    assert set(per["area_id"]) == {1, 3}
    assert per.set_index("area_id").loc[3, "f1"] == 0
    assert summ["macro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))  # over areas present in the truth only


@pytest.mark.parametrize("cell_px,factor", [(4.0, 1.0), (2.5, 1.0), (8.0, 2.0), (3.3, 1.5)])
def test_labels_to_grid_matches_brute_force(cell_px, factor):
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 4, (7, 9))
    gt = np.kron(coarse, np.ones((5, 5), int)).astype(np.uint8)  # blocky, with many mixed cells
    gt[rng.random(gt.shape) < 0.1] = 2
    grid = (int(np.ceil(gt.shape[0] * factor / cell_px)), int(np.ceil(gt.shape[1] * factor / cell_px)))
    got = sm.labels_to_grid(gt, grid, cell_px, (factor, factor), strip_rows=7)
    np.testing.assert_array_equal(got, brute_mode(gt, grid, cell_px, factor))


def test_block_truth_is_recovered_from_full_and_downsampled_grids():
    coarse = np.random.default_rng(2).integers(0, 4, (6, 8)).astype(np.uint8)
    full = np.kron(coarse, np.ones((8, 8), np.uint8))  # 8 full-res px per output cell
    np.testing.assert_array_equal(sm.labels_to_grid(full, coarse.shape, 8.0), coarse)
    half = full[::2, ::2]  # ground truth stored at half resolution: 2 full-res px per gt px
    np.testing.assert_array_equal(sm.labels_to_grid(half, coarse.shape, 8.0, (2.0, 2.0)), coarse)


def _tables(tmp: Path, gt: str | None) -> Path:
    (tmp / "b1").mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"brain_id": "b1", "sections": "b1/sections.csv", "role": "unknown"}]).to_csv(
        tmp / "brains.csv", index=False)
    pd.DataFrame([{"section_id": "b1_s000", "image": "missing.png", "z_um": 100.0,
                   "transform": "0.008 0 0 0 0 0.008 0 0 0 0 0 0.1", "ground_truth": gt or ""}]).to_csv(
        tmp / "b1" / "sections.csv", index=False)
    return tmp / "brains.csv"


def test_cli_section_with_ground_truth(tmp_path):
    coarse = np.array([[0, 1, 1, 2], [1, 1, 2, 2], [0, 3, 3, 3]], np.uint8)
    full = np.kron(coarse, np.ones((8, 8), np.uint8))  # output 64 µm, image 8 µm: 8 px per cell
    Image.fromarray(full).save(tmp_path / "gt.png")
    pred = coarse.copy()
    pred[0, 1] = UNC  # uncertain cortex cell: wrong
    pred[2, 3] = 2  # OC predicted as PB
    write_fake_prediction(tmp_path / "pred", "b1_s000", pred, 64.0, 8.0)
    brains = _tables(tmp_path, str(tmp_path / "gt.png"))
    rc = cli_main(["section-metrics", "--brains", str(brains), "--brain", "b1", "--section", "b1_s000",
                   "--pred", str(tmp_path / "pred"),
                  "--out-csv", str(tmp_path / "m.csv"), "--out-json", str(tmp_path / "m.json")])
    assert rc == 0
    table = pd.read_csv(tmp_path / "m.csv")
    assert list(table.columns) == sm.CSV_COLUMNS
    assert set(table["status"]) == {"ok"} and set(table["role"]) == {"unknown"}
    t = table.set_index("area")
    assert t.loc["OC", "n_px"] == 3 and t.loc["OC", "f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert t.loc["PB", "fp"] == 1 and t.loc["FA", "fn"] == 1
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["status"] == "ok" and summary["n_cortex_px"] == 10
    assert summary["accuracy"] == pytest.approx(8 / 10) and summary["coverage"] == pytest.approx(9 / 10)
    assert summary["z_um"] == 100.0 and summary["outputs"]["areas_png"] == "b1_s000_areas.png"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_argmax_metrics_ignore_the_uncertainty_threshold(tmp_path, monkeypatch):
    """From real map files: an uncertain cell whose most probable area is right counts for the argmax metrics only."""
    from cytonet.mapping.smooth3d import write_maps

    coarse = np.array([[0, 1, 1, 2], [1, 1, 2, 2], [0, 3, 3, 3]], np.uint8)
    Image.fromarray(np.kron(coarse, np.ones((8, 8), np.uint8))).save(tmp_path / "gt.png")
    probs = np.full((3, 3, 4), 0.05, np.float32)
    for k in range(3):
        probs[k][coarse == k + 1] = 0.9
    probs[:, 0, 1] = [0.4, 0.3, 0.3]  # FA, but below the 0.5 threshold: "uncertain" in the area map
    probs[:, 2, 3] = [0.1, 0.8, 0.1]  # OC predicted as PB
    write_maps(tmp_path / "pred", "b1_s000", probs, AREAS, 64.0, 8.0)
    write_maps(tmp_path / "pred2", "b1_s000", probs[[1, 0, 2]], AREAS, 64.0, 8.0)  # FA and PB swapped
    brains = _tables(tmp_path, str(tmp_path / "gt.png"))
    one_model = ["--pred", str(tmp_path / "pred"), "--out-csv", str(tmp_path / "m.csv"), "--out-json",
                 str(tmp_path / "m.json")]
    base = ["--brains", str(brains), "--brain", "b1", "--section", "b1_s000"]
    assert cli_main(["section-metrics", *base, *one_model]) == 0
    # several models' maps in one call: a table and summary per model; unpaired options are refused
    two = ["--model", "a", *one_model, "--model", "b", "--pred", str(tmp_path / "pred2"), "--out-csv",
           str(tmp_path / "b.csv"), "--out-json", str(tmp_path / "b.json")]
    reads = []
    real = sm.ground_truth_on_grid
    monkeypatch.setattr(sm, "ground_truth_on_grid", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    assert cli_main(["section-metrics", *base, *two]) == 0
    assert len(reads) == 1  # both models' maps share the grid: the ground truth is read once
    other = json.loads((tmp_path / "b.json").read_text())
    assert other["model"] == "b" and other["accuracy_argmax"] == pytest.approx(2 / 10)  # only two OC cells right
    assert cli_main(["section-metrics", *base, *two[:-2]]) == 2
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["accuracy"] == pytest.approx(8 / 10) and summary["accuracy_argmax"] == pytest.approx(9 / 10)
    f1_fa, f1_pb, f1_oc = 1.0, 2 * 3 / (2 * 3 + 1), 2 * 2 / (2 * 2 + 1)
    assert summary["macro_f1_argmax"] == pytest.approx((f1_fa + f1_pb + f1_oc) / 3)
    assert summary["macro_f1"] < summary["macro_f1_argmax"]
    assert summary["confusion_argmax"]["3"] == {"3": 2, "2": 1}


def test_cli_section_without_ground_truth(tmp_path):
    write_fake_prediction(tmp_path / "pred", "b1_s000", np.ones((3, 4), np.uint8), 64.0, 8.0)
    brains = _tables(tmp_path, None)
    rc = cli_main(["section-metrics", "--brains", str(brains), "--brain", "b1", "--section", "b1_s000",
                   "--pred", str(tmp_path / "pred"),
                  "--out-csv", str(tmp_path / "m.csv"), "--out-json", str(tmp_path / "m.json"), "--model", "random"])
    assert rc == 0
    table = pd.read_csv(tmp_path / "m.csv")
    assert len(table) == 1 and table.loc[0, "status"] == "no_ground_truth" and table.loc[0, "model"] == "random"
    assert pd.isna(table.loc[0, "f1"])
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["status"] == "no_ground_truth" and summary["macro_f1"] is None


def test_mismatched_ground_truth_is_refused(tmp_path):
    write_fake_prediction(tmp_path / "pred", "b1_s000", np.ones((3, 4), np.uint8), 64.0, 8.0)
    Image.fromarray(np.ones((100, 20), np.uint8)).save(tmp_path / "gt.png")
    brains = _tables(tmp_path, str(tmp_path / "gt.png"))
    rc = cli_main(["section-metrics", "--brains", str(brains), "--brain", "b1", "--section", "b1_s000",
                   "--pred", str(tmp_path / "pred"),
                  "--out-csv", str(tmp_path / "m.csv"), "--out-json", str(tmp_path / "m.json")])
    assert rc == 2 and not (tmp_path / "m.csv").exists()
