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

Code: :mod:`cytonet.analysis.embed_data` (tables, labels, sample, features, UMAP),
:mod:`cytonet.analysis.embed_metrics` (separation metrics), :mod:`cytonet.analysis.embed_plots` (plots, Markdown
report); this module runs the steps and holds the command line, and re-exports the public names.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.analysis.embed_data import (
    assign_areas,
    embed_patches,
    load_model,
    read_store_tables,
    run_umap,
    stratified_sample,
)
from cytonet.analysis.embed_metrics import (
    _ratio_2d,
    border_subset,
    knn_leave_one_brain_out,
    knn_loo,
    knn_transfer,
    l2_normalize,
    pair_separation,
    pair_transfer,
    silhouette_per_area,
)
from cytonet.analysis.embed_plots import (
    FIGURE,
    UNLABELLED,
    _fmt,
    markdown_report,
    plot_by_area,
    plot_by_brain,
    plot_by_position,
    plot_missing_pair,
    plot_pair,
)
from cytonet.io.atomic import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["OUTPUTS", "EMBEDDING_COLUMNS", "UNLABELLED", "FIGURE", "read_store_tables", "assign_areas",
           "stratified_sample", "load_model", "embed_patches", "run_umap", "l2_normalize", "silhouette_per_area",
           "knn_loo", "knn_transfer", "knn_leave_one_brain_out", "pair_separation", "pair_transfer", "border_subset",
           "plot_by_area", "plot_by_brain", "plot_by_position", "plot_pair", "markdown_report", "embed",
           "summary_lines", "configure_parser", "run"]

OUTPUTS = ("embedding.parquet", "umap_by_area.png", "umap_by_brain.png", "umap_by_position.png",
           "umap_fa_pb.png", "separation.json", "separation.md")
EMBEDDING_COLUMNS = ["index", "store", "brain", "role", "section", "x_px", "y_px", "x_mm", "y_mm", "z_mm",
                     "area_id", "area", "label_source", "umap_x", "umap_y"]


# ------------------------------------------------------------------------------------------------ driver
class _Laps:
    """Seconds per step since the previous one (``timings_s`` of the report); a stderr line each with progress."""

    def __init__(self, progress: bool) -> None:
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.progress = progress

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t0 - sum(self.timings.values()), 3)
        if self.progress:
            print(f"embed: {name} done ({self.timings[name]:.1f} s)", file=sys.stderr, flush=True)


def _read_inputs(stores: Sequence[str | Path], brains_path: str | Path | None) -> tuple[pd.DataFrame, dict[str, Any],
                                                                                        pd.DataFrame | None]:
    """The stores' patch table with each brain's role, the store metadata, and the sections (None without brains)."""
    from cytonet.io.tables import load_all_sections, load_brains

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
    return table, meta, sections


def _check_resolution(info: dict[str, Any], meta: dict[str, Any], encoder: str | Path | None) -> None:
    """The encoder must have been trained at the stores' pixel size (when both are known)."""
    if info["pixel_size_um"] is not None and meta["pixel_size_um"] is not None and \
            abs(float(info["pixel_size_um"]) - float(meta["pixel_size_um"])) > 1e-6 * float(meta["pixel_size_um"]):
        raise ValueError(f"encoder {encoder} was trained at {info['pixel_size_um']} µm/px but the stores hold "
                         f"{meta['pixel_size_um']} µm/px patches")


@dataclass
class _Labelled:
    """The labelled points (area > 0) of the sample: L2-normalised features, area, brain, role."""

    lab: np.ndarray  # bool over the sample
    x: np.ndarray
    area: np.ndarray
    brain: np.ndarray
    role: np.ndarray


def _area_metrics(pts: _Labelled, k: int) -> dict[str, Any]:
    """Silhouettes and kNN accuracies of the areas (and the brain silhouette, a batch effect)."""
    xl, yl, bl, rl = pts.x, pts.area, pts.brain, pts.role
    metrics: dict[str, Any] = {"silhouette": silhouette_per_area(xl, yl), "knn_loo": knn_loo(xl, yl, k),
                               "knn_leave_one_brain_out": knn_leave_one_brain_out(xl, yl, bl, k)}
    # Batch effect: how much the features cluster by brain (stain, shrinkage) rather than by area.
    metrics["brain_silhouette"] = silhouette_per_area(xl, bl)["overall"] if len(set(bl)) > 1 else None
    known, unknown = rl == "known", rl == "unknown"
    metrics["knn_known_to_unknown"] = (
        {**knn_transfer(xl[known], yl[known], xl[unknown], yl[unknown], k),
         "train_brains": sorted(set(bl[known])), "test_brains": sorted(set(bl[unknown]))}
        if known.any() and unknown.any() else None)
    return metrics


