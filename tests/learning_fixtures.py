"""Small synthetic patch stores, written exactly per docs/contracts.md, for the learning tests.

Texture depends on the area (stripe period, like laminar spacing) and smoothly on 3D position (stripe
orientation and blob density), so spatially close patches look alike and areas are separable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

AREA_PERIODS = {1: 4.0, 2: 7.0, 3: 11.0}


def _patch(rng: np.random.Generator, size: int, area: int, x_mm: float, y_mm: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = 0.9 * x_mm + 0.6 * y_mm  # orientation drifts smoothly with position
    period = AREA_PERIODS.get(area, 6.0) * (1.0 + 0.15 * np.sin(1.3 * y_mm))
    phase = rng.uniform(0, 2 * np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    img = 0.5 + 0.3 * np.sin(2 * np.pi * u / period + phase)
    # "cells": dark blobs whose density follows position
    n = int(5 + 10 * (0.5 + 0.5 * np.sin(0.8 * x_mm - 0.5 * y_mm)))
    for cy, cx in rng.uniform(0, size, (n, 2)):
        img -= 0.35 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_store(root: str | Path, brain: str = "b1", n_sections: int = 4, grid: int = 8, patch_px: int = 32,
               spacing_mm: float = 0.5, section_mm: float = 0.4, labelled_sections: tuple[int, ...] | None = None,
               seed: int = 0, shard: int = 8) -> Path:
    """Write <root>/<brain>/patches.zarr + patches.parquet + manifest.json; returns the brain folder.

    Areas are bands along x (1, 2, 3); `labelled_sections` (default: all) carry area ids, others area_id 0.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / brain
    out.mkdir(parents=True, exist_ok=True)
    rows, patches = [], []
    labelled_sections = tuple(range(n_sections)) if labelled_sections is None else labelled_sections
    for s in range(n_sections):
        for gy in range(grid):
            for gx in range(grid):
                x_mm, y_mm, z_mm = gx * spacing_mm, gy * spacing_mm, s * section_mm
                area = 1 + min(2, gx * 3 // grid)
                patches.append(_patch(rng, patch_px, area, x_mm, y_mm))
                lab = s in labelled_sections
                rows.append(dict(index=len(rows), brain=brain, section=f"{brain}_s{s:03d}",
                                 x_px=float(gx * 100 + 50), y_px=float(gy * 100 + 50), x_mm=x_mm, y_mm=y_mm,
                                 z_mm=z_mm, area_id=area if lab else 0, tissue_fraction=1.0, labelled=lab))
    data = np.stack(patches)
    group = zarr.open_group(str(out / "patches.zarr"), mode="w", zarr_format=3)
    group.attrs.update(pixel_size_um=2.0, patch_px=patch_px, brain=brain)
    arr = group.create_array("patches", shape=data.shape, dtype="uint8", chunks=(1, patch_px, patch_px),
                             shards=(shard, patch_px, patch_px))
    arr[:] = data
    table = pd.DataFrame(rows)
    table["index"] = table["index"].astype("int64")
    table.to_parquet(out / "patches.parquet", index=False)
    (out / "manifest.json").write_text(json.dumps({"brain": brain, "n_patches": len(table), "patch_px": patch_px}))
    return out
