"""Evaluation: metrics vs scikit-learn, ground truth at patch centres, splits, profile baseline, CLI end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.analysis.baselines import fit_profile_baseline, predict_profile_baseline, profile_features  # noqa: E402
from cytonet.analysis.evaluate import classification_metrics, ground_truth_labels, split_masks
from cytonet.cli import main as cli_main  # noqa: E402
from cytonet.io.annotations import labels_at as _label_lookup  # noqa: E402
from learning_fixtures import make_store  # noqa: E402

GRID = 6  # learning_fixtures patches sit at x_px, y_px = 100 * g + 50; areas are bands along x
IMAGE_PX = 600


def _band_area(x: np.ndarray) -> np.ndarray:
    return 1 + np.minimum(2, (np.asarray(x) // 100).astype(int) * 3 // GRID)


def _truth_image(factor: int, hole: bool) -> np.ndarray:
    """Area bands along x on a grid `factor` times coarser than the image; `hole`: top row band is not cortex."""
    n = IMAGE_PX // factor
    xs = (np.arange(n) + 0.5) * factor  # full-res x of each grid cell's centre
    lab = np.tile(_band_area(xs).astype(np.uint8), (n, 1))
    if hole:
        lab[: 100 // factor] = 0  # y < 100: outside cortex
    return lab


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Known brain k1 (section 0 annotated, 1-2 not) and unknown brain u1; truth full-res (k1) / 4x coarser (u1)."""
    root = tmp_path_factory.mktemp("eval")
    stores = {"k1": make_store(root / "stores", "k1", n_sections=3, grid=GRID, patch_px=32, labelled_sections=(0,)),
              "u1": make_store(root / "stores", "u1", n_sections=2, grid=GRID, patch_px=32, seed=3,
                               labelled_sections=())}
    tables = root / "tables"
    rows = []
    for brain, n_sec, factor in (("k1", 3, 1), ("u1", 2, 4)):
        d = tables / brain
        (d / "images").mkdir(parents=True)
        (d / "truth").mkdir()
        sec_rows = []
        for s in range(n_sec):
            sid = f"{brain}_s{s:03d}"
            Image.fromarray(np.full((IMAGE_PX, IMAGE_PX), 200, np.uint8)).save(d / "images" / f"{sid}.png")
            Image.fromarray(_truth_image(factor, hole=s == 1)).save(d / "truth" / f"{sid}_area.png")
            sec_rows.append(dict(section_id=sid, image=f"images/{sid}.png", pixel_size_um=2.0, z_um=400.0 * s,
                                 transform="0.002 0 0 0 0 0.002 0 0 0 0 0 " + str(0.4 * s),
                                 ground_truth=f"truth/{sid}_area.png"))
        pd.DataFrame(sec_rows).to_csv(d / "sections.csv", index=False)
        rows.append(dict(brain_id=brain, sections=f"{brain}/sections.csv",
                         role="known" if brain == "k1" else "unknown"))
    pd.DataFrame(rows).to_csv(tables / "brains.csv", index=False)
    # Area 4 never occurs anywhere: it must not count in macro-F1.
    pd.DataFrame(dict(area_id=[1, 2, 3, 4], name=["FA", "FB", "PA", "XX"],
                      color=["#ff0000", "#00ff00", "#0000ff", "#777777"])).to_csv(tables / "areas.csv", index=False)
    return {"root": root, "stores": stores, "brains": tables / "brains.csv", "areas": tables / "areas.csv",
            "sections": {b: tables / b / "sections.csv" for b in stores}}


# ---------------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_with_absent_areas(seed: int) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(seed)
    n_classes = 6
    present = np.array([0, 1, 3, 4])  # classes 2 and 5 absent from the ground truth ...
    y_true = rng.choice(present, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, n_classes, 500))  # ... but predicted
    assert 2 in y_pred and 5 in y_pred
    res = classification_metrics(y_true, y_pred, n_classes)
    assert res["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert res["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=present))
    np.testing.assert_allclose(res["f1"][present], f1_score(y_true, y_pred, average=None, labels=present))
    assert np.isnan(res["f1"][[2, 5]]).all()
    np.testing.assert_array_equal(res["confusion"], confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)))
    np.testing.assert_array_equal(res["support"], np.bincount(y_true, minlength=n_classes))


