"""Per-section evaluation of an area map against the section's ground truth (``cytonet section-metrics``).

Grid choice
-----------
Metrics are computed on the **prediction (output) grid**, the coarser of the two: the ground truth is reduced to
it by the **mode** of the ground-truth pixels whose centres fall in each output cell (0 = "not cortex" takes part in
the vote, ties go to the smaller value, so a cell is cortex only if cortex is its most common value). Why not the
other way round: upsampling the prediction would only replicate each cell, inflating the pixel counts without adding
information, and the ground truth at full resolution can be tens of gigapixels. Output cell (i, j) covers the
full-resolution pixels whose centres lie in [i·c, (i+1)·c) with c = output_um / image_um (the NGFF translation of
infer's OME-Zarr); a ground truth on a downsampled grid of the same extent is mapped through its scale factor.

Counting
--------
Only cortex cells (ground-truth label > 0) count. A cortex cell predicted "uncertain" or "outside tissue" is wrong:
it is a false negative of its true area and a false positive of no area. Per area a (areas present in the ground
truth or predicted inside the cortex): tp, fp, fn; ``f1 = 2tp / (2tp + fp + fn)``, ``iou = tp / (tp + fp + fn)``;
``n_px`` = cortex cells whose true area is a (support, in output-grid cells). Section summary: ``accuracy`` (correct
/ cortex cells), ``macro_f1`` (mean F1 over areas present in the ground truth), ``coverage`` (fraction of cortex
cells given a confident area label). The JSON also holds the confusion counts, so aggregation can pool pixels.
``macro_f1_argmax`` / ``accuracy_argmax`` (with ``confusion_argmax``) score the most probable area of every tissue
cell instead, read from the OME-Zarr probabilities: the threshold-free quality of the classifier, comparable with
the patch-level evaluation, while ``macro_f1`` is that of the map a user sees (uncertain cells count as wrong).

Outputs (each written to a temp file and renamed)
-------------------------------------------------
- CSV, one row per area: ``model, brain, section, role, status, area_id, area, f1, iou, n_px, tp, fp, fn``.
  A section without ground truth gets one row with ``status = no_ground_truth`` and empty metrics, so aggregation
  sees every section.
- JSON: ``model, brain, section, role, status, z_um, pred_dir, name, outputs`` (infer's output file names),
  ``output_um, grid_shape, n_cortex_px, accuracy, macro_f1, coverage, areas`` (id/name/color), ``per_area`` (the
  CSV rows) and ``confusion`` (``{true_id: {pred_value: count}}``; pred 0 = outside tissue, uncertain value as in
  the manifest).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.annotations import AnnotationError, labels_to_grid, load_labels, read_image
from cytonet.io.atomic import atomic_write_csv, atomic_write_json
from cytonet.io.maps import read_manifest
from cytonet.io.metrics import STATUS_NO_GT, STATUS_OK, confusion_counts, scores_from_confusion, summary_from_confusion

CSV_COLUMNS = ["model", "brain", "section", "role", "status", "area_id", "area", "f1", "iou", "n_px", "tp", "fp", "fn"]


class MetricsError(ValueError):
    """Bad input to section metrics; the message names the file or section."""


# ------------------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """An inference (or smooth3d) output as section metrics needs it."""

    labels: np.ndarray          # (gh, gw) area ids, 0 outside tissue, ``uncertain`` where not confident
    uncertain: int
    output_um: float
    image_um: float
    areas: list[dict]           # [{"area_id", "name", "color"}]
    manifest: dict
    pred_dir: Path
    name: str
    zarr: Path | None = None    # infer's OME-Zarr probabilities, for the argmax metrics (None: not written)


def read_prediction(pred_dir: str | os.PathLike, name: str) -> Prediction:
    """Read ``<pred_dir>/<name>_infer.json`` and the area PNG it lists."""
    pred_dir = Path(pred_dir)
    manifest = read_manifest(pred_dir, name, MetricsError)
    png = pred_dir / manifest.get("outputs", {}).get("areas_png", f"{name}_areas.png")
    if not png.is_file():
        raise MetricsError(f"section {name}: area map {png} not found")
    labels = read_image(png)
    zarr = pred_dir / manifest.get("outputs", {}).get("zarr", f"{name}.ome.zarr")
    return Prediction(labels, int(manifest.get("uncertain_value", 255)), float(manifest["output_um"]),
                      float(manifest["image_pixel_size_um"]), list(manifest.get("areas", [])), manifest, pred_dir,
                      name, zarr if zarr.is_dir() else None)


def _most_probable(zarr_path: Path, areas: list[dict]) -> np.ndarray:
    """Most probable area id per cell of the full-resolution level of infer's probabilities (0 outside tissue)."""
    import zarr

    probs = np.asarray(zarr.open_group(str(zarr_path), mode="r")["0"][...])  # (areas, gh, gw), NaN outside tissue
    ids = np.array([int(a["area_id"]) for a in areas])
    inside = ~np.isnan(probs).any(axis=0)
    return np.where(inside, ids[np.argmax(np.nan_to_num(probs, nan=-1.0), axis=0)], 0)


