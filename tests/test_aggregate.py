"""Aggregation: per-brain and known/unknown tables with known numbers, Markdown, maps index, montages."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from cytonet.analysis import aggregate as ag
from cytonet.analysis import section_metrics as sm
from cytonet.cli import main as cli_main
from cytonet.mapping.smooth3d import write_maps

AREAS = [{"area_id": 1, "name": "FA", "color": "#e41a1c"}, {"area_id": 2, "name": "PB", "color": "#377eb8"},
         {"area_id": 3, "name": "OC", "color": "#4daf4a"}]
UNC = 255
BRAINS = {"bk": ("known", 2, 2), "bu": ("unknown", 3, 2)}  # brain: (role, sections, sections with ground truth)


def _probs_for(labels: np.ndarray) -> np.ndarray:
    """Probabilities whose argmax/threshold give back ``labels`` (0 = outside, UNC = uncertain)."""
    p = np.full((3, *labels.shape), np.nan, np.float32)
    inside = labels > 0
    p[:, inside] = 1 / 3  # uncertain: max 1/3 < 0.5
    for a in (1, 2, 3):
        m = labels == a
        p[:, m] = 0.05
        p[a - 1, m] = 0.9
    return p


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory):
    """Two brains of fake inference outputs (infer's writers), ground truth and section-metrics summaries."""
    root = tmp_path_factory.mktemp("agg")
    rng = np.random.default_rng(0)
    cells = {}  # (brain, section) -> (truth cells, pred cells) for the expected values
    summaries = []
    for b, (role, n, n_gt) in BRAINS.items():
        for k in range(n):
            sid = f"{b}_s{k:03d}"
            truth = rng.integers(0, 4, (10, 12)).astype(np.uint8)
            pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.choice([0, 1, 2, 3, UNC], truth.shape))
            pred = np.where(truth > 0, pred, np.where(rng.random(truth.shape) < 0.5, 0, 1)).astype(np.uint8)
            write_maps(root / "maps" / b, sid, _probs_for(pred), AREAS, 64.0, 8.0)
            gt = None
            if k < n_gt:
                gt = root / "truth" / f"{sid}_area.png"
                gt.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.kron(truth, np.ones((8, 8), np.uint8))).save(gt)
                cells[(b, sid)] = (truth, pred)
            z = 400.0 * (n - k)  # z order is the reverse of the id order: the montage must sort by z
            for model in ("cytonet", "random") if b == "bk" else ("cytonet",):
                table, summary = sm.evaluate_section(root / "maps" / b, sid, brain=b, section=sid, role=role,
                                                     ground_truth=str(gt) if gt else None, z_um=z, model=model)
                path = root / "metrics" / model / f"{sid}.json"
                sm.atomic_write_json(path, summary)
                sm.atomic_write_csv(path.with_suffix(".csv"), table)
                summaries.append(path)
    out = root / "results" / "summary"
    assert cli_main(["aggregate", "--metrics", *map(str, summaries), "--out", str(out), "--montage-width", "1200"]) == 0
    return root, out, cells


def _expected(cells: dict, keys: list) -> dict:
    t = np.concatenate([cells[k][0].ravel() for k in keys])
    p = np.concatenate([cells[k][1].ravel() for k in keys])
    c = t > 0
    present = sorted(set(t[c]))
    secs = []
    for k in keys:
        tt, pp = cells[k][0].ravel(), cells[k][1].ravel()
        cc = tt > 0
        secs.append((f1_score(tt[cc], pp[cc], labels=sorted(set(tt[cc])), average="macro"),
                     accuracy_score(tt[cc], pp[cc])))
    top = np.where(p == UNC, 1, p)  # uncertain cells hold uniform probabilities: the most probable is the first area
    return {"accuracy_pooled": accuracy_score(t[c], p[c]),
            "macro_f1_pooled": f1_score(t[c], p[c], labels=present, average="macro"),
            "macro_f1_argmax_pooled": f1_score(t[c], top[c], labels=present, average="macro"),
            "macro_f1_mean": np.mean([s[0] for s in secs]), "accuracy_mean": np.mean([s[1] for s in secs]),
            "f1": dict(zip([1, 2, 3], f1_score(t[c], p[c], labels=[1, 2, 3], average=None))),
            "iou": dict(zip([1, 2, 3], jaccard_score(t[c], p[c], labels=[1, 2, 3], average=None)))}


def _check(row: pd.Series, exp: dict) -> None:
    for col in ("accuracy_pooled", "macro_f1_pooled", "macro_f1_mean", "accuracy_mean", "macro_f1_argmax_pooled"):
        assert row[col] == pytest.approx(exp[col]), col
    for a, name in ((1, "FA"), (2, "PB"), (3, "OC")):
        assert row[f"f1_{name}"] == pytest.approx(exp["f1"][a])
        assert row[f"iou_{name}"] == pytest.approx(exp["iou"][a])


