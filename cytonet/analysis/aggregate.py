"""Aggregate section metrics into per-brain and overall tables, an index of the maps and per-brain montages.

Input: the JSON summaries of ``cytonet section-metrics`` (one per section and model; they carry the role, z, the
confusion counts and where the maps are). Outputs in ``--out`` (every file written to a temp file, then renamed):

- ``metrics_sections.csv``: one row per (model, section): model, brain, section, role, status, z_um, accuracy,
  macro_f1, coverage, macro_f1_argmax, n_cortex_px.
- ``metrics_brains.csv`` / ``.md``: one row per (model, brain): model, brain, role, n_sections, n_evaluated,
  macro_f1_mean, accuracy_mean, coverage_mean (means over the evaluated sections), accuracy_pooled,
  macro_f1_pooled, macro_f1_argmax_pooled (most probable area, no uncertainty threshold), then ``f1_<area>``
  and ``iou_<area>`` (pixel-pooled over the brain's sections).
- ``metrics_overall.csv`` / ``.md``: one row per (model, group), group = ``known``, ``unknown`` (role from the brains
  table) and ``all``: model, group, n_brains, n_sections, n_evaluated and the same metric columns, pooled over all
  sections of the group's brains. Baseline rows (another ``--model`` label given to section-metrics) simply appear
  as more rows.
- ``metrics_areas.csv``: long form of the per-area numbers: model, level (brain/group), key, area_id, area, tp, fp,
  fn, n_px, f1, iou.
- ``confusion.csv``: model, level, key, true_id, true_area, pred_value, pred_area (area name, ``uncertain`` or
  ``outside``), count; cortex output cells.
- ``maps_index.csv`` / ``.md``: model, brain, section, role, z_um, zarr, areas_png, overlay_png, entropy_tif,
  areas_geojson, macro_f1; the paths are relative to ``--out``, so the results folder can move as a whole.
- ``montage_<brain>.png``: the overlays of all sections of the brain in z order (of the ``--montage-model``), titled
  with the section id (and macro-F1 of the map and of the most probable areas), with a colour legend of the
  areas; at most ``--montage-width`` px wide.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.atomic import atomic_write_bytes, atomic_write_csv, atomic_write_text
from cytonet.io.metrics import STATUS_OK, scores_from_confusion, summary_from_confusion

METRIC_COLUMNS = ["macro_f1_mean", "accuracy_mean", "coverage_mean", "accuracy_pooled", "macro_f1_pooled",
                  "macro_f1_argmax_pooled"]
MAP_KEYS = {"zarr": "zarr", "areas_png": "areas_png", "overlay_png": "overlay_png", "entropy_tif": "entropy_tif",
            "areas_geojson": "areas_geojson"}


class AggregateError(ValueError):
    """Bad input to aggregation; the message names the file."""


# -------------------------------------------------------------------------------------------------- inputs
def load_summaries(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Read section-metrics JSON summaries; duplicates of (model, brain, section) are an error."""
    out, seen = [], {}
    for p in paths:
        p = Path(p)
        try:
            s = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AggregateError(f"cannot read section summary {p}: {exc}") from exc
        for k in ("model", "brain", "section", "role", "status"):
            if k not in s:
                raise AggregateError(f"section summary {p} has no '{k}' (not written by cytonet section-metrics?)")
        key = (s["model"], s["brain"], s["section"])
        if key in seen:
            raise AggregateError(f"section {key} appears twice: {seen[key]} and {p}")
        seen[key] = p
        s["_path"] = str(p)
        out.append(s)
    if not out:
        raise AggregateError("no section summaries given")
    return out


def area_names(summaries: Sequence[dict]) -> dict[int, str]:
    """area id -> name over all summaries (first seen wins)."""
    names: dict[int, str] = {}
    for s in summaries:
        for a in s.get("areas") or []:
            names.setdefault(int(a["area_id"]), str(a["name"]))
    return dict(sorted(names.items()))


def area_colours(summaries: Sequence[dict]) -> dict[int, str]:
    """area id -> '#rrggbb'."""
    cols: dict[int, str] = {}
    for s in summaries:
        for a in s.get("areas") or []:
            cols.setdefault(int(a["area_id"]), str(a["color"]))
    return cols


def _merge_confusion(summaries: Iterable[dict], key: str = "confusion") -> dict[int, dict[int, int]]:
    total: dict[int, dict[int, int]] = {}
    for s in summaries:
        for t, row in (s.get(key) or {}).items():
            dst = total.setdefault(int(t), {})
            for p, k in row.items():
                dst[int(p)] = dst.get(int(p), 0) + int(k)
    return total


