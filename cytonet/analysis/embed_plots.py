"""Plots and the Markdown report of ``cytonet embed`` (:mod:`cytonet.analysis.embed`): the UMAP by area, brain,
3D position and for the area pair, and ``separation.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.atomic import atomic_savefig

UNLABELLED = "unlabelled"
FIGURE = {"dpi": 130, "bbox_inches": "tight"}  # savefig options of every plot


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
    lines = [f"# Embedding separation ({rep['model']['encoder']}, {rep['features']} features, "
             f"dim {rep['feature_dim']})",
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
                         f"{_fmt(r.get('separation_ratio'))} | {_fmt(r.get('fisher_lda'))} | "
                         f"{_fmt(r.get('auc_lda'))} | {_fmt(r.get('auc_logistic'))} | {r.get('cv') or ''} |")
        lines.append("")
    return "\n".join(lines) + "\n"



def plot_missing_pair(pair: tuple[str, str], path: Path) -> None:
    """Placeholder for the pair plot when the pair's areas are not in the areas table (keeps the declared output)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"areas {pair} not in the areas table", ha="center", va="center")
    atomic_savefig(fig, path, **FIGURE)