# ---------------------------------------------------------------------------------------------------- metrics
def section_scores(truth: np.ndarray, pred: np.ndarray, uncertain: int = 255,
                   area_ids: list[int] | None = None) -> tuple[pd.DataFrame, dict[str, float], dict]:
    """(per-area table, summary, confusion) of a prediction against a ground truth on the same grid."""
    if truth.shape != pred.shape:
        raise MetricsError(f"ground truth {truth.shape} and prediction {pred.shape} are not on the same grid")
    conf = confusion_counts(truth, pred)
    return scores_from_confusion(conf, area_ids, uncertain), summary_from_confusion(conf, uncertain), conf


# ------------------------------------------------------------------------------------------ ground-truth input
def _full_res_shape(image: str | None, pixel_size_um: float | None) -> tuple[int, int] | None:
    """Full-resolution image shape from its header (None when the image cannot be opened)."""
    if not image or not Path(image).exists():
        return None
    try:
        from cytonet.io.readers import open_section

        return tuple(int(v) for v in open_section(image, pixel_size_um=pixel_size_um).levels[0].shape)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - fall back to "ground truth is full resolution"
        return None


def ground_truth_on_grid(gt_path: str | os.PathLike, pred: Prediction, section: str,
                         full_shape: tuple[int, int] | None) -> np.ndarray:
    """Read a ground-truth label image (PNG/TIFF/GeoJSON) and reduce it to the prediction grid by mode."""
    gt_path = Path(gt_path)
    if not gt_path.is_file():
        raise MetricsError(f"section {section}: ground truth {gt_path} not found")
    gh, gw = pred.labels.shape
    cell_px = pred.output_um / pred.image_um
    areas = pd.DataFrame({"area_id": [a["area_id"] for a in pred.areas], "name": [a["name"] for a in pred.areas]})
    try:
        gt = load_labels(gt_path, section, areas, full_shape)
    except AnnotationError as exc:
        raise MetricsError(f"section {section}: ground truth: {exc.problem} ({gt_path})") from exc
    if full_shape is None:
        full_shape = gt.shape  # assume the full-resolution grid (the demo's truth/ images are)
        expect = (math.ceil(gt.shape[0] / cell_px), math.ceil(gt.shape[1] / cell_px))
        if abs(expect[0] - gh) > 1 or abs(expect[1] - gw) > 1:
            raise MetricsError(f"section {section}: ground truth {gt_path} shape {gt.shape} does not match the "
                               f"prediction grid {gh}x{gw} at {cell_px:g} px/cell; give the section image so its "
                               f"full-resolution shape is known")
    factor = (full_shape[0] / gt.shape[0], full_shape[1] / gt.shape[1])
    if abs(factor[0] / factor[1] - 1) > 0.02:
        raise MetricsError(f"section {section}: ground truth {gt_path} shape {gt.shape} does not cover the image "
                           f"extent {full_shape}")
    return labels_to_grid(gt, (gh, gw), cell_px, factor)