def _nanmean(values: Iterable[Any]) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def _uncertain(summaries: Sequence[dict]) -> int:
    return int(next((s["uncertain_value"] for s in summaries if "uncertain_value" in s), 255))


# -------------------------------------------------------------------------------------------------- tables
def section_table(summaries: Sequence[dict]) -> pd.DataFrame:
    """One row per (model, section)."""
    cols = ["model", "brain", "section", "role", "status", "z_um", "accuracy", "macro_f1", "coverage",
            "macro_f1_argmax", "n_cortex_px"]
    rows = [{c: s.get(c) for c in cols} for s in summaries]
    t = pd.DataFrame(rows, columns=cols)
    for c in ("z_um", "accuracy", "macro_f1", "coverage", "macro_f1_argmax"):
        t[c] = pd.to_numeric(t[c], errors="coerce")
    return t.sort_values(["model", "brain", "z_um", "section"], kind="stable").reset_index(drop=True)


def group_metrics(summaries: Sequence[dict], names: dict[int, str]) -> tuple[dict[str, Any], pd.DataFrame, dict]:
    """(metric columns, per-area table, pooled confusion) of a group of sections of one model."""
    ok = [s for s in summaries if s["status"] == STATUS_OK]
    unc = _uncertain(summaries)
    conf = _merge_confusion(ok)
    pooled = summary_from_confusion(conf, unc)
    per = scores_from_confusion(conf, uncertain=unc)
    per.insert(1, "area", [names.get(int(a), str(a)) for a in per["area_id"]])
    row = {"n_sections": len(summaries), "n_evaluated": len(ok),
           "macro_f1_mean": _nanmean(s.get("macro_f1") for s in ok),
           "accuracy_mean": _nanmean(s.get("accuracy") for s in ok),
           "coverage_mean": _nanmean(s.get("coverage") for s in ok),
           "accuracy_pooled": pooled["accuracy"], "macro_f1_pooled": pooled["macro_f1"],
           # threshold-free: the most probable area of every cell (NaN for summaries written without it)
           "macro_f1_argmax_pooled": summary_from_confusion(_merge_confusion(ok, "confusion_argmax"), unc)["macro_f1"]}
    f1 = dict(zip(per["area_id"], per["f1"]))
    iou = dict(zip(per["area_id"], per["iou"]))
    for a, n in names.items():
        row[f"f1_{n}"] = f1.get(a, float("nan"))
    for a, n in names.items():
        row[f"iou_{n}"] = iou.get(a, float("nan"))
    return row, per, conf


def aggregate_tables(summaries: Sequence[dict]) -> dict[str, pd.DataFrame]:
    """``sections``, ``brains``, ``overall``, ``areas`` and ``confusion`` tables (see the module docstring)."""
    names = area_names(summaries)
    unc = _uncertain(summaries)
    models = list(dict.fromkeys(s["model"] for s in summaries))
    brains_rows, overall_rows, area_rows, conf_rows = [], [], [], []

    def add_long(model: str, level: str, key: str, per: pd.DataFrame, conf: dict) -> None:
        for r in per.to_dict("records"):
            area_rows.append({"model": model, "level": level, "key": key, **r})
        for t, row in sorted(conf.items()):
            for p, k in sorted(row.items()):
                pname = "outside" if p == 0 else "uncertain" if p == unc else names.get(p, str(p))
                conf_rows.append({"model": model, "level": level, "key": key, "true_id": t,
                                  "true_area": names.get(t, str(t)), "pred_value": p, "pred_area": pname, "count": k})

    for model in models:
        ms = [s for s in summaries if s["model"] == model]
        brains = list(dict.fromkeys(s["brain"] for s in ms))
        roles = {}
        for b in brains:
            bs = [s for s in ms if s["brain"] == b]
            role_set = {s["role"] for s in bs}
            if len(role_set) > 1:
                raise AggregateError(f"brain '{b}' has sections with different roles {sorted(role_set)}")
            roles[b] = role_set.pop()
            row, per, conf = group_metrics(bs, names)
            brains_rows.append({"model": model, "brain": b, "role": roles[b], **row})
            add_long(model, "brain", b, per, conf)
        for group in ("known", "unknown", "all"):
            gb = [b for b in brains if group == "all" or roles[b] == group]
            gs = [s for s in ms if s["brain"] in gb]
            if not gs:
                continue
            row, per, conf = group_metrics(gs, names)
            overall_rows.append({"model": model, "group": group, "n_brains": len(gb), **row})
            add_long(model, "group", group, per, conf)
    return {"sections": section_table(summaries), "brains": pd.DataFrame(brains_rows),
            "overall": pd.DataFrame(overall_rows),
            "areas": pd.DataFrame(area_rows, columns=["model", "level", "key", "area_id", "area", "tp", "fp", "fn",
                                                      "n_px", "f1", "iou"]),
            "confusion": pd.DataFrame(conf_rows, columns=["model", "level", "key", "true_id", "true_area",
                                                          "pred_value", "pred_area", "count"])}


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, title: str | None = None, note: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (floats to 3 decimals, missing values as –); no tabulate needed."""
    lines = [f"# {title}", ""] if title else []
    if note:
        lines += [note, ""]
    cols = list(table.columns)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---" for c in cols) + "|")
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- maps index
def maps_index(summaries: Sequence[dict], out_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per (model, section): paths of its maps relative to ``out_dir`` (empty when a file is missing)."""
    out_dir = Path(out_dir).resolve()
    rows = []
    for s in summaries:
        pred = Path(s.get("pred_dir") or Path(s["_path"]).parent)
        outputs = s.get("outputs") or {}
        row = {"model": s["model"], "brain": s["brain"], "section": s["section"], "role": s["role"],
               "z_um": s.get("z_um")}
        for col, key in MAP_KEYS.items():
            name = outputs.get(key)
            p = pred / name if name else None
            row[col] = os.path.relpath(p.resolve(), out_dir) if p is not None and p.exists() else ""
        row["macro_f1"] = s.get("macro_f1") if s["status"] == STATUS_OK else None
        rows.append(row)
    t = pd.DataFrame(rows, columns=["model", "brain", "section", "role", "z_um", *MAP_KEYS, "macro_f1"])
    t["macro_f1"] = pd.to_numeric(t["macro_f1"], errors="coerce")
    return t.sort_values(["model", "brain", "z_um", "section"], kind="stable").reset_index(drop=True)


