"""Evaluation: area classification on known brains' held-out sections and on unknown brains.

Labels come from the sections' ``ground_truth`` label images, read at each patch centre (never from the training
annotations). Splits (patches with ground truth 0 = outside cortex are dropped from all of them):

* ``known``: patches of *known* brains from sections that were not annotated (``labelled`` False), i.e. sections
  finetuning never saw;
* ``unknown``: all patches of *unknown* brains;
* ``all``: both together.

Metrics (numpy, cross-checked against scikit-learn in tests): accuracy, per-area F1, macro-F1 and the confusion
matrix (rows = true, columns = predicted, areas in areas-table order). **Macro-F1 averages over the areas present
in the split's ground truth**: an area that never occurs in a split has no defined recall, so it is left out of
that split's average (its per-area F1 is NaN); predictions *of* such an area still count as errors of the true
area (they lower its recall). This equals ``sklearn.metrics.f1_score(average="macro", labels=<present areas>)``.

Models: any number of classifier checkpoints (``--model NAME=classifier.pt``, repeated; one per seed; the seed is
the checkpoint's finetune seed) and the classical laminar-profile baseline (``cytonet.analysis.baselines``), fitted here
per seed on the same labelled sections finetuning with that seed trained on (``cytonet.nn.data.split_by_section``).
Outputs: see ``configure_parser`` / docs in the README of the issue; all files are written atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytonet.io.annotations import is_set, labels_at, load_labels
from cytonet.io.atomic import atomic_path, atomic_savefig, atomic_write_csv, atomic_write_text
from cytonet.io.metrics import classification_metrics

SPLITS = ("known", "unknown", "all")
SPLIT_TITLES = {"known": "Known brains", "unknown": "Unknown brains", "all": "All"}
BASELINE_NAME = "laminar profile + LR"


# ------------------------------------------------------------------------------------------------ ground truth
def _section_rows(sections_table: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(sections_table, pd.DataFrame):
        return sections_table
    from cytonet.io.tables import load_sections

    return load_sections(sections_table, check_files=False)


def ground_truth_labels(store_dir: str | Path, sections_table: str | Path | pd.DataFrame,
                        areas: pd.DataFrame | None = None) -> np.ndarray:
    """Ground-truth area id int64 [N] at every patch centre of a store (0 = not cortex / no ground truth).

    The label image is the section's ``ground_truth`` (PNG/TIFF label image on the full-res grid or a coarser
    grid of the same extent, or GeoJSON); the full-res extent comes from the section image's metadata.
    Sections without ground truth give 0 (excluded from metrics) with a warning.
    """
    from cytonet.io.readers import open_section

    store_dir = Path(store_dir)
    table = pd.read_parquet(store_dir / "patches.parquet", columns=["section", "x_px", "y_px"])
    secs = _section_rows(sections_table).set_index("section_id")
    if areas is None:  # only used to validate label values / rasterise GeoJSON names
        areas = pd.DataFrame({"area_id": np.arange(1, 65536), "name": [str(i) for i in range(1, 65536)]})
    out = np.zeros(len(table), np.int64)
    for sid, idx in table.groupby("section", sort=False).indices.items():
        if sid not in secs.index:
            raise ValueError(f"{store_dir}: section '{sid}' is not in the sections table")
        row = secs.loc[sid]
        gt = row.get("ground_truth")
        if not is_set(gt):
            warnings.warn(f"{store_dir}: section '{sid}' has no ground_truth; its {len(idx)} patches are not evaluated",
                          stacklevel=2)
            continue
        px = row.get("pixel_size_um")
        px = float(px) if is_set(px) else None
        full = tuple(open_section(row["image"], px, section_id=sid).levels[0].shape[:2])
        labels = load_labels(gt, sid, areas, full)
        sub = table.iloc[idx]
        out[idx] = labels_at(labels, full, sub["x_px"].to_numpy(), sub["y_px"].to_numpy())
    return out


# ------------------------------------------------------------------------------------------------------ splits
def split_masks(table: pd.DataFrame, roles: dict[str, str], truth: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks per split over store rows (columns brain, labelled); ground truth 0 is excluded."""
    brains = table["brain"].astype(str).to_numpy()
    unknown_brains = [b for b in np.unique(brains) if b not in roles]
    if unknown_brains:
        raise ValueError(f"brain(s) {unknown_brains} of the stores are not in the brains table")
    role = np.array([roles[b] for b in brains]) if len(brains) else np.zeros(0, str)
    has_truth = np.asarray(truth) > 0
    known = (role == "known") & ~table["labelled"].astype(bool).to_numpy() & has_truth
    unknown = (role == "unknown") & has_truth
    return {"known": known, "unknown": unknown, "all": known | unknown}


