"""Embedding analysis: stratified sampling, label lookup, separation metrics, and the CLI end to end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.analysis import embed as E
from cytonet.io.annotations import labels_at
from learning_fixtures import make_store


# ------------------------------------------------------------------------------------------------ sampling
def _table() -> pd.DataFrame:
    counts = {("b1", 0): 50, ("b1", 1): 30, ("b1", 2): 5, ("b2", 1): 12, ("b2", 3): 40, ("b3", 0): 100}
    rows = [{"brain": b, "area_id": a} for (b, a), n in counts.items() for _ in range(n)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)


def test_stratified_sample_caps_and_strata() -> None:
    t = _table()
    pos = E.stratified_sample(t, per_area=10, seed=3)
    got = t.iloc[pos].groupby(["brain", "area_id"]).size().to_dict()
    # every labelled stratum, capped; area 0 left out of labelled brains; the unlabelled brain b3 gets
    # per_area x (3 areas seen) so it is represented like a labelled brain
    assert got == {("b1", 1): 10, ("b1", 2): 5, ("b2", 1): 10, ("b2", 3): 10, ("b3", 0): 30}
    assert np.all(np.diff(pos) > 0)  # sorted, no duplicates
    assert np.array_equal(pos, E.stratified_sample(t, per_area=10, seed=3))  # deterministic
    assert not np.array_equal(pos, E.stratified_sample(t, per_area=10, seed=4))
    with_none = t.iloc[E.stratified_sample(t, 10, 3, include_none=True)].groupby(["brain", "area_id"]).size()
    assert with_none[("b1", 0)] == 10 and with_none[("b3", 0)] == 30
    with pytest.raises(ValueError):
        E.stratified_sample(t, 0)


def test_lookup_labels_on_downsampled_grid() -> None:
    labels = np.array([[1, 2], [3, 4]], np.uint8)  # a 2x2 grid spanning a 100x100 full-res image
    x = np.array([0.0, 49.0, 50.0, 99.0, 10.0])
    y = np.array([0.0, 49.0, 10.0, 99.0, 75.0])
    assert labels_at(labels, (100, 100), x, y).tolist() == [1, 1, 2, 4, 3]


# ------------------------------------------------------------------------------------------------ metrics
def _clusters(separated: bool, n: int = 60, dim: int = 24, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(1, k + 1), n)
    centres = np.eye(dim)[:k] * (6.0 if separated else 0.0) + 3.0 * np.eye(dim)[k]  # offset: cosine is defined
    x = centres[y - 1] + rng.normal(0, 1.0, (len(y), dim))
    return x, y


def test_silhouette_and_knn_separated_vs_overlapping() -> None:
    xs, ys = _clusters(True)
    xo, yo = _clusters(False)
    ss, so = E.silhouette_per_area(E.l2_normalize(xs), ys), E.silhouette_per_area(E.l2_normalize(xo), yo)
    assert ss["overall"] > 0.3 and abs(so["overall"]) < 0.05
    assert set(ss["per_area"]) == {1, 2, 3, 4} and min(ss["per_area"].values()) > 0.3
    ks, ko = E.knn_loo(xs, ys, 10), E.knn_loo(xo, yo, 10)
    assert ks["accuracy"] > 0.95 and min(ks["per_area"].values()) > 0.9
    assert ko["accuracy"] < 0.25 + 0.15 and ko["chance_balanced"] == 0.25
    # transfer and leave-one-brain-out: a second draw plays the other brain
    xs2, ys2 = _clusters(True, seed=1)
    assert E.knn_transfer(xs, ys, xs2, ys2)["accuracy"] > 0.95
    lobo = E.knn_leave_one_brain_out(np.r_[xs, xs2], np.r_[ys, ys2], np.repeat(["a", "b"], len(ys)))
    assert lobo["accuracy"] > 0.95 and lobo["brains"] == ["a", "b"]


def test_pair_separation_separated_vs_overlapping() -> None:
    xs, ys = _clusters(True, k=2)
    xo, yo = _clusters(False, k=2)
    groups = np.tile(np.repeat(["b1", "b2", "b3"], 20), 2)  # 3 brains, each with both classes
    ps, po = E.pair_separation(xs, ys == 1, groups), E.pair_separation(xo, yo == 1, groups)
    assert ps["separation_ratio"] > 3 * po["separation_ratio"]
    assert ps["auc_lda"] > 0.98 and ps["auc_logistic"] > 0.98 and ps["fisher_lda"] > 5
    assert 0.3 < po["auc_lda"] < 0.7 and po["fisher_lda"] < 0.5
    assert ps["cv"].startswith("leave-one-brain-out")
    assert E.pair_separation(xs, ys == 1)["cv"] == "5-fold stratified"
    t = E.pair_transfer(xs, ys == 1, _clusters(True, k=2, seed=2)[0], ys == 1)
    assert t["auc_lda"] > 0.98


def test_border_subset() -> None:
    xyz = np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0], [1.5, 0, 0], [9, 0, 0]], float)
    is_a = np.array([True, True, True, False, False])
    near = E.border_subset(xyz, is_a, np.array(["b"] * 5), radius_mm=1.0)
    assert near.tolist() == [False, True, False, True, False]


# ------------------------------------------------------------------------------------------------ end to end
def _tables(root: Path) -> tuple[Path, Path]:
    """Areas FA/PB/OC = ids 1/2/3; brains k1 (known, no ground truth) and u1 (unknown, ground truth PNGs)."""
    (root / "areas.csv").write_text("area_id,name,color\n1,FA,#d7301f\n2,PB,#2c7fb8\n3,OC,#8856a7\n")
    for brain, n_sec, gt in (("k1", 4, False), ("u1", 2, True)):
        d = root / "tables" / brain
        d.mkdir(parents=True)
        lines = ["section_id,image,pixel_size_um,z_um,transform,ground_truth"]
        for s in range(n_sec):
            sid = f"{brain}_s{s:03d}"
            Image.fromarray(np.full((600, 600), 200, np.uint8)).save(d / f"{sid}.png")  # full-res extent 600 px
            truth = ""
            if gt:  # bands along x as in learning_fixtures, on a 4x downsampled grid
                grid = np.zeros((150, 150), np.uint8)
                grid[:, :50], grid[:, 50:100], grid[:, 100:] = 1, 2, 3
                Image.fromarray(grid).save(d / f"{sid}_area.png")
                truth = f"{sid}_area.png"
            lines.append(f"{sid},{sid}.png,2.0,{s * 400.0},0.002 0 0 0 0 0.002 0 0 0 0 0 {s * 0.4},{truth}")
        (d / "sections.csv").write_text("\n".join(lines) + "\n")
    (root / "brains.csv").write_text("brain_id,sections,role\nk1,tables/k1/sections.csv,known\n"
                                     "u1,tables/u1/sections.csv,unknown\n")
    return root / "brains.csv", root / "areas.csv"


def test_embed_cli_end_to_end(tmp_path: Path) -> None:
    k1 = make_store(tmp_path / "stores", "k1", n_sections=4, grid=6, patch_px=32, labelled_sections=(0, 2))
    u1 = make_store(tmp_path / "stores", "u1", n_sections=2, grid=6, patch_px=32, labelled_sections=(), seed=5)
    brains, areas = _tables(tmp_path)
    parser = argparse.ArgumentParser()
    E.configure_parser(parser)
    out = tmp_path / "emb"
    args = parser.parse_args(["--random-init", "small", "--store", str(k1), "--store", str(u1), "--brains",
                              str(brains), "--areas", str(areas), "--out", str(out), "--per-area", "8",
                              "--threads", "1", "--quiet"])
    assert E.run(args) == 0
    for name in E.OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    df = pd.read_parquet(out / "embedding.parquet")
    assert list(df.columns) == E.EMBEDDING_COLUMNS
    # k1 has no ground truth: its store area_id (2 labelled sections x 12 patches per band) -> 8 per stratum;
    # u1 has ground truth on a downsampled grid: the same x bands, so its areas match the fixture's
    assert df.groupby(["brain", "area_id"]).size().to_dict() == {(b, a): 8 for b in ("k1", "u1") for a in (1, 2, 3)}
    assert set(df.loc[df.brain == "k1", "label_source"]) == {"store_area_id"}
    assert set(df.loc[df.brain == "u1", "label_source"]) == {"ground_truth"}
    assert (df.loc[df.brain == "u1", "area_id"] == 1 + np.minimum(2, (df.loc[df.brain == "u1", "x_px"] // 200))).all()
    assert df[["umap_x", "umap_y"]].notna().all().all() and set(df.role) == {"known", "unknown"}
    assert set(df.area) == {"FA", "PB", "OC"}
    rep = json.loads((out / "separation.json").read_text())
    m = rep["metrics"]
    assert rep["model"]["random_init"] and rep["features"] == "backbone" and rep["feature_dim"] == 128
    assert m["knn_known_to_unknown"]["test_brains"] == ["u1"] and m["knn_loo"]["k"] == 10
    assert set(m["pair"]["all"]) >= {"separation_ratio", "fisher_lda", "auc_lda", "auc_logistic"}
    assert "FA vs PB" in (out / "separation.md").read_text()
    with Image.open(out / "umap_by_position.png") as im:
        assert im.size[0] > 1000  # four panels side by side