def test_metrics_edge_cases() -> None:
    perfect = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 1]), 3)
    assert perfect["accuracy"] == 1 and perfect["macro_f1"] == 1
    none_right = classification_metrics(np.array([0, 0]), np.array([1, 1]), 2)
    assert none_right["macro_f1"] == 0 and np.isnan(none_right["f1"][1])
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 3]), np.array([0, 1]), 3)


# ------------------------------------------------------------------------------------------------ ground truth
def test_label_lookup_full_res_and_downsampled_agree() -> None:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 5, (25, 40)).astype(np.uint8)
    full = np.kron(coarse, np.ones((8, 8), np.uint8))  # 200 x 320 full-res grid, same extent
    x = rng.uniform(-0.5, 319.49, 1000)
    y = rng.uniform(-0.5, 199.49, 1000)
    a = _label_lookup(full, full.shape, x, y)
    b = _label_lookup(coarse, full.shape, x, y)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, full[np.floor(y + 0.5).astype(int), np.floor(x + 0.5).astype(int)])


def test_ground_truth_at_patch_centres(world) -> None:
    for brain in ("k1", "u1"):  # k1: full-res truth, u1: 4x downsampled truth
        store = world["stores"][brain]
        t = pd.read_parquet(store / "patches.parquet")
        gt = ground_truth_labels(store, world["sections"][brain])
        expect = np.where((t["section"].str.endswith("s001") & (t["y_px"] < 100)).to_numpy(), 0,
                          _band_area(t["x_px"].to_numpy()))
        np.testing.assert_array_equal(gt, expect)
        # Training annotation (area_id) is not where the truth comes from: unlabelled rows still get truth.
        assert (gt[~t["labelled"].to_numpy()] > 0).any()


def test_splits_known_unlabelled_sections_and_unknown_brains(world) -> None:
    tables = [pd.read_parquet(world["stores"][b] / "patches.parquet") for b in ("k1", "u1")]
    t = pd.concat(tables, ignore_index=True)
    gt = np.concatenate([ground_truth_labels(world["stores"][b], world["sections"][b]) for b in ("k1", "u1")])
    s = split_masks(t, {"k1": "known", "u1": "unknown"}, gt)
    known_secs = set(t.loc[s["known"], "section"])
    assert known_secs == {"k1_s001", "k1_s002"}  # never the annotated section k1_s000
    assert set(t.loc[s["unknown"], "brain"]) == {"u1"} and set(t.loc[s["unknown"], "section"]) == {"u1_s000", "u1_s001"}
    assert (s["all"] == (s["known"] | s["unknown"])).all() and not (s["known"] & s["unknown"]).any()
    assert (gt[s["all"]] > 0).all()
    expected_unknown = (t["brain"] == "u1").to_numpy() & (gt > 0)
    np.testing.assert_array_equal(s["unknown"], expected_unknown)
    assert s["known"].sum() == 2 * GRID * GRID - GRID  # s001 loses its top row (outside cortex)
    with pytest.raises(ValueError, match="u1"):
        split_masks(t, {"k1": "known"}, gt)