# ----------------------------------------------------------------------------------------------- data access
@dataclass
class EvalStore:
    """One patch store with its table, ground truth and split membership."""

    path: Path
    brain: str
    table: pd.DataFrame
    truth: np.ndarray
    splits: dict[str, np.ndarray]
    pixel_size_um: float | None
    patch_px: int
    train_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def eval_rows(self) -> np.ndarray:
        """Rows in any split (sorted)."""
        return np.flatnonzero(self.splits["all"])


def iter_blocks(store: str | Path, rows: np.ndarray, block: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, uint8 patches) for sorted `rows`, reading contiguous blocks of the Zarr array.

    Only blocks that hold a wanted row are read, so memory stays at one block whatever the store size.
    """
    import zarr

    arr = zarr.open_group(str(Path(store) / "patches.zarr"), mode="r")["patches"]
    rows = np.sort(np.asarray(rows, np.int64))
    if not len(rows):
        return
    starts = (rows // block) * block
    for b0 in np.unique(starts):
        sel = rows[starts == b0]
        b1 = int(sel[-1]) + 1
        data = np.asarray(arr[int(sel[0]):b1])
        yield sel, data[sel - sel[0]]


def load_stores(stores: Sequence[str | Path], brains_table: str | Path, areas: pd.DataFrame) -> list[EvalStore]:
    """Read stores, look up ground truth and build splits; roles and sections come from the brains table."""
    import json

    import zarr

    from cytonet.io.tables import load_brains, load_sections

    brains = load_brains(brains_table, check_files=False)
    roles = dict(zip(brains["brain_id"].astype(str), brains["role"].astype(str)))
    sections = dict(zip(brains["brain_id"].astype(str), brains["sections"]))
    out = []
    for s in stores:
        p = Path(s)
        if not (p / "manifest.json").exists():
            raise FileNotFoundError(f"{p}: manifest.json missing (not a complete patch store)")
        table = pd.read_parquet(p / "patches.parquet")
        attrs = dict(zarr.open_group(str(p / "patches.zarr"), mode="r").attrs)
        brain = str(attrs.get("brain") or json.loads((p / "manifest.json").read_text()).get("brain") or p.name)
        if brain not in roles:
            raise ValueError(f"{p}: brain '{brain}' is not in the brains table {brains_table}")
        truth = ground_truth_labels(p, load_sections(sections[brain], brain, check_files=False), areas)
        bad = sorted(set(np.unique(truth)) - {0} - set(int(a) for a in areas["area_id"]))
        if bad:
            raise ValueError(f"{p}: ground truth has area ids {bad} not in the areas table")
        splits = split_masks(table, roles, truth)
        train = np.zeros(0, np.int64)
        if roles[brain] == "known":
            train = np.flatnonzero(table["labelled"].astype(bool).to_numpy() & (table["area_id"].to_numpy() > 0))
        out.append(EvalStore(p, brain, table, truth, splits, attrs.get("pixel_size_um"), int(attrs["patch_px"]),
                             train))
    return out


# -------------------------------------------------------------------------------------------------- predictors
def _area_index(area_ids: Sequence[int]) -> dict[int, int]:
    return {int(a): i for i, a in enumerate(area_ids)}


def predict_stores(predict_fn: Callable[[np.ndarray], np.ndarray], class_area_ids: Sequence[int],
                   stores: Sequence[EvalStore], area_ids: Sequence[int], block: int = 2048) -> list[np.ndarray]:
    """Predicted class index (areas-table order) for every evaluation row of every store.

    `predict_fn` maps uint8 patches [n,S,S] to probabilities [n, C] whose columns are `class_area_ids`.
    """
    lut = _area_index(area_ids)
    missing = [a for a in class_area_ids if int(a) not in lut]
    if missing:
        raise ValueError(f"model predicts area ids {missing} that are not in the areas table")
    col_to_idx = np.array([lut[int(a)] for a in class_area_ids], np.int64)
    preds = []
    for st in stores:
        rows = st.eval_rows
        pred = np.full(len(st.table), -1, np.int64)
        for sel, patches in iter_blocks(st.path, rows, block):
            pred[sel] = col_to_idx[np.asarray(predict_fn(patches)).argmax(1)]
        preds.append(pred)
    return preds


@dataclass
class ModelRun:
    """One model × seed: where its predictions come from."""

    model: str
    seed: int
    checkpoint: Path | None = None  # classifier.pt; None for the profile baseline


def parse_model_specs(specs: Sequence[str]) -> list[ModelRun]:
    """``NAME=PATH`` strings -> runs; the seed is the checkpoint's finetune seed (else its position)."""
    import torch

    runs: list[ModelRun] = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--model {spec!r}: expected NAME=PATH/TO/classifier.pt")
        name, path = spec.split("=", 1)
        name, path = name.strip(), Path(path.strip())
        if not name:
            raise ValueError(f"--model {spec!r}: empty model name")
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec!r}: checkpoint not found: {path}")
        ck = torch.load(path, map_location="cpu", weights_only=False)
        seed = (ck.get("config") or {}).get("seed")
        taken = {r.seed for r in runs if r.model == name}
        if seed is None or int(seed) in taken:
            if seed is not None:
                warnings.warn(f"--model {spec!r}: seed {seed} already used by model '{name}'; numbering by position",
                              stacklevel=2)
            seed = max(taken | {-1}) + 1
        runs.append(ModelRun(name, int(seed), path))
    return runs