def _pair_metrics(df: pd.DataFrame, pts: _Labelled, emb: np.ndarray, names: dict[int, str], pair: tuple[str, str],
                  border_mm: float, seed: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(pair report, separation over all pair patches) of the two named areas; (None, {}) when one is unknown."""
    xl, yl, bl, rl = pts.x, pts.area, pts.brain, pts.role
    by_name = {v: k_ for k_, v in names.items()}
    if not (pair[0] in by_name and pair[1] in by_name):
        warnings.warn(f"pair {pair} not both in the areas table; no pair separation", stacklevel=2)
        return None, {}
    ida, idb = by_name[pair[0]], by_name[pair[1]]
    m = np.isin(yl, [ida, idb])
    is_a = yl[m] == ida
    xyz = df[["x_mm", "y_mm", "z_mm"]].to_numpy(float)[pts.lab][m]
    border = border_subset(xyz, is_a, bl[m], border_mm)
    sep = pair_separation(xl[m], is_a, bl[m], seed)
    pm = {"names": list(pair), "area_ids": [ida, idb], "border_mm": border_mm, "all": sep,
          "border": pair_separation(xl[m][border], is_a[border], bl[m][border], seed)}
    kn, un = (rl == "known")[m], (rl == "unknown")[m]
    if kn.any() and un.any():
        pm["known_to_unknown"] = pair_transfer(xl[m][kn], is_a[kn], xl[m][un], is_a[un])
    # The same ratio in the 2D UMAP, for reading the plot (not a claim about the features).
    pm["umap_separation_ratio"] = _ratio_2d(emb[pts.lab][m], is_a)
    return pm, sep


def _write_table_and_plots(df: pd.DataFrame, out: Path, colors: dict[int, str], names: dict[int, str],
                           pair_metrics: dict[str, Any] | None, sep: dict[str, Any], pair: tuple[str, str],
                           seed: int) -> None:
    """embedding.parquet and the four UMAP plots (adds the ``area`` column to ``df``)."""
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
    if pair_metrics:
        plot_pair(df, (pair_metrics["area_ids"][0], pair_metrics["area_ids"][1]), colors, names, sep,
                  out / "umap_fa_pb.png")
    else:  # keep the declared output: an explanatory placeholder
        plot_missing_pair(pair, out / "umap_fa_pb.png")


def embed(stores: Sequence[str | Path], out_dir: str | Path, areas_path: str | Path,
          brains_path: str | Path | None = None, encoder: str | Path | None = None, random_init: str | None = None,
          per_area: int = 150, seed: int = 0, features: str = "backbone", labels: str = "auto",
          pair: tuple[str, str] = ("FA", "PB"), include_none: bool = False, k: int = 10, border_mm: float = 2.0,
          n_neighbors: int = 15, min_dist: float = 0.1, batch_size: int = 256, device: str = "auto",
          threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole analysis and write the outputs into out_dir; returns the separation report (dict)."""
    if (encoder is None) == (random_init is None):
        raise ValueError("give exactly one of encoder (encoder.pt) or random_init (an encoder name)")
    lap = _Laps(progress)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from cytonet.io.tables import load_areas

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    areas = load_areas(areas_path)
    names = {int(a): str(n) for a, n in zip(areas["area_id"], areas["name"])}
    colors = {int(a): str(c) for a, c in zip(areas["area_id"], areas["color"])}
    table, meta, sections = _read_inputs(stores, brains_path)
    model, info = load_model(str(encoder) if encoder else None, random_init, seed)
    _check_resolution(info, meta, encoder)
    # Label only the brains/sections we use: read ground truth for all sections the stores cover.
    table = assign_areas(table, sections, areas, labels)
    lap("labels")
    df = table.iloc[stratified_sample(table, per_area, seed, include_none)].reset_index(drop=True)
    if len(df) > 20_000:
        warnings.warn(f"{len(df)} points: UMAP and silhouette will be slow; lower --per-area", stacklevel=2)
    lap("sample")

    feats = embed_patches(model, stores, df["store"].to_numpy(), df["row"].to_numpy(), info["input_px"],
                          batch_size, features, device)
    lap("features")
    emb = run_umap(feats, seed, n_neighbors, min_dist)
    df["umap_x"], df["umap_y"] = emb[:, 0], emb[:, 1]
    lap("umap")

    # ---- metrics on labelled points (area > 0), high-dimensional features, cosine
    lab = df["area_id"].to_numpy() > 0
    pts = _Labelled(lab, l2_normalize(feats[lab]), df["area_id"].to_numpy()[lab],
                    df["brain"].astype(str).to_numpy()[lab], df["role"].to_numpy()[lab])
    metrics = _area_metrics(pts, k)
    metrics["pair"], sep = _pair_metrics(df, pts, emb, names, pair, border_mm, seed)
    lap("metrics")

    _write_table_and_plots(df, out, colors, names, metrics["pair"], sep, pair, seed)
    lap("write")

    rep = _report(info, features, feats, stores, df, pts, per_area, seed, labels, names, n_neighbors, min_dist,
                  metrics, lap.timings)
    atomic_write_json(out / "separation.json", rep)
    atomic_write_text(out / "separation.md", markdown_report(rep, names))
    return rep


def _report(info: dict[str, Any], features: str, feats: np.ndarray, stores: Sequence[str | Path], df: pd.DataFrame,
            pts: _Labelled, per_area: int, seed: int, labels: str, names: dict[int, str], n_neighbors: int,
            min_dist: float, metrics: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The separation report (``separation.json``)."""
    n_per_area = {int(a): int(n) for a, n in zip(*np.unique(pts.area, return_counts=True))}
    return {"model": {k_: v for k_, v in info.items()}, "features": features, "feature_dim": int(feats.shape[1]),
            "stores": [str(s) for s in stores], "n_points": int(len(df)), "n_labelled": int(pts.lab.sum()),
            "per_area_cap": per_area, "seed": seed, "labels_mode": labels,
            "label_sources": {str(k_): int(v) for k_, v in df["label_source"].value_counts().items()},
            "n_per_stratum": {f"{b}/{names.get(int(a), UNLABELLED) if a > 0 else UNLABELLED}": int(n)
                              for (b, a), n in df.groupby(["brain", "area_id"]).size().items()},
            "n_per_area": n_per_area, "area_names": {int(a): names[a] for a in n_per_area if a in names},
            "umap": {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": "cosine", "random_state": seed,
                     "umap_learn": _version("umap-learn")},
            "metrics": metrics, "timings_s": timings}


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
             f"(balanced {_fmt(m['knn_loo']['balanced_accuracy'])}, "
             f"chance {_fmt(m['knn_loo'].get('chance_balanced'))})"]
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