def maps_index_markdown(index: pd.DataFrame) -> str:
    """The index as Markdown with relative links."""
    md = index.copy()
    for col in MAP_KEYS:
        md[col] = [f"[{Path(p).name}]({p})" if p else "–" for p in md[col]]
    return to_markdown(md, "Maps", "Paths are relative to this file.")


# ------------------------------------------------------------------------------------------------- montage
def _panel_image(summary: dict, max_side: int, colours: dict[int, str], source: str = "overlay") -> np.ndarray | None:
    """The section's overlay PNG, or its area map coloured (0 white, uncertain grey), at most max_side px."""
    from PIL import Image

    pred = Path(summary.get("pred_dir") or ".")
    outputs = summary.get("outputs") or {}
    keys = ("overlay_png", "areas_png") if source == "overlay" else ("areas_png", "overlay_png")
    for key in keys:
        name = outputs.get(key)
        if not name or not (pred / name).is_file():
            continue
        with Image.open(pred / name) as im:
            if key == "areas_png":  # colour the ids ourselves: infer's palette has black outside tissue
                lab = np.asarray(im).astype(np.int64)
                lut = np.full((max(int(lab.max()), *colours, 0) + 1, 3), 128, np.uint8)
                lut[0] = 255
                for a, c in colours.items():
                    lut[a] = [int(c.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)]
                im = Image.fromarray(lut[lab])
            im = im.convert("RGB")
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            # label maps: nearest (crisp cells, also when enlarged); overlays: smooth reduction
            return np.asarray(im.resize(size, Image.Resampling.NEAREST if key == "areas_png"
                                        else Image.Resampling.LANCZOS))
    return None