# ------------------------------------------------------------------------------------------------- outputs
def slug(name: str) -> str:
    """File-name-safe model name ("random init" -> "random_init")."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return s or "model"


def _std(x: pd.Series) -> float:
    # Sample std over seeds (ddof=1); a single seed has no spread, reported as 0.
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def summarise(metrics: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """mean/std over seeds of accuracy and macro-F1 per model × split (models in the given order)."""
    m = metrics[(metrics["area"] == "all") & metrics["metric"].isin(["accuracy", "macro_f1", "n_patches"])]
    rows = []
    for model in models:
        for split in SPLITS:
            sub = m[(m["model"] == model) & (m["split"] == split)]
            if sub.empty:
                continue
            row = {"model": model, "split": split, "n_seeds": int(sub["seed"].nunique())}
            for metric in ("accuracy", "macro_f1"):
                v = sub.loc[sub["metric"] == metric, "value"].dropna()
                row[f"{metric}_mean"], row[f"{metric}_std"] = (float(v.mean()) if len(v) else float("nan")), _std(v)
            row["n_patches"] = int(sub.loc[sub["metric"] == "n_patches", "value"].max())
            rows.append(row)
    return pd.DataFrame(rows, columns=["model", "split", "n_seeds", "accuracy_mean", "accuracy_std",
                                       "macro_f1_mean", "macro_f1_std", "n_patches"])


def _cell(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def summary_markdown(summary: pd.DataFrame, models: Sequence[str]) -> str:
    """The poster's "classification metrics" table: rows = models, column groups = known / unknown / all."""
    head = ["Model"] + [f"{SPLIT_TITLES[s]}: {m}" for s in SPLITS for m in ("accuracy", "macro-F1")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for model in models:
        cells = [model]
        for split in SPLITS:
            r = summary[(summary["model"] == model) & (summary["split"] == split)]
            for metric in ("accuracy", "macro_f1"):
                cells.append(_cell(float(r[f"{metric}_mean"].iloc[0]), float(r[f"{metric}_std"].iloc[0]))
                             if len(r) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = summary.groupby("model")["n_seeds"].max().to_dict() if len(summary) else {}
    n = summary.groupby("split")["n_patches"].max().to_dict() if len(summary) else {}
    note = ("\nMean ± sample std over seeds (" + ", ".join(f"{m}: {seeds.get(m, 0)}" for m in models) + "). "
            "Patches: " + ", ".join(f"{SPLIT_TITLES[s].lower()} {int(n.get(s, 0))}" for s in SPLITS) + ". "
            "Known brains = non-annotated sections of the training brains; macro-F1 over the areas present in "
            "each split's ground truth.\n")
    return "\n".join(lines) + "\n" + note


def plot_confusion(cm: np.ndarray, names: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix PNG (rows = true area)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(cm.sum(1, keepdims=True) > 0, cm / cm.sum(1, keepdims=True), np.nan)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=120)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            if not np.isnan(norm[i, j]):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_savefig(fig, path)


def plot_macro_f1(summary: pd.DataFrame, models: Sequence[str], path: Path) -> None:
    """Grouped bars of mean macro-F1 per model and split, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(models), 3.6), dpi=120)
    width = 0.8 / len(SPLITS)
    x = np.arange(len(models))
    for i, split in enumerate(SPLITS):
        vals, errs = [], []
        for model in models:
            r = summary[(summary["model"] == model) & (summary["split"] == split)]
            vals.append(float(r["macro_f1_mean"].iloc[0]) if len(r) else np.nan)
            errs.append(float(r["macro_f1_std"].iloc[0]) if len(r) else 0.0)
        ax.bar(x + (i - (len(SPLITS) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, label=SPLIT_TITLES[split])
    ax.set_xticks(x, models, rotation=15, ha="right")
    ax.set_ylabel("macro-F1 (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)


# -------------------------------------------------------------------------------------------------- driver
def _metric_rows(model: str, seed: int, split: str, res: dict, names: Sequence[str]) -> list[dict]:
    rows = [{"model": model, "seed": seed, "split": split, "metric": "accuracy", "area": "all",
             "value": res["accuracy"]},
            {"model": model, "seed": seed, "split": split, "metric": "macro_f1", "area": "all",
             "value": res["macro_f1"]},
            {"model": model, "seed": seed, "split": split, "metric": "n_patches", "area": "all", "value": res["n"]}]
    for name, f1, sup in zip(names, res["f1"], res["support"]):
        rows.append({"model": model, "seed": seed, "split": split, "metric": "f1", "area": name, "value": f1})
        rows.append({"model": model, "seed": seed, "split": split, "metric": "support", "area": name,
                     "value": int(sup)})
    return rows


@dataclass
class _EvalInputs:
    """The areas (class order) and the stores to evaluate, with ground truth as class indices."""

    area_ids: list[int]
    names: list[str]
    lut: dict[int, int]  # area id -> class index
    data: list[EvalStore]
    ums: set  # pixel sizes of the stores (at most one value)
    truth_idx: list[np.ndarray]  # per store: class index of the ground truth, -1 where not evaluated


def _load_inputs(stores: Sequence[str | Path], brains_table: str | Path, areas_table: str | Path) -> _EvalInputs:
    """Areas table and stores; the stores must share one pixel size."""
    from cytonet.io.tables import load_areas

    areas = load_areas(areas_table)
    area_ids = [int(a) for a in areas["area_id"]]
    names = [str(n) for n in areas["name"]]
    lut = _area_index(area_ids)
    data = load_stores(stores, brains_table, areas)
    ums = {st.pixel_size_um for st in data if st.pixel_size_um is not None}
    if len({round(float(u), 6) for u in ums}) > 1:
        raise ValueError(f"stores have different pixel sizes: {sorted(ums)}")
    # Ground truth as class indices per store (-1 where not evaluated).
    truth_idx = [np.array([lut.get(int(v), -1) for v in st.truth], np.int64) for st in data]
    return _EvalInputs(area_ids, names, lut, data, ums, truth_idx)


def _baseline_features(data: Sequence[EvalStore], block: int) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Profile features of every store's training and evaluation rows (computed once, block-wise, reused for
    every seed; NaN elsewhere) and the table of the training rows (brain, section, area_id, store, row)."""
    from cytonet.analysis.baselines import profile_features

    feats: list[np.ndarray] = []
    for st in data:
        rows = np.union1d(st.eval_rows, st.train_rows)
        f = np.zeros((len(st.table), 0), np.float32)
        for sel, patches in iter_blocks(st.path, rows, block):
            ff = profile_features(patches)
            if f.shape[1] == 0:
                f = np.full((len(st.table), ff.shape[1]), np.nan, np.float32)
            f[sel] = ff
        feats.append(f)
    parts = [st.table.iloc[st.train_rows][["brain", "section", "area_id"]].assign(store=k, row=st.train_rows)
             for k, st in enumerate(data) if len(st.train_rows)]
    if not parts:
        raise ValueError("profile baseline: no labelled patches (labelled, area_id > 0) of known brains")
    return feats, pd.concat(parts, ignore_index=True)


def _checkpoint_predictions(run: ModelRun, inp: _EvalInputs, device: str, batch_size: int,
                            block: int) -> list[np.ndarray]:
    """Predicted class index per store row of a classifier checkpoint (-1 outside the splits)."""
    from cytonet.nn.checkpoints import load_classifier, predict

    ums = inp.ums
    model, ck = load_classifier(run.checkpoint, device)
    cu = ck.get("pixel_size_um")
    if cu is not None and ums and abs(float(cu) - float(next(iter(ums)))) > 1e-3 * float(cu):
        raise ValueError(f"{run.checkpoint}: trained at {cu} µm/px but the stores are at {next(iter(ums))} µm/px")
    return predict_stores(lambda p: predict((model, ck), p, batch_size, device), ck["area_ids"], inp.data,
                          inp.area_ids, block)


def _baseline_predictions(run: ModelRun, inp: _EvalInputs, feats: list[np.ndarray], train_table: pd.DataFrame,
                          vf: float, out: Path) -> list[np.ndarray]:
    """Fit the profile baseline for ``run.seed``, save it under ``out/models``, predict every evaluation row."""
    from cytonet.analysis.baselines import (
        fit_profile_baseline_features,
        predict_profile_baseline_features,
        save_baseline,
    )
    from cytonet.nn.data import split_by_section

    # Same training sections as finetune with this seed (section-held-out split), so the comparison is fair.
    tr, _ = split_by_section(train_table, vf, run.seed)
    sub = train_table[tr]
    x = np.concatenate([feats[k][g["row"].to_numpy()] for k, g in sub.groupby("store", sort=True)])
    y = np.concatenate([g["area_id"].to_numpy() for _, g in sub.groupby("store", sort=True)])
    bl = fit_profile_baseline_features(x, y, seed=run.seed)
    bl.info.update(n_train_sections=int(sub[["brain", "section"]].drop_duplicates().shape[0]),
                   val_fraction=vf)
    save_baseline(bl, out / "models" / f"{slug(run.model)}_seed{run.seed}.joblib")
    col_to_idx = np.array([inp.lut[int(a)] for a in bl.classes], np.int64)
    preds = []
    for k, st in enumerate(inp.data):
        pred = np.full(len(st.table), -1, np.int64)
        rows = st.eval_rows
        if len(rows):
            pred[rows] = col_to_idx[predict_profile_baseline_features(bl, feats[k][rows]).argmax(1)]
        preds.append(pred)
    return preds


def _score_run(run: ModelRun, preds: list[np.ndarray], inp: _EvalInputs, metric_rows: list[dict],
               conf_sum: dict[tuple[str, str], np.ndarray]) -> None:
    """Metrics of one run per split into ``metric_rows``; its confusion matrices added to ``conf_sum``."""
    for split in SPLITS:
        yt = np.concatenate([t[st.splits[split]] for t, st in zip(inp.truth_idx, inp.data)])
        yp = np.concatenate([p[st.splits[split]] for p, st in zip(preds, inp.data)])
        if not len(yt):
            continue
        res = classification_metrics(yt, yp, len(inp.area_ids))
        metric_rows += _metric_rows(run.model, run.seed, split, res, inp.names)
        key = (run.model, split)
        conf_sum[key] = conf_sum.get(key, 0) + res["confusion"]


def _prediction_table(run: ModelRun, preds: list[np.ndarray], inp: _EvalInputs) -> pd.DataFrame:
    """One row per evaluated patch of a run: brain, store index, true and predicted area id."""
    data, area_ids = inp.data, inp.area_ids
    return pd.DataFrame({
        "model": run.model, "seed": run.seed,
        "brain": np.concatenate([st.table["brain"].to_numpy()[st.eval_rows] for st in data]),
        "index": np.concatenate([st.table["index"].to_numpy()[st.eval_rows] for st in data]),
        "true_area_id": np.concatenate([st.truth[st.eval_rows] for st in data]),
        "pred_area_id": np.concatenate([np.asarray(area_ids)[p[st.eval_rows]] if len(st.eval_rows)
                                        else np.zeros(0, np.int64) for p, st in zip(preds, data)])})


def _per_area_table(metrics: pd.DataFrame, area_ids: list[int], names: list[str]) -> pd.DataFrame:
    """mean/std over seeds of each area's F1 per model × split, with its support."""
    f1 = metrics[metrics["metric"] == "f1"]
    sup = metrics[metrics["metric"] == "support"].groupby(["model", "split", "area"])["value"].max()
    per_area = (f1.groupby(["model", "split", "area"], sort=False)["value"]
                .agg(f1_mean=lambda v: float(v.mean()) if v.notna().any() else float("nan"), f1_std=_std)
                .reset_index())
    per_area["support"] = [int(sup.get((m, s, a), 0)) for m, s, a in zip(per_area["model"], per_area["split"],
                                                                         per_area["area"])]
    per_area["area_id"] = [area_ids[names.index(a)] for a in per_area["area"]]
    return per_area[["model", "split", "area_id", "area", "f1_mean", "f1_std", "support"]]


def _write_confusions(out: Path, conf_sum: dict[tuple[str, str], np.ndarray], summary: pd.DataFrame,
                      names: list[str]) -> None:
    """Confusion matrix CSV per model × split (seeds summed), and a PNG of each model's unknown-brains one."""
    for (model, split), cm in conf_sum.items():
        df = pd.DataFrame(cm, index=pd.Index(names, name="true\\predicted"), columns=names)
        atomic_write_csv(out / f"confusion_{slug(model)}_{split}.csv", df, index=True)
        if split == "unknown":
            n_seeds = int(summary.loc[(summary["model"] == model) & (summary["split"] == split), "n_seeds"].iloc[0])
            plot_confusion(cm, names, f"{model}\nunknown brains, {n_seeds} seed(s) summed, row-normalised",
                           out / f"confusion_{slug(model)}_unknown.png")


def _write_outputs(out: Path, metrics: pd.DataFrame, summary: pd.DataFrame, per_area: pd.DataFrame,
                   pred_tables: list[pd.DataFrame], conf_sum: dict[tuple[str, str], np.ndarray], names: list[str],
                   models: list[str]) -> str:
    """Every output file of ``cytonet evaluate`` (each atomically); returns the summary Markdown table."""
    atomic_write_csv(out / "metrics.csv", metrics)
    atomic_write_csv(out / "summary.csv", summary)
    atomic_write_csv(out / "per_area_f1.csv", per_area)
    preds_all = pd.concat(pred_tables, ignore_index=True)
    with atomic_path(out / "predictions.parquet") as tmp:
        preds_all.to_parquet(tmp, index=False)
    md = summary_markdown(summary, models)
    atomic_write_text(out / "summary.md", "# Classification metrics\n\n" + md)
    _write_confusions(out, conf_sum, summary, names)
    plot_macro_f1(summary, models, out / "macro_f1.png")
    return md


def evaluate(stores: Sequence[str | Path], brains_table: str | Path, areas_table: str | Path,
             runs: Sequence[ModelRun], out_dir: str | Path, baseline_seeds: Sequence[int] = (),
             baseline_name: str = BASELINE_NAME, baseline_val_fraction: float | None = None,
             device: str = "cpu", batch_size: int = 128, block: int = 2048, progress: bool = True) -> dict:
    """Evaluate every run (and the profile baseline per seed) on the known/unknown/all splits; write outputs."""
    import torch

    from cytonet.nn.data import DEFAULT_VAL_FRACTION

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inp = _load_inputs(stores, brains_table, areas_table)
    all_runs: list[ModelRun] = list(runs) + [ModelRun(baseline_name, int(s)) for s in baseline_seeds]
    models = list(dict.fromkeys(r.model for r in all_runs))
    if not all_runs:
        raise ValueError("nothing to evaluate: give --model NAME=classifier.pt and/or --profile-baseline-seeds")
    # Baseline features: computed once (block-wise) for training and evaluation rows, reused for every seed.
    feats, train_table = _baseline_features(inp.data, block) if baseline_seeds else ([], None)
    vf = float(DEFAULT_VAL_FRACTION if baseline_val_fraction is None else baseline_val_fraction)

    metric_rows: list[dict] = []
    conf_sum: dict[tuple[str, str], np.ndarray] = {}
    pred_tables = []
    try:
        from cytonet.io.logs import progress as progress_bar  # a bar only on a terminal
        bar = progress_bar(all_runs, desc="evaluate", unit="model", enabled=progress)
    except ImportError:  # pragma: no cover
        bar = all_runs
    for run in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{run.model} seed {run.seed}")
        if run.checkpoint is not None:
            preds = _checkpoint_predictions(run, inp, device, batch_size, block)
        else:
            preds = _baseline_predictions(run, inp, feats, train_table, vf, out)
        _score_run(run, preds, inp, metric_rows, conf_sum)
        pred_tables.append(_prediction_table(run, preds, inp))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    metrics = pd.DataFrame(metric_rows, columns=["model", "seed", "split", "metric", "area", "value"])
    summary = summarise(metrics, models)
    per_area = _per_area_table(metrics, inp.area_ids, inp.names)
    md = _write_outputs(out, metrics, summary, per_area, pred_tables, conf_sum, inp.names, models)
    return {"metrics": metrics, "summary": summary, "per_area": per_area, "markdown": md, "models": models,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet evaluate``."""
    parser.add_argument("--brains", required=True, help="brains table (brain_id, sections, role)")
    parser.add_argument("--areas", required=True, help="areas table (area_id, name, color): class order")
    parser.add_argument("--store", action="append", required=True,
                        help="patch store folder of a brain to evaluate (repeat; known and unknown brains)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CLASSIFIER.PT",
                        help="classifier checkpoint of model NAME (repeat, one per seed; the seed is read from "
                             "the checkpoint's finetune config)")
    parser.add_argument("--profile-baseline-seeds", type=int, nargs="*", default=[], metavar="SEED",
                        help="fit the laminar-profile + LR baseline once per seed (on finetune's training split)")
    parser.add_argument("--profile-baseline-name", default=BASELINE_NAME)
    parser.add_argument("--profile-baseline-val-fraction", type=float, default=None,
                        help="sections held out like finetune's validation (default: finetune's val_fraction)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--block", type=int, default=2048, help="patches read from a store at a time")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: $CYTONET_THREADS or all)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet evaluate``."""
    import torch

    threads = args.threads or os.environ.get("CYTONET_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = evaluate(args.store, args.brains, args.areas, parse_model_specs(args.model), args.out,
                   args.profile_baseline_seeds, args.profile_baseline_name, args.profile_baseline_val_fraction,
                   device, args.batch_size, args.block, progress=not args.no_progress)
    print(res["markdown"])
    print(f"evaluate: {len(res['models'])} model(s) in {res['seconds']:.1f} s -> {args.out}")
    return 0
