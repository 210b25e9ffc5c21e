"""Embedding analysis of a pretrained encoder: stratified patch sample -> features -> UMAP, plots, separation.

What the poster shows, made measurable: areas cluster in the learned feature space, and the features separate
sharply at the central sulcus (FA | PB).

Steps (``cytonet embed``):

1. **Stratified sample.** Strata are brain × area, up to ``--per-area`` patches each (seeded). The area of a patch
   is read from the section's ``ground_truth`` label image at the patch centre when the sections table has one
   (evaluation labels: available for unknown brains too), else the store's ``area_id`` (training labels; 0 on
   unannotated sections). Each row records its ``label_source``. A brain without any labelled patch (an unknown
   brain without ground truth) still enters, as one unlabelled stratum, so it appears in the brain plot.
2. **Features.** The encoder's backbone features (before the projection head) by default: the head is trained to
   be invariant for the contrastive loss and discards information (SimCLR's observation), and the backbone is
   what finetuning and inference use. ``--features projection`` embeds the head's output instead. Patches are
   read from the Zarr stores in sorted blocks, normalised as in training (``normalize_uint8``), resized to the
   encoder's ``input_px`` if it differs, and run in eval mode without gradients.
3. **UMAP** (umap-learn, cosine metric, fixed ``random_state``) to 2D; PNG plots by area, brain, 3D position, and
   the FA/PB pair.
4. **Separation metrics** on the high-dimensional features, all cosine / on L2-normalised features (the geometry
   the contrastive loss trains): per-area silhouette, leave-one-out kNN (k=10) per area and overall,
   leave-one-brain-out kNN, kNN trained on known brains and tested on unknown brains, and for the pair (FA, PB):
   centroid distance / within-class RMS spread, and the out-of-fold Fisher score and ROC AUC of a 1D LDA and a
   logistic regression (folds = brains, so no brain is seen in training and test).

Outputs in ``--out`` (each written to a temporary name and renamed): ``embedding.parquet``,
``umap_by_area.png``, ``umap_by_brain.png``, ``umap_by_position.png``, ``umap_fa_pb.png``, ``separation.json``,
``separation.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.annotations import is_set, labels_at, load_labels
from cytonet.io.atomic import atomic_path, atomic_savefig, atomic_write_json, atomic_write_text

OUTPUTS = ("embedding.parquet", "umap_by_area.png", "umap_by_brain.png", "umap_by_position.png",
           "umap_fa_pb.png", "separation.json", "separation.md")
EMBEDDING_COLUMNS = ["index", "store", "brain", "role", "section", "x_px", "y_px", "x_mm", "y_mm", "z_mm",
                     "area_id", "area", "label_source", "umap_x", "umap_y"]
UNLABELLED = "unlabelled"
FIGURE = {"dpi": 130, "bbox_inches": "tight"}  # savefig options of every plot


# ------------------------------------------------------------------------------------------------ I/O helpers
def read_store_tables(stores: Sequence[str | Path]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Concatenate the stores' parquet tables (with ``store``/``row`` columns) and return shared metadata."""
    import zarr

    frames, sizes, ums = [], [], []
    for i, p in enumerate(map(Path, stores)):
        if not (p / "manifest.json").is_file():
            raise FileNotFoundError(f"{p}: manifest.json missing; not a complete patch store")
        group = zarr.open_group(str(p / "patches.zarr"), mode="r")
        n, s = group["patches"].shape[:2]
        t = pd.read_parquet(p / "patches.parquet")
        if len(t) != n:
            raise ValueError(f"{p}: parquet has {len(t)} rows but patches has {n}")
        frames.append(t.assign(store=i, row=np.arange(n, dtype=np.int64)))
        sizes.append(s)
        ums.append(group.attrs.get("pixel_size_um"))
    if len(set(sizes)) > 1:
        raise ValueError(f"patch sizes differ between stores: {dict(zip(map(str, stores), sizes))}")
    ums_set = {float(u) for u in ums if u is not None}
    if len(ums_set) > 1:
        raise ValueError(f"pixel sizes differ between stores: {dict(zip(map(str, stores), ums))}")
    table = pd.concat(frames, ignore_index=True)
    dup = table.groupby("brain")["store"].nunique()
    if (dup > 1).any():
        raise ValueError(f"brain(s) {dup[dup > 1].index.tolist()} appear in more than one store")
    return table, {"patch_px": int(sizes[0]), "pixel_size_um": next(iter(ums_set), None)}


# ------------------------------------------------------------------------------------------------ area labels
def _label_image(path: str, section_id: str, image: str | None, pixel_size_um: float | None,
                 areas: pd.DataFrame) -> tuple[np.ndarray, tuple[int, int]]:
    """Ground-truth label grid of one section and the full-res image shape it spans (same extent)."""
    full: tuple[int, int] | None = None
    if image:
        try:
            from cytonet.io.readers import open_section

            full = tuple(int(v) for v in open_section(image, pixel_size_um, section_id).levels[0].shape[:2])
        except Exception as exc:  # noqa: BLE001 - without the image, assume the label image is full-res
            warnings.warn(f"section {section_id}: cannot open image {image} ({exc}); assuming {path} is full-res")
    labels = load_labels(path, section_id, areas, full)
    return labels, full or tuple(labels.shape[:2])