def test_per_brain_and_known_unknown_numbers(fake_results):
    _, out, cells = fake_results
    brains = pd.read_csv(out / "metrics_brains.csv")
    assert set(zip(brains["model"], brains["brain"])) == {("cytonet", "bk"), ("cytonet", "bu"), ("random", "bk")}
    for b, (role, n, n_gt) in BRAINS.items():
        row = brains[(brains["model"] == "cytonet") & (brains["brain"] == b)].iloc[0]
        assert row["role"] == role and row["n_sections"] == n and row["n_evaluated"] == n_gt
        _check(row, _expected(cells, [k for k in cells if k[0] == b]))
    overall = pd.read_csv(out / "metrics_overall.csv")
    ours = overall[overall["model"] == "cytonet"].set_index("group")
    assert list(ours.index) == ["known", "unknown", "all"]
    _check(ours.loc["known"], _expected(cells, [k for k in cells if k[0] == "bk"]))
    _check(ours.loc["unknown"], _expected(cells, [k for k in cells if k[0] == "bu"]))
    _check(ours.loc["all"], _expected(cells, list(cells)))
    assert ours.loc["all", "n_sections"] == 5 and ours.loc["all", "n_evaluated"] == 4
    assert ours.loc["all", "n_brains"] == 2
    base = overall[overall["model"] == "random"]
    assert list(base["group"]) == ["known", "all"]  # baseline rows only where that model has maps
    sections = pd.read_csv(out / "metrics_sections.csv")
    assert len(sections) == 7 and (sections["status"] == "no_ground_truth").sum() == 1
    areas = pd.read_csv(out / "metrics_areas.csv")
    conf = pd.read_csv(out / "confusion.csv")
    g = conf[(conf["model"] == "cytonet") & (conf["level"] == "group") & (conf["key"] == "all")]
    t = areas[(areas["model"] == "cytonet") & (areas["level"] == "group") & (areas["key"] == "all")]
    assert g["count"].sum() == t["n_px"].sum() == sum(int((v[0] > 0).sum()) for v in cells.values())
    assert {"outside", "uncertain"} <= set(g["pred_area"])


def test_markdown_tables(fake_results):
    _, out, _ = fake_results
    md = (out / "metrics_brains.md").read_text()
    assert md.startswith("# Metrics per brain")
    assert "| model | brain | role | n_sections |" in md
    assert "| cytonet | bk | known | 2 |" in md and "| cytonet | bu | unknown | 3 |" in md
    assert "| random | bk | known |" in md
    overall = (out / "metrics_overall.md").read_text()
    for group in ("known", "unknown", "all"):
        assert f"| cytonet | {group} |" in overall
    brains = pd.read_csv(out / "metrics_brains.csv")
    v = brains[(brains["model"] == "cytonet") & (brains["brain"] == "bu")]["macro_f1_mean"].iloc[0]
    assert f"{v:.3f}" in md


def test_maps_index_paths_are_relative_and_move_with_the_results(fake_results, tmp_path):
    root, out, _ = fake_results
    index = pd.read_csv(out / "maps_index.csv", keep_default_na=False)
    assert len(index) == 7
    for col in ("zarr", "areas_png", "overlay_png", "entropy_tif"):
        for p in index[col]:
            assert p and not os.path.isabs(p) and (out / p).exists(), (col, p)
    no_gt = index[index["section"] == "bu_s002"].iloc[0]
    assert no_gt["macro_f1"] == ""  # no ground truth: empty, not 0
    md = (out / "maps_index.md").read_text()
    assert "[bk_s000_overlay.png](" in md and "bu_s002" in md
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    for p in index["areas_png"]:
        assert (moved / "results" / "summary" / p).is_file()


def test_montage_per_brain(fake_results):
    _, out, _ = fake_results
    for b, (_role, n, _) in BRAINS.items():
        path = out / f"montage_{b}.png"
        with Image.open(path) as im:
            assert im.info["cytonet:panels"] == str(n)
            # z order: the section with the highest id has the lowest z and comes first
            assert im.info["cytonet:sections"].split(",") == [f"{b}_s{k:03d}" for k in reversed(range(n))]
            assert im.width <= 1200 and im.height > 100
    assert not (out / "montage_random.png").exists()


def test_montage_from_area_maps(fake_results, tmp_path):
    root, _, _ = fake_results
    summaries = ag.load_summaries(sorted((root / "metrics" / "cytonet").glob("bu_*.json")))
    n = ag.write_montage(tmp_path / "m.png", summaries, max_width_px=900, source="areas", title="bu")
    with Image.open(tmp_path / "m.png") as im:
        assert n == 3 and im.info["cytonet:panels"] == "3" and im.width <= 900
        rgb = np.asarray(im.convert("RGB"))
    for colour in ((0xe4, 0x1a, 0x1c), (0x37, 0x7e, 0xb8), (0x4d, 0xaf, 0x4a)):  # every area colour is drawn
        assert (np.abs(rgb.astype(int) - colour).sum(-1) < 10).sum() > 50


def test_duplicate_and_empty_inputs_are_refused(fake_results, tmp_path):
    root, _, _ = fake_results
    one = next((root / "metrics" / "cytonet").glob("*.json"))
    assert cli_main(["aggregate", "--metrics", str(one), str(one), "--out", str(tmp_path)]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"brain": "x"}))
    assert cli_main(["aggregate", "--metrics", str(bad), "--out", str(tmp_path)]) == 2