def write_montage(path: str | os.PathLike, summaries: Sequence[dict], *, max_width_px: int = 3000,
                  title: str | None = None, source: str = "overlay") -> int:
    """Montage PNG of the sections' overlays in z order with ids and an area legend; returns the panel count."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    secs = sorted(summaries, key=lambda s: (s.get("z_um") is None, s.get("z_um") or 0.0, s["section"]))
    n = len(secs)
    if n == 0:
        raise AggregateError(f"montage {path}: no sections")
    colours = area_colours(secs)
    names = area_names(secs)
    ncols = max(1, min(n, math.ceil(math.sqrt(n * 1.5))))  # a little wider than tall: screens are
    nrows = math.ceil(n / ncols)
    panel_px = max(120, min(600, max_width_px // ncols))
    imgs = [_panel_image(s, panel_px, colours, source) for s in secs]
    aspect = np.median([im.shape[0] / im.shape[1] for im in imgs if im is not None]) if any(
        im is not None for im in imgs) else 1.0
    dpi = 100
    title_px, legend_px = 22, 40 + 18 * math.ceil((len(names) + 1) / 8)
    width = ncols * panel_px
    height = nrows * (panel_px * aspect + title_px) + legend_px + (30 if title else 0)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    top = 1 - (30 / height if title else 0)
    bottom = legend_px / height
    cell_h = (top - bottom) / nrows
    for k, (s, im) in enumerate(zip(secs, imgs)):
        r, c = divmod(k, ncols)
        gap = 6 / width  # a few pixels between panels, so neighbouring sections do not merge
        ax = fig.add_axes(((c + gap * ncols / 2) / ncols, top - (r + 1) * cell_h, 1 / ncols - gap,
                           cell_h - title_px / height))
        ax.set_axis_off()
        if im is not None:
            ax.imshow(im, interpolation="antialiased")
        else:
            ax.text(0.5, 0.5, "no map", ha="center", va="center", transform=ax.transAxes)
        label = str(s["section"])
        if s.get("status") == STATUS_OK and s.get("macro_f1") is not None:
            label += f"  F1 {s['macro_f1']:.2f}"
            if s.get("macro_f1_argmax") is not None:
                label += f" (argmax {s['macro_f1_argmax']:.2f})"
        fig.text((c + 0.5) / ncols, top - r * cell_h - 2 / height, label, ha="center", va="top",
                 fontsize=max(6, min(11, panel_px / 28)))
    handles = [Patch(facecolor=colours.get(a, "#000000"), edgecolor="k", label=nm) for a, nm in names.items()]
    handles.append(Patch(facecolor=(0.5, 0.5, 0.5), hatch="////", edgecolor="k", label="uncertain"))
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=9, frameon=False)
    if title:
        fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=13, weight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png",
                metadata={"Software": "cytonet aggregate", "cytonet:panels": str(n),
                          "cytonet:sections": ",".join(str(s["section"]) for s in secs)})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return n


# ----------------------------------------------------------------------------------------------------- run
def aggregate(summary_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
              montage_model: str | None = None, montage_width: int = 3000, montages: bool = True,
              montage_source: str = "overlay") -> dict[str, Path]:
    """Write every aggregate output into ``out_dir``; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = load_summaries(summary_paths)
    tables = aggregate_tables(summaries)
    written: dict[str, Path] = {}
    for key in ("sections", "areas", "confusion"):
        written[f"metrics_{key}" if key != "confusion" else "confusion"] = atomic_write_csv(
            out / (f"metrics_{key}.csv" if key != "confusion" else "confusion.csv"), tables[key])
    notes = {"brains": "Means over evaluated sections (*_mean); pixel-pooled over the brain's sections (*_pooled, "
                       "f1_*, iou_*). Cortex output cells only; uncertain and outside-tissue predictions count as "
                       "wrong.",
             "overall": "Groups by brain role (known / unknown) and all brains; sections pooled across brains."}
    for key, title in (("brains", "Metrics per brain"), ("overall", "Metrics overall")):
        written[f"metrics_{key}"] = atomic_write_csv(out / f"metrics_{key}.csv", tables[key])
        written[f"metrics_{key}_md"] = atomic_write_text(out / f"metrics_{key}.md",
                                                         to_markdown(tables[key], title, notes[key]))
    index = maps_index(summaries, out)
    written["maps_index"] = atomic_write_csv(out / "maps_index.csv", index)
    written["maps_index_md"] = atomic_write_text(out / "maps_index.md", maps_index_markdown(index))
    if montages:
        model = montage_model or summaries[0]["model"]
        ms = [s for s in summaries if s["model"] == model]
        if not ms:
            raise AggregateError(f"no section summaries of model '{model}' for the montages")
        for b in dict.fromkeys(s["brain"] for s in ms):
            bs = [s for s in ms if s["brain"] == b]
            written[f"montage_{b}"] = out / f"montage_{b}.png"
            write_montage(written[f"montage_{b}"], bs, max_width_px=montage_width,
                          title=f"{b} ({bs[0]['role']}, {model})", source=montage_source)
    return written


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet aggregate``."""
    parser.add_argument("--metrics", nargs="+", required=True, help="section-metrics JSON summaries")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--montage-model", help="model whose maps make the montages (default: the first input's)")
    parser.add_argument("--montage-width", type=int, default=3000, help="montage width limit in px (default 3000)")
    parser.add_argument("--montage-source", choices=("overlay", "areas"), default="overlay",
                        help="panels: infer's overlay PNGs (default) or the coloured area maps")
    parser.add_argument("--no-montage", action="store_true", help="skip the montages")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet aggregate``."""
    try:
        written = aggregate(args.metrics, args.out, montage_model=args.montage_model,
                            montage_width=args.montage_width, montages=not args.no_montage,
                            montage_source=args.montage_source)
    except AggregateError as exc:
        print(f"cytonet aggregate: error: {exc}", file=sys.stderr)
        return 2
    print(f"aggregate: {len(args.metrics)} section summaries -> {len(written)} files in {args.out}")
    return 0