def assign_areas(table: pd.DataFrame, sections: pd.DataFrame | None, areas: pd.DataFrame,
                 mode: str = "auto") -> pd.DataFrame:
    """Add ``area_id`` (evaluation area) and ``label_source`` to the patch table.

    mode ``auto``: the section's ground truth where the sections table names one, else the store's area_id;
    ``store``: always the store's area_id; ``ground_truth``: ground truth only (sections without it: 0).
    """
    if mode not in ("auto", "store", "ground_truth"):
        raise ValueError(f"unknown label mode {mode!r}; choose auto, store or ground_truth")
    out = table.copy()
    out["area_id"] = out["area_id"].astype(np.int64)
    out["label_source"] = "store_area_id"
    if mode == "store" or sections is None:
        return out
    gt = {}
    for row in sections.itertuples():
        if is_set(getattr(row, "ground_truth", None)):
            gt[(str(row.brain_id), str(row.section_id))] = row
    if mode == "ground_truth":
        out["area_id"], out["label_source"] = 0, "none"
    for (brain, section), idx in out.groupby(["brain", "section"]).groups.items():
        row = gt.get((str(brain), str(section)))
        if row is None:
            continue
        px = getattr(row, "pixel_size_um", None)
        px = float(px) if is_set(px) else None
        labels, full = _label_image(row.ground_truth, str(section), getattr(row, "image", None), px, areas)
        part = out.loc[idx]
        out.loc[idx, "area_id"] = labels_at(labels, full, part["x_px"].to_numpy(), part["y_px"].to_numpy())
        out.loc[idx, "label_source"] = "ground_truth"
    return out


# ------------------------------------------------------------------------------------------------ sampling
def stratified_sample(table: pd.DataFrame, per_area: int, seed: int = 0, include_none: bool = False) -> np.ndarray:
    """Positions (into ``table``) of up to ``per_area`` patches per brain × area stratum, sorted.

    Area 0 (no label / not cortex) is a stratum only with ``include_none``, or for a brain that has no labelled
    patch at all (an unknown brain without ground truth), which then gets ``per_area`` × (number of areas seen in
    the other brains) patches, so that it is represented in the plots about as much as a labelled brain.
    """
    if per_area < 1:
        raise ValueError(f"per_area must be >= 1, got {per_area}")
    rng = np.random.default_rng(seed)
    area = table["area_id"].to_numpy()
    brain = table["brain"].astype(str).to_numpy()
    n_areas = max(1, len(np.unique(area[area > 0])))
    picks = []
    for b in sorted(set(brain)):
        in_b = brain == b
        labelled = bool((area[in_b] > 0).any())
        for a in sorted(set(area[in_b].tolist())):
            if a == 0 and labelled and not include_none:
                continue
            cap = per_area if (a > 0 or labelled) else per_area * n_areas
            pos = np.flatnonzero(in_b & (area == a))
            picks.append(pos if len(pos) <= cap else rng.choice(pos, cap, replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------------ features
def load_model(encoder: str | None, random_init: str | None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The encoder from encoder.pt (cytonet.nn.checkpoints.load_encoder), or a random-init one (baseline), in eval mode."""
    import torch

    from cytonet.nn.models import build_encoder

    if encoder:
        from cytonet.nn.checkpoints import load_encoder

        ck = torch.load(encoder, map_location="cpu", weights_only=False)
        model = load_encoder(encoder)
        info = {"encoder": str(encoder), "spec": ck["spec"], "step": ck.get("step"), "input_px": ck.get("input_px"),
                "pixel_size_um": ck.get("pixel_size_um"), "random_init": False}
    else:
        torch.manual_seed(seed)
        model = build_encoder(random_init or "small")
        info = {"encoder": f"random-init:{random_init}", "spec": model.spec(), "step": 0, "input_px": None,
                "pixel_size_um": None, "random_init": True}
    return model.eval(), info


def embed_patches(model: Any, stores: Sequence[str | Path], store_idx: np.ndarray, rows: np.ndarray,
                  input_px: int | None = None, batch_size: int = 256, features: str = "backbone",
                  device: str = "cpu") -> np.ndarray:
    """float32 [N, D] features of patches (store_idx[i], rows[i]), read in sorted blocks per store."""
    import torch
    import torch.nn.functional as F
    import zarr

    from cytonet.nn.models import autocast, normalize_uint8, prepare_model, to_input

    if features not in ("backbone", "projection"):
        raise ValueError(f"features must be 'backbone' or 'projection', got {features!r}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = prepare_model(model, dev).eval()
    fn = model.features if features == "backbone" else model.forward
    out: np.ndarray | None = None
    with torch.no_grad():
        for s in np.unique(store_idx):
            arr = zarr.open_group(str(Path(stores[int(s)]) / "patches.zarr"), mode="r")["patches"]
            where = np.flatnonzero(store_idx == s)
            order = where[np.argsort(rows[where], kind="stable")]  # sorted rows: each shard is decoded once per block
            for i in range(0, len(order), batch_size):
                sel = order[i:i + batch_size]
                x = normalize_uint8(torch.from_numpy(np.asarray(arr.oindex[rows[sel]])))
                if input_px and x.shape[-1] != input_px:
                    x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", antialias=True,
                                      align_corners=False)
                with autocast(dev):
                    f = fn(to_input(x, dev)).float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(rows), f.shape[1]), np.float32)
                out[sel] = f
    return out if out is not None else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------------------------ metrics
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry); zero rows stay zero."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def silhouette_per_area(x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Mean cosine silhouette overall and per label (needs >= 2 labels)."""
    from sklearn.metrics import silhouette_samples

    if len(np.unique(labels)) < 2:
        return {"overall": None, "per_area": {}}
    s = silhouette_samples(x, labels, metric="cosine")
    return {"overall": float(s.mean()),
            "per_area": {(a.item() if isinstance(a, np.generic) else a): float(s[labels == a].mean())
                         for a in np.unique(labels)}}


def _vote(neigh_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    # Majority vote; ties go to the class of the nearest neighbour among the tied classes.
    counts = (neigh_labels[:, :, None] == classes[None, None, :]).sum(1)
    best = counts == counts.max(1, keepdims=True)
    pred = np.empty(len(neigh_labels), classes.dtype)
    for i in range(len(neigh_labels)):
        tied = set(classes[best[i]].tolist())
        pred[i] = next(lab for lab in neigh_labels[i] if lab in tied)
    return pred


def _accuracy_report(y: np.ndarray, pred: np.ndarray, train_labels: np.ndarray | None = None) -> dict[str, Any]:
    classes = np.unique(y)
    per = {int(a): float((pred[y == a] == a).mean()) for a in classes}
    ref = y if train_labels is None else train_labels
    share = np.unique(ref, return_counts=True)[1] / len(ref)
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(list(per.values()))),
            "chance_accuracy": float(share.max()), "chance_balanced": float(1.0 / max(1, len(np.unique(ref)))),
            "per_area": per}


def knn_loo(x: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, Any]:
    """Leave-one-out kNN (cosine) accuracy overall, balanced, and per area (= recall of that area)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    if k < 1:
        return {"k": k, "n": int(len(x)), "accuracy": None, "balanced_accuracy": None, "per_area": {}}
    idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x).kneighbors(x, return_distance=False)
    # Drop the point itself (with duplicates it need not come first), keep the k nearest others.
    rows = np.arange(len(x))[:, None]
    keep = np.where(idx == rows, -1, idx)
    neigh = np.array([r[r >= 0][:k] for r in keep])
    pred = _vote(labels[neigh], np.unique(labels))
    return {"k": k, **_accuracy_report(labels, pred)}


def knn_transfer(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 k: int = 10) -> dict[str, Any]:
    """kNN (cosine) fit on one set, scored on another (e.g. known -> unknown brains)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x_train))
    idx = NearestNeighbors(n_neighbors=k, metric="cosine").fit(x_train).kneighbors(x_test, return_distance=False)
    pred = _vote(y_train[idx], np.unique(y_train))
    return {"k": k, **_accuracy_report(y_test, pred, y_train)}


