"""Data side of ``cytonet embed`` (:mod:`cytonet.analysis.embed`): the stores' patch tables, area labels at the
patch centres, the stratified sample, the encoder and its features, and the 2D UMAP."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.annotations import is_set, labels_at, load_labels


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
            warnings.warn(f"section {section_id}: cannot open image {image} ({exc}); assuming {path} is full-res",
                          stacklevel=2)
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
    """The encoder from encoder.pt (cytonet.nn.checkpoints.load_encoder), or a random-init one (baseline), in eval
    mode."""
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