# ---------------------------------------------------------------------------------------------------- section
def evaluate_section(pred_dir: str | os.PathLike, name: str, *, brain: str, section: str, role: str,
                     ground_truth: str | None, image: str | None = None, pixel_size_um: float | None = None,
                     z_um: float | None = None, model: str = "cytonet",
                     truth_cache: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-area CSV table and JSON summary of one section (status ``no_ground_truth`` when there is none).

    ``truth_cache``: a dict shared by the calls for several models' maps of one section, so the ground truth is
    read and reduced to the output grid once per grid, not once per model.
    """
    pred = read_prediction(pred_dir, name)
    base = {"model": model, "brain": brain, "section": section, "role": role}
    summary: dict[str, Any] = {**base, "z_um": z_um, "pred_dir": str(Path(pred_dir).resolve()), "name": name,
                               "outputs": pred.manifest.get("outputs", {}), "output_um": pred.output_um,
                               "grid_shape": list(pred.labels.shape), "uncertain_value": pred.uncertain,
                               "areas": pred.areas}
    names = {int(a["area_id"]): str(a["name"]) for a in pred.areas}
    if not ground_truth or (isinstance(ground_truth, float) and math.isnan(ground_truth)):
        row = {**base, "status": STATUS_NO_GT}
        summary.update(status=STATUS_NO_GT, n_cortex_px=0, accuracy=None, macro_f1=None, coverage=None,
                       macro_f1_argmax=None, accuracy_argmax=None, per_area=[], confusion={}, confusion_argmax={})
        return pd.DataFrame([row], columns=CSV_COLUMNS), summary
    key = (str(ground_truth), pred.labels.shape, pred.output_um, pred.image_um, tuple(sorted(names)))
    cache = truth_cache if truth_cache is not None else {}
    if key not in cache:
        cache[key] = ground_truth_on_grid(ground_truth, pred, section, _full_res_shape(image, pixel_size_um))
    truth = cache[key]
    unknown = sorted(set(int(v) for v in np.unique(truth)) - set(names) - {0})
    if names and unknown:
        raise MetricsError(f"section {section}: ground truth {ground_truth} has area id(s) {unknown} that are not "
                           f"in the prediction's area table")
    per, summ, conf = section_scores(truth, pred.labels, pred.uncertain)
    per.insert(1, "area", [names.get(int(a), str(a)) for a in per["area_id"]])
    for k, v in reversed(list({**base, "status": STATUS_OK}.items())):
        per.insert(0, k, v)
    per = per[CSV_COLUMNS]
    summary.update(status=STATUS_OK, **summ, per_area=per.drop(columns=list(base) + ["status"]).to_dict("records"),
                   confusion=conf)
    if pred.zarr is not None and pred.areas:
        _, top, top_conf = section_scores(truth, _most_probable(pred.zarr, pred.areas), pred.uncertain)
        summary.update(macro_f1_argmax=top["macro_f1"], accuracy_argmax=top["accuracy"], confusion_argmax=top_conf)
    return per, summary


def _section_row(brains: str, brain: str, section: str, thickness: float | None) -> tuple[str, Any]:
    from cytonet.io.tables import load_brains, load_sections

    bt = load_brains(brains, check_files=False)
    match = bt[bt["brain_id"] == brain]
    if match.empty:
        raise MetricsError(f"brain '{brain}' is not in the brains table {brains}")
    role = str(match.iloc[0]["role"])
    st = load_sections(match.iloc[0]["sections"], brain, check_files=False, section_thickness_um=thickness)
    rows = st[st["section_id"] == section]
    if rows.empty:
        raise MetricsError(f"section '{section}' is not in brain '{brain}' ({match.iloc[0]['sections']})")
    return role, rows.iloc[0]


# ------------------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet section-metrics``."""
    parser.add_argument("--brains", required=True, help="brains table (gives the role and the sections table)")
    parser.add_argument("--brain", required=True, help="brain id")
    parser.add_argument("--section", required=True, help="section id")
    parser.add_argument("--pred", required=True, action="append",
                        help="folder with <name>_infer.json and <name>_areas.png; repeat with --model, --out-csv "
                             "and --out-json to score several models' maps of the section in one process")
    parser.add_argument("--name", help="output name in --pred (default: the section id)")
    parser.add_argument("--out-csv", required=True, action="append", help="per-area CSV to write (one per --pred)")
    parser.add_argument("--out-json", required=True, action="append", help="JSON summary to write (one per --pred)")
    parser.add_argument("--model", action="append",
                        help="model label for the tables, one per --pred (default: cytonet for a single --pred)")
    parser.add_argument("--ground-truth", help="override the sections table's ground_truth ('none' = ignore it)")
    parser.add_argument("--section-thickness-um", type=float, help="config section_thickness_um (for section_index)")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet section-metrics``: one table and summary per (--pred, --model, --out-csv, --out-json)."""
    models = args.model or (["cytonet"] if len(args.pred) == 1 else [])
    if not len(args.pred) == len(models) == len(args.out_csv) == len(args.out_json):
        print(f"cytonet section-metrics: error: {len(args.pred)} --pred, {len(models)} --model, "
              f"{len(args.out_csv)} --out-csv and {len(args.out_json)} --out-json; give one of each per model",
              file=sys.stderr)
        return 2
    try:
        role, row = _section_row(args.brains, args.brain, args.section, args.section_thickness_um)
        gt = row.get("ground_truth")
        if args.ground_truth:
            gt = None if args.ground_truth.lower() == "none" else args.ground_truth
        gt = None if gt is None or (isinstance(gt, float) and math.isnan(gt)) else str(gt)
        px = row.get("pixel_size_um")
        px = float(px) if px is not None and not pd.isna(px) else None
        truth_cache: dict = {}
        results = [evaluate_section(pred, args.name or args.section, brain=args.brain, section=args.section,
                                    role=role, ground_truth=gt, image=row.get("image"), pixel_size_um=px,
                                    z_um=float(row["z_um"]), model=model, truth_cache=truth_cache)
                   for pred, model in zip(args.pred, models)]
    except (MetricsError, ValueError) as exc:
        print(f"cytonet section-metrics: error: {exc}", file=sys.stderr)
        return 2
    for (table, summary), model, out_csv, out_json in zip(results, models, args.out_csv, args.out_json):
        atomic_write_csv(out_csv, table)
        atomic_write_json(out_json, summary)
        where = f"{args.brain}/{args.section} ({model})"
        if summary["status"] == STATUS_OK:
            print(f"{where}: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}, coverage "
                  f"{summary['coverage']:.3f}, argmax macro-F1 {summary.get('macro_f1_argmax') or float('nan'):.3f} "
                  f"({summary['n_cortex_px']} cortex cells)")
        else:
            print(f"{where}: no ground truth")
    return 0