def knn_leave_one_brain_out(x: np.ndarray, labels: np.ndarray, brains: np.ndarray, k: int = 10) -> dict[str, Any] | None:
    """kNN predicting each brain from all other brains (no spatial neighbours of the same brain help)."""
    ub = np.unique(brains)
    if len(ub) < 2:
        return None
    pred = np.empty_like(labels)
    for b in ub:
        te = brains == b
        from sklearn.neighbors import NearestNeighbors

        kk = min(k, int((~te).sum()))
        idx = NearestNeighbors(n_neighbors=kk, metric="cosine").fit(x[~te]).kneighbors(x[te], return_distance=False)
        pred[te] = _vote(labels[~te][idx], np.unique(labels[~te]))
    return {"k": k, "brains": [str(b) for b in ub], **_accuracy_report(labels, pred)}


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else None


def _fisher(y: np.ndarray, score: np.ndarray) -> float:
    a, b = score[y == 1], score[y == 0]
    return float((a.mean() - b.mean()) ** 2 / max(a.var() + b.var(), 1e-12))


def pair_separation(x: np.ndarray, is_a: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """How well two classes (e.g. FA = True, PB = False) separate in feature space (rows L2-normalised inside).

    ``separation_ratio``: distance between the class centroids / mean within-class RMS distance to the own
    centroid (scale-free; > 1 means the centroids are further apart than a typical point is from its centroid).
    ``fisher_lda`` / ``auc_lda`` / ``auc_logistic``: out-of-fold 1D projections, folds = ``groups`` (brains)
    when at least two groups hold both classes, else 5 stratified folds, so in-sample overfitting of a
    high-dimensional direction cannot inflate them.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold

    x = l2_normalize(np.asarray(x, np.float64))
    y = np.asarray(is_a).astype(int)
    n_a, n_b = int(y.sum()), int((1 - y).sum())
    res: dict[str, Any] = {"n_a": n_a, "n_b": n_b}
    if n_a < 2 or n_b < 2:
        return {**res, "separation_ratio": None, "fisher_lda": None, "auc_lda": None, "auc_logistic": None, "cv": None}
    res.update(_centroid_stats(x, y))
    # Folds: whole brains when possible (the honest "unseen brain" setting), else stratified folds.
    splits, cv = None, None
    if groups is not None and len(np.unique(groups)) >= 2:
        splits = list(LeaveOneGroupOut().split(x, y, groups))
        cv = f"leave-one-brain-out ({len(np.unique(groups))} brains)"
    if splits is None:
        n_folds = int(min(5, n_a, n_b))
        if n_folds < 2:
            return {**res, "fisher_lda": None, "auc_lda": None, "auc_logistic": None, "cv": None}
        splits = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, y))
        cv = f"{n_folds}-fold stratified"
    lda_s, log_s, tested = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y), bool)
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            continue
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], y[tr])
        lda_s[te] = lda.decision_function(x[te])
        log = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], y[tr])
        log_s[te] = log.decision_function(x[te])
        tested[te] = True
    yt = y[tested]
    res.update(cv=cv, n_tested=int(tested.sum()), fisher_lda=_fisher(yt, lda_s[tested]),
               auc_lda=_auc(yt, lda_s[tested]), auc_logistic=_auc(yt, log_s[tested]))
    return res


def _centroid_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Centroid distance, within-class RMS spreads and their ratio for labels y in {0, 1} (x L2-normalised)."""
    ca, cb = x[y == 1].mean(0), x[y == 0].mean(0)
    wa = float(np.sqrt(((x[y == 1] - ca) ** 2).sum(1).mean()))
    wb = float(np.sqrt(((x[y == 0] - cb) ** 2).sum(1).mean()))
    between = float(np.linalg.norm(ca - cb))
    return {"centroid_distance": between, "within_rms_a": wa, "within_rms_b": wb,
            "separation_ratio": between / max(0.5 * (wa + wb), 1e-12)}


def border_subset(xyz: np.ndarray, is_a: np.ndarray, brains: np.ndarray, radius_mm: float) -> np.ndarray:
    """Mask of patches within ``radius_mm`` (3D) of a patch of the other class in the same brain (the border zone)."""
    from scipy.spatial import cKDTree

    near = np.zeros(len(xyz), bool)
    for b in np.unique(brains):
        m = brains == b
        a, o = np.flatnonzero(m & is_a), np.flatnonzero(m & ~is_a)
        if len(a) == 0 or len(o) == 0:
            continue
        near[a] = cKDTree(xyz[o]).query(xyz[a], k=1)[0] <= radius_mm
        near[o] = cKDTree(xyz[a]).query(xyz[o], k=1)[0] <= radius_mm
    return near


# ------------------------------------------------------------------------------------------------ UMAP
def run_umap(x: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2D UMAP (cosine, fixed random_state: deterministic and single-threaded in umap-learn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Tensorflow not installed.*")  # ParametricUMAP is not used
        import umap

    if len(x) < 4:
        return np.zeros((len(x), 2), np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")  # random_state forces n_jobs=1: intended
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist,
                            metric="cosine", random_state=seed, init="spectral" if len(x) > 10 else "random")
        return reducer.fit_transform(x).astype(np.float32)


# ------------------------------------------------------------------------------------------------ plots
def _scatter_ax(ax: Any, df: pd.DataFrame, title: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def _point_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 3, 30))


def plot_by_area(df: pd.DataFrame, colors: dict[int, str], names: dict[int, str], path: Path, seed: int = 0) -> None:
    """UMAP coloured by area (areas-table colours); unlabelled points grey, underneath."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    s = _point_size(len(df))
    un = df[df["area_id"] == 0]
    if len(un):
        ax.scatter(un["umap_x"], un["umap_y"], s=s, c="#bbbbbb", alpha=0.5, linewidths=0,
                   label=f"{UNLABELLED} ({len(un)})")
    lab = df[df["area_id"] > 0].sample(frac=1.0, random_state=seed)  # random draw order: no area always on top
    ax.scatter(lab["umap_x"], lab["umap_y"], s=s, c=[colors.get(a, "#000000") for a in lab["area_id"]],
               alpha=0.8, linewidths=0)
    for a in sorted(lab["area_id"].unique()):
        ax.scatter([], [], s=40, c=colors.get(a, "#000000"), label=f"{names.get(a, a)} ({(lab['area_id'] == a).sum()})")
    _scatter_ax(ax, df, "UMAP of encoder features, by area")
    ax.legend(title="area (n)", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.0)
    atomic_savefig(fig, path, **FIGURE)


def plot_by_brain(df: pd.DataFrame, path: Path, seed: int = 0) -> None:
    """UMAP coloured by brain; unknown brains named as such in the legend."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    brains = sorted(df["brain"].unique())
    cmap = plt.get_cmap("tab10" if len(brains) <= 10 else "tab20")
    col = {b: cmap(i % cmap.N) for i, b in enumerate(brains)}
    sh = df.sample(frac=1.0, random_state=seed)
    ax.scatter(sh["umap_x"], sh["umap_y"], s=_point_size(len(df)), c=[col[b] for b in sh["brain"]], alpha=0.8,
               linewidths=0)
    roles = df.groupby("brain")["role"].first()
    for b in brains:
        ax.scatter([], [], s=40, color=col[b], label=f"{b} ({roles[b]}, {(df['brain'] == b).sum()})")
    _scatter_ax(ax, df, "UMAP of encoder features, by brain")
    ax.legend(title="brain (role, n)", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    atomic_savefig(fig, path, **FIGURE)


def plot_by_position(df: pd.DataFrame, path: Path) -> None:
    """Four panels: colour = x_mm, y_mm, z_mm (colour bars) and RGB from the normalised (x, y, z)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5.6))
    s = _point_size(len(df))
    for ax, c in zip(axes[:3], ("x_mm", "y_mm", "z_mm")):
        sc = ax.scatter(df["umap_x"], df["umap_y"], s=s, c=df[c], cmap="viridis", linewidths=0)
        _scatter_ax(ax, df, f"by 3D position: {c}")
        fig.colorbar(sc, ax=ax, shrink=0.8, label=f"{c[0]} (mm, reference space)")
    xyz = df[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    lo, hi = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)
    rgb = np.clip((xyz - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    axes[3].scatter(df["umap_x"], df["umap_y"], s=s, c=rgb, linewidths=0)
    _scatter_ax(axes[3], df, "by 3D position: RGB = (x, y, z)")
    axes[3].text(0.02, 0.02, "R = x, G = y, B = z\n(1-99th percentile scaled)", transform=axes[3].transAxes,
                 fontsize=9, va="bottom", bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    atomic_savefig(fig, path, **FIGURE)


def plot_pair(df: pd.DataFrame, pair: tuple[int, int], colors: dict[int, str], names: dict[int, str],
              sep: dict[str, Any], path: Path) -> None:
    """Left: UMAP with the pair (FA, PB) highlighted over all other points; right: where they lie in 3D (x, y)."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 6.5))
    s = _point_size(len(df))
    other = df[~df["area_id"].isin(pair)]
    ax.scatter(other["umap_x"], other["umap_y"], s=s, c="#d0d0d0", linewidths=0, label=f"other ({len(other)})")
    for a in pair:
        d = df[df["area_id"] == a]
        ax.scatter(d["umap_x"], d["umap_y"], s=s * 1.6, c=colors.get(a, "#000"), linewidths=0, alpha=0.9,
                   label=f"{names.get(a, a)} ({len(d)})")
        ax2.scatter(d["x_mm"], d["y_mm"], s=s * 1.6, c=colors.get(a, "#000"), linewidths=0, alpha=0.8,
                    label=names.get(a, a))
    _scatter_ax(ax, df, f"{names.get(pair[0])} vs {names.get(pair[1])} in the UMAP")
    ax.legend(loc="best", frameon=True, fontsize=9, markerscale=3)
    txt = [f"separation ratio {_fmt(sep.get('separation_ratio'))}",
           f"AUC LDA {_fmt(sep.get('auc_lda'))}, logistic {_fmt(sep.get('auc_logistic'))}",
           f"Fisher (1D LDA) {_fmt(sep.get('fisher_lda'))}", f"({sep.get('cv') or 'no CV'})"]
    ax.text(0.02, 0.02, "\n".join(txt), transform=ax.transAxes, fontsize=9, va="bottom",
            bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"))
    ax2.set_title("the same patches in 3D reference space (all brains, all z)", fontsize=11)
    ax2.set_xlabel("x (mm)")
    ax2.set_ylabel("y (mm)")
    ax2.set_aspect("equal", adjustable="datalim")
    ax2.invert_yaxis()  # image convention: y grows downwards, as in the section images
    ax2.legend(loc="best", fontsize=9, markerscale=3)
    atomic_savefig(fig, path, **FIGURE)


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


# ------------------------------------------------------------------------------------------------ report
def markdown_report(rep: dict[str, Any], names: dict[int, str]) -> str:
    """Small Markdown summary of separation.json."""
    m = rep["metrics"]
    lines = [f"# Embedding separation ({rep['model']['encoder']}, {rep['features']} features, dim {rep['feature_dim']})",
             "", f"{rep['n_points']} patches; labels from {rep['label_sources']}; "
             f"UMAP cosine, n_neighbors {rep['umap']['n_neighbors']}, min_dist {rep['umap']['min_dist']}, "
             f"seed {rep['seed']}.", "",
             "| area | n | silhouette (cosine) | kNN LOO acc | kNN leave-one-brain-out | kNN known→unknown |",
             "|---|---:|---:|---:|---:|---:|"]
    sil, loo = m["silhouette"], m["knn_loo"]
    lobo, xb = m.get("knn_leave_one_brain_out") or {}, m.get("knn_known_to_unknown") or {}
    def per(d: dict[str, Any], a: int) -> Any:
        return (d.get("per_area") or {}).get(a)

    for a in sorted(int(k) for k in rep["n_per_area"]):
        lines.append(f"| {names.get(a, a)} | {rep['n_per_area'][a]} | {_fmt(per(sil, a))} | {_fmt(per(loo, a))} | "
                     f"{_fmt(per(lobo, a))} | {_fmt(per(xb, a))} |")
    lines.append(f"| **all** (balanced) | {sum(rep['n_per_area'].values())} | {_fmt(sil.get('overall'))} | "
                 f"{_fmt(loo.get('accuracy'))} ({_fmt(loo.get('balanced_accuracy'))}) | "
                 f"{_fmt(lobo.get('accuracy'))} ({_fmt(lobo.get('balanced_accuracy'))}) | "
                 f"{_fmt(xb.get('accuracy'))} ({_fmt(xb.get('balanced_accuracy'))}) |")
    lines += ["", f"Silhouette by brain instead of area (batch effect; lower is better): "
              f"{_fmt(m.get('brain_silhouette'))}.",
              "", f"Chance (balanced): {_fmt(loo.get('chance_balanced'))}. kNN k = {loo.get('k')}, cosine, "
              "leave-one-out within the sample (spatial neighbours of the same brain count, so it is optimistic; "
              "the brain-held-out columns are the honest ones).", ""]
    p = m.get("pair")
    if p:
        lines += [f"## {p['names'][0]} vs {p['names'][1]} (across the central sulcus)", "",
                  "| subset | n (a / b) | centroid dist | within RMS (a / b) | separation ratio | Fisher 1D LDA | "
                  "AUC LDA | AUC logistic | CV |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
        for key, label in (("all", "all patches"), ("border", f"border zone (≤ {p['border_mm']} mm)"),
                           ("known_to_unknown", "train known → test unknown")):
            r = p.get(key)
            if not r:
                continue
            lines.append(f"| {label} | {r.get('n_a')} / {r.get('n_b')} | {_fmt(r.get('centroid_distance'))} | "
                         f"{_fmt(r.get('within_rms_a'))} / {_fmt(r.get('within_rms_b'))} | "
                         f"{_fmt(r.get('separation_ratio'))} | {_fmt(r.get('fisher_lda'))} | {_fmt(r.get('auc_lda'))} | "
                         f"{_fmt(r.get('auc_logistic'))} | {r.get('cv') or ''} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def pair_transfer(x_tr: np.ndarray, a_tr: np.ndarray, x_te: np.ndarray, a_te: np.ndarray) -> dict[str, Any]:
    """Pair classifiers trained on known brains, AUC on unknown brains."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te = l2_normalize(x_tr.astype(np.float64)), l2_normalize(x_te.astype(np.float64))
    res = {"n_a": int(a_te.sum()), "n_b": int((~a_te).sum()), "cv": "train known, test unknown"}
    if len(np.unique(a_tr)) < 2 or len(np.unique(a_te)) < 2:
        return res
    res.update(_centroid_stats(x_te, a_te.astype(int)))  # geometry of the unseen brain(s) alone
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x_tr, a_tr)
    log = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, a_tr)
    ls = lda.decision_function(x_te)
    res.update(auc_lda=_auc(a_te.astype(int), ls), fisher_lda=_fisher(a_te.astype(int), ls),
               auc_logistic=_auc(a_te.astype(int), log.decision_function(x_te)))
    return res


# ------------------------------------------------------------------------------------------------ driver
def embed(stores: Sequence[str | Path], out_dir: str | Path, areas_path: str | Path,
          brains_path: str | Path | None = None, encoder: str | Path | None = None, random_init: str | None = None,
          per_area: int = 150, seed: int = 0, features: str = "backbone", labels: str = "auto",
          pair: tuple[str, str] = ("FA", "PB"), include_none: bool = False, k: int = 10, border_mm: float = 2.0,
          n_neighbors: int = 15, min_dist: float = 0.1, batch_size: int = 256, device: str = "auto",
          threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole analysis and write the outputs into out_dir; returns the separation report (dict)."""
    if (encoder is None) == (random_init is None):
        raise ValueError("give exactly one of encoder (encoder.pt) or random_init (an encoder name)")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 3)
        if progress:
            print(f"embed: {name} done ({timings[name]:.1f} s)", file=sys.stderr, flush=True)

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from cytonet.io.tables import load_all_sections, load_areas, load_brains

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    areas = load_areas(areas_path)
    names = {int(a): str(n) for a, n in zip(areas["area_id"], areas["name"])}
    colors = {int(a): str(c) for a, c in zip(areas["area_id"], areas["color"])}
    table, meta = read_store_tables(stores)
    sections = None
    roles = {}
    if brains_path:
        brains = load_brains(brains_path, check_files=False)
        roles = dict(zip(brains["brain_id"].astype(str), brains["role"].astype(str)))
        sections = load_all_sections(brains_path, check_files=False)
        missing = sorted(set(table["brain"].astype(str)) - set(roles))
        if missing:
            raise ValueError(f"brain(s) {missing} of the stores are not in the brains table {brains_path}")
    table["role"] = [roles.get(str(b), "known") for b in table["brain"]]

    model, info = load_model(str(encoder) if encoder else None, random_init, seed)
    if info["pixel_size_um"] is not None and meta["pixel_size_um"] is not None and \
            abs(float(info["pixel_size_um"]) - float(meta["pixel_size_um"])) > 1e-6 * float(meta["pixel_size_um"]):
        raise ValueError(f"encoder {encoder} was trained at {info['pixel_size_um']} µm/px but the stores hold "
                         f"{meta['pixel_size_um']} µm/px patches")
    # Label only the brains/sections we use: read ground truth for all sections the stores cover.
    table = assign_areas(table, sections, areas, labels)
    lap("labels")
    pos = stratified_sample(table, per_area, seed, include_none)
    df = table.iloc[pos].reset_index(drop=True)
    if len(df) > 20_000:
        warnings.warn(f"{len(df)} points: UMAP and silhouette will be slow; lower --per-area")
    lap("sample")

    feats = embed_patches(model, stores, df["store"].to_numpy(), df["row"].to_numpy(), info["input_px"],
                          batch_size, features, device)
    lap("features")
    emb = run_umap(feats, seed, n_neighbors, min_dist)
    df["umap_x"], df["umap_y"] = emb[:, 0], emb[:, 1]
    lap("umap")

    # ---- metrics on labelled points (area > 0), high-dimensional features, cosine
    lab = df["area_id"].to_numpy() > 0
    xl = l2_normalize(feats[lab])
    yl = df["area_id"].to_numpy()[lab]
    bl = df["brain"].astype(str).to_numpy()[lab]
    rl = df["role"].to_numpy()[lab]
    metrics: dict[str, Any] = {"silhouette": silhouette_per_area(xl, yl), "knn_loo": knn_loo(xl, yl, k),
                               "knn_leave_one_brain_out": knn_leave_one_brain_out(xl, yl, bl, k)}
    # Batch effect: how much the features cluster by brain (stain, shrinkage) rather than by area.
    metrics["brain_silhouette"] = silhouette_per_area(xl, bl)["overall"] if len(set(bl)) > 1 else None
    known, unknown = rl == "known", rl == "unknown"
    metrics["knn_known_to_unknown"] = (
        {**knn_transfer(xl[known], yl[known], xl[unknown], yl[unknown], k),
         "train_brains": sorted(set(bl[known])), "test_brains": sorted(set(bl[unknown]))}
        if known.any() and unknown.any() else None)
    by_name = {v: k_ for k_, v in names.items()}
    sep: dict[str, Any] = {}
    if pair[0] in by_name and pair[1] in by_name:
        ida, idb = by_name[pair[0]], by_name[pair[1]]
        m = np.isin(yl, [ida, idb])
        is_a = yl[m] == ida
        xyz = df[["x_mm", "y_mm", "z_mm"]].to_numpy(float)[lab][m]
        border = border_subset(xyz, is_a, bl[m], border_mm)
        sep = pair_separation(xl[m], is_a, bl[m], seed)
        pm = {"names": list(pair), "area_ids": [ida, idb], "border_mm": border_mm, "all": sep,
              "border": pair_separation(xl[m][border], is_a[border], bl[m][border], seed)}
        kn, un = known[m], unknown[m]
        if kn.any() and un.any():
            pm["known_to_unknown"] = pair_transfer(xl[m][kn], is_a[kn], xl[m][un], is_a[un])
        # The same ratio in the 2D UMAP, for reading the plot (not a claim about the features).
        pm["umap_separation_ratio"] = _ratio_2d(emb[lab][m], is_a)
        metrics["pair"] = pm
    else:
        warnings.warn(f"pair {pair} not both in the areas table; no pair separation")
        metrics["pair"] = None
    lap("metrics")

    # ---- outputs
    df["area"] = [names.get(int(a), UNLABELLED) if a > 0 else UNLABELLED for a in df["area_id"]]
    df["brain"], df["section"] = df["brain"].astype(str), df["section"].astype(str)
    table_out = df[EMBEDDING_COLUMNS]
    with atomic_path(out / "embedding.parquet") as tmp:
        table_out.to_parquet(tmp, index=False)
    import matplotlib

    matplotlib.use("Agg")
    plot_by_area(df, colors, names, out / "umap_by_area.png", seed)
    plot_by_brain(df, out / "umap_by_brain.png", seed)
    plot_by_position(df, out / "umap_by_position.png")
    if metrics["pair"]:
        plot_pair(df, (metrics["pair"]["area_ids"][0], metrics["pair"]["area_ids"][1]), colors, names, sep,
                  out / "umap_fa_pb.png")
    else:  # keep the declared output: an explanatory placeholder
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"areas {pair} not in the areas table", ha="center", va="center")
        atomic_savefig(fig, out / "umap_fa_pb.png", **FIGURE)
    lap("write")

    n_per_area = {int(a): int(n) for a, n in zip(*np.unique(yl, return_counts=True))}
    rep = {"model": {k_: v for k_, v in info.items()}, "features": features, "feature_dim": int(feats.shape[1]),
           "stores": [str(s) for s in stores], "n_points": int(len(df)), "n_labelled": int(lab.sum()),
           "per_area_cap": per_area, "seed": seed, "labels_mode": labels,
           "label_sources": {str(k_): int(v) for k_, v in df["label_source"].value_counts().items()},
           "n_per_stratum": {f"{b}/{names.get(int(a), UNLABELLED) if a > 0 else UNLABELLED}": int(n)
                             for (b, a), n in df.groupby(["brain", "area_id"]).size().items()},
           "n_per_area": n_per_area, "area_names": {int(a): names[a] for a in n_per_area if a in names},
           "umap": {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": "cosine", "random_state": seed,
                    "umap_learn": _version("umap-learn")},
           "metrics": metrics, "timings_s": timings}
    atomic_write_json(out / "separation.json", rep)
    atomic_write_text(out / "separation.md", markdown_report(rep, names))
    return rep


def _ratio_2d(e: np.ndarray, is_a: np.ndarray) -> float | None:
    if is_a.sum() < 2 or (~is_a).sum() < 2:
        return None
    ca, cb = e[is_a].mean(0), e[~is_a].mean(0)
    w = 0.5 * (np.sqrt(((e[is_a] - ca) ** 2).sum(1).mean()) + np.sqrt(((e[~is_a] - cb) ** 2).sum(1).mean()))
    return float(np.linalg.norm(ca - cb) / max(w, 1e-12))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def summary_lines(rep: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    m = rep["metrics"]
    lines = [f"embed: {rep['n_points']} patches ({rep['n_labelled']} labelled; {rep['label_sources']}), "
             f"{rep['features']} features dim {rep['feature_dim']}, encoder {rep['model']['encoder']}",
             f"  silhouette (cosine) {_fmt(m['silhouette']['overall'])}; kNN LOO acc {_fmt(m['knn_loo']['accuracy'])} "
             f"(balanced {_fmt(m['knn_loo']['balanced_accuracy'])}, chance {_fmt(m['knn_loo'].get('chance_balanced'))})"]
    lines.append(f"  silhouette by brain (batch effect) {_fmt(m.get('brain_silhouette'))}")
    if m.get("knn_leave_one_brain_out"):
        lines.append(f"  kNN leave-one-brain-out acc {_fmt(m['knn_leave_one_brain_out']['accuracy'])} "
                     f"(balanced {_fmt(m['knn_leave_one_brain_out']['balanced_accuracy'])})")
    if m.get("knn_known_to_unknown"):
        x = m["knn_known_to_unknown"]
        lines.append(f"  kNN known→unknown ({','.join(x['test_brains'])}) acc {_fmt(x['accuracy'])} "
                     f"(balanced {_fmt(x['balanced_accuracy'])})")
    p = m.get("pair")
    if p:
        a = p["all"]
        lines.append(f"  {p['names'][0]} vs {p['names'][1]}: separation ratio {_fmt(a.get('separation_ratio'))}, "
                     f"Fisher {_fmt(a.get('fisher_lda'))}, AUC LDA {_fmt(a.get('auc_lda'))}, "
                     f"logistic {_fmt(a.get('auc_logistic'))} ({a.get('cv')})")
    return lines


# ------------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet embed``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", help="encoder.pt from cytonet pretrain")
    src.add_argument("--random-init", metavar="NAME", help="baseline: a random-init encoder (small|resnet50|resnet101)")
    parser.add_argument("--store", action="append", required=True, help="patch store folder (repeat; one per brain)")
    parser.add_argument("--areas", required=True, help="areas table (names, colours)")
    parser.add_argument("--brains", help="brains table (roles; sections' ground_truth for the area labels)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--per-area", type=int, default=150, help="patches per brain x area stratum (default 150)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and UMAP random_state (default 0)")
    parser.add_argument("--features", choices=("backbone", "projection"), default="backbone",
                        help="backbone features (default) or the projection head's output")
    parser.add_argument("--labels", choices=("auto", "ground_truth", "store"), default="auto",
                        help="area at the patch centre: auto = ground truth where the section has one, else the "
                             "store's area_id (default auto)")
    parser.add_argument("--pair", default="FA,PB", help="two area names whose separation is measured (default FA,PB)")
    parser.add_argument("--border-mm", type=float, default=2.0,
                        help="pair border zone: patches within this 3D distance of the other area (default 2)")
    parser.add_argument("--include-none", action="store_true", help="also sample area-0 (unlabelled) patches")
    parser.add_argument("--k", type=int, default=10, help="kNN neighbours (default 10)")
    parser.add_argument("--umap-neighbors", type=int, default=15)
    parser.add_argument("--umap-min-dist", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch / numba threads")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet embed``."""
    if args.threads:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))  # before umap imports numba
    pair = tuple(p.strip() for p in args.pair.split(","))
    if len(pair) != 2:
        raise SystemExit(f"--pair {args.pair!r}: expected two area names, e.g. FA,PB")
    rep = embed(args.store, args.out, args.areas, args.brains, args.encoder, args.random_init, args.per_area,
                args.seed, args.features, args.labels, pair, args.include_none, args.k, args.border_mm,
                args.umap_neighbors, args.umap_min_dist, args.batch_size, args.device, args.threads,
                progress=not args.quiet)
    print("\n".join(summary_lines(rep)))
    print(f"embed: wrote {', '.join(OUTPUTS)} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cytonet.analysis.embed ...`` (the same as the ``cytonet`` sub-command)."""
    from cytonet.cli import stage_main

    return stage_main("cytonet.analysis.embed", argv)


if __name__ == "__main__":
    sys.exit(main())