# ------------------------------------------------------------------------------------------- profile baseline
def _laminar(rng: np.random.Generator, cls: int, size: int = 48) -> np.ndarray:
    """Bands across a random direction: classes differ in band thickness / order (like laminar patterns)."""
    period, duty, second = [(12.0, 0.5, 0.0), (12.0, 0.2, 0.0), (20.0, 0.3, 0.6)][cls]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)
    ph = (u % period) / period
    img = 0.85 - 0.55 * (ph < duty) - 0.3 * ((ph > duty + 0.1) & (ph < duty + 0.1 + second * 0.3))
    img = img + rng.normal(0, 0.08, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_profile_baseline_beats_chance_under_rotation() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 80)
    x = np.stack([_laminar(rng, c) for c in y])
    perm = rng.permutation(len(y))
    tr, te = perm[:150], perm[150:]
    model = fit_profile_baseline(x[tr], y[tr] + 1, seed=0)  # labels are area ids
    proba = predict_profile_baseline(model, x[te])
    assert proba.shape == (len(te), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    acc = (model.classes[proba.argmax(1)] == y[te] + 1).mean()
    assert acc > 0.75, acc  # chance is 1/3


def test_profile_features_rotation_robust() -> None:
    rng = np.random.default_rng(1)
    x = np.stack([_laminar(rng, c % 3, size=64) for c in range(30)])
    f = profile_features(x)
    scale = f.std(0) + 1e-3
    for k in (1, 2, 3):
        fr = profile_features(np.rot90(x, k, axes=(1, 2)).copy())
        assert np.max(np.abs(f - fr) / scale) < 1e-3
    ff = profile_features(np.flip(x, 2).copy())  # mirror images too
    assert np.max(np.abs(f - ff) / scale) < 1e-3


# --------------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end(world, tmp_path: Path, capsys) -> None:
    from cytonet.learn.finetune import finetune

    areas = ([1, 2, 3, 4], ["FA", "FB", "PA", "XX"])
    cks = []
    for name, seed in (("A", 0), ("A", 1), ("B", 0)):
        d = tmp_path / "ft" / f"{name}{seed}"
        finetune([world["stores"]["k1"]], d, {"mode": "linear", "epochs": 2, "num_workers": 0, "threads": 1,
                                              "seed": seed, "val_fraction": 0.0}, known_brains={"k1"}, areas=areas)
        cks.append((name if name == "A" else "random init", d / "classifier.pt"))
    out = tmp_path / "eval"
    argv = ["--brains", str(world["brains"]), "--areas", str(world["areas"]),
            "--store", str(world["stores"]["k1"]), "--store", str(world["stores"]["u1"]),
            *sum((["--model", f"{n}={p}"] for n, p in cks), []),
            "--profile-baseline-seeds", "0", "1", "--out", str(out), "--threads", "1", "--no-progress",
            "--device", "cpu"]
    assert cli_main(["evaluate", *argv]) == 0
    printed = capsys.readouterr().out
    assert "±" in printed

    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == ["model", "seed", "split", "metric", "area", "value"]
    assert set(m["model"]) == {"A", "random init", "laminar profile + LR"}
    assert set(m.loc[m["model"] == "A", "seed"]) == {0, 1}
    assert set(m["split"]) == {"known", "unknown", "all"}
    assert {"accuracy", "macro_f1", "f1", "n_patches", "support"} <= set(m["metric"])
    absent = m[(m["metric"] == "f1") & (m["area"] == "XX")]
    assert len(absent) and absent["value"].isna().all()  # area 4 is in no ground truth: F1 undefined
    n = m[(m["metric"] == "n_patches")].set_index(["model", "seed", "split"])["value"]
    assert n[("A", 0, "known")] == 2 * GRID * GRID - GRID and n[("A", 0, "unknown")] == 2 * GRID * GRID - GRID

    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns) == ["model", "split", "n_seeds", "accuracy_mean", "accuracy_std", "macro_f1_mean",
                               "macro_f1_std", "n_patches"]
    assert len(s) == 9 and s["macro_f1_mean"].between(0, 1).all()
    assert s.set_index(["model", "split"]).loc[("A", "all"), "n_seeds"] == 2
    md = (out / "summary.md").read_text()
    assert "±" in md and "Known brains" in md and "Unknown brains" in md and "| random init |" in md
    pa = pd.read_csv(out / "per_area_f1.csv")
    assert list(pa.columns) == ["model", "split", "area_id", "area", "f1_mean", "f1_std", "support"]
    for slug in ("A", "random_init", "laminar_profile_LR"):
        for split in ("known", "unknown", "all"):
            cm = pd.read_csv(out / f"confusion_{slug}_{split}.csv", index_col=0)
            assert list(cm.columns) == ["FA", "FB", "PA", "XX"] and list(cm.index) == ["FA", "FB", "PA", "XX"]
        assert (out / f"confusion_{slug}_unknown.png").stat().st_size > 1000
    cm = pd.read_csv(out / "confusion_A_unknown.csv", index_col=0)
    assert cm.to_numpy().sum() == 2 * (2 * GRID * GRID - GRID)  # summed over the two seeds of A
    assert (out / "macro_f1.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "models").iterdir()) == ["laminar_profile_LR_seed0.joblib",
                                                                  "laminar_profile_LR_seed1.joblib"]
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["model", "seed", "brain", "index", "true_area_id", "pred_area_id"]
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries
