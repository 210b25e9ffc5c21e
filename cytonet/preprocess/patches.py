"""Patch sampling and extraction into one sharded Zarr v3 patch store per brain.

Command line (``cytonet patches``)::

    cytonet patches --brain B --brains-table brains.csv --areas areas.csv --masks-dir results/masks/B \\
        --out results/patches/B --threads N [--dask JSON-or-file | --scheduler tcp://host:8786] \\
        [--params JSON-or-file] [--param key=value ...] [--no-progress]

Parameters (``--params`` takes a JSON object or a path to a JSON file; ``--param key=value`` overrides single
keys; an unknown key is an error naming it). Defaults match ``workflow/schemas/config.schema.yaml``:

=====================  ========  ==================================================================================
key                    default   meaning
=====================  ========  ==================================================================================
patch_px               64        patch side S in pixels at ``pixel_size_um``
pixel_size_um          16.0      resolution (µm/px) the patches are cut at
count                  2000      patches per section or per brain (``count_per``); in grid mode an upper bound
count_per              brain     ``section`` or ``brain`` (brain: split over sections in proportion to tissue area)
sampling               random    ``random`` (uniform over valid centres) or ``grid`` (regular grid, step
                                 ``grid_stride_px``, evenly thinned to ``count``)
grid_stride_px         0         grid step in target pixels; 0 = ``patch_px`` (non-overlapping patches)
min_tissue_fraction    0.5       minimum fraction of tissue-mask pixels inside the patch footprint
seed                   0         random seed; each section draws from ``(seed, crc32(section_id))``
shard_patches          256       patches per Zarr shard (a task holds one shard in memory: k·S² bytes)
on_bad_section         error     ``error`` or ``skip`` (warn, record in ``<out>/qc.csv`` and go on)
=====================  ========  ==================================================================================

Sampling: centres lie in tissue (tissue mask > 0) or, for sections with an annotation, in annotated cortex
(label > 0); the whole footprint lies inside the image; the tissue fraction (mask pixels whose centres fall in
the footprint, via an integral image of the coarse mask) is at least ``min_tissue_fraction``. Patches sit on the
pixel grid of the target resolution, so a patch is exactly ``section.read(pixel_size_um)[ty0:ty0+S, tx0:tx0+S]``.

Coordinates: ``x_px``/``y_px`` are the patch centre in full-resolution pixel-index coordinates (pixel ``i`` has
its centre at ``i``; a footprint covering pixels ``[x0, x0+F)`` has its centre at ``x0 + F/2 - 0.5``); ``x_mm``,
``y_mm``, ``z_mm`` are ``SectionTransform.to_mm(x_px, y_px)``; ``area_id`` is the annotation label of the pixel
holding the centre.

Store layout (``--out`` directory)::

    patches.zarr/       Zarr v3 group; array "patches" uint8 [N, S, S], chunks (1, S, S), shards (k, S, S),
                        Zstd level 1 (much faster to write than Blosc-zstd-3, same ratio on
                        these images); attrs pixel_size_um, patch_px, brain
    patches.parquet     one row per patch, row i = patches[i] (columns in docs/contracts.md)
    qc.csv              section, file, problem (skipped sections; header only when none)
    manifest.json       written last, its presence marks the store complete

Everything is built in ``<out>/.staging-<pid>/`` and moved into place before the manifest is written; a killed
run leaves no manifest, and a rerun clears stale staging directories and old outputs first.

Parallelism: ``cytonet.preprocess.dask_cluster`` as set by ``--dask`` (the config's ``dask`` section): a ``LocalCluster`` of
``--threads`` single-threaded worker processes (``--threads 1`` runs in-process), or a dask-jobqueue
``SLURMCluster`` (``cluster: slurm``), or an existing scheduler (``--scheduler ADDRESS``). Each task writes whole
shards; it opens the section itself and reads tiles through a small LRU cache, so patches that share image tiles
decode them once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from cytonet.preprocess.dask_cluster import (
    BackgroundClient,
    parse_dask_config,
    wants_cluster,
    worker_count,
)
from cytonet.io.annotations import AnnotationError, is_set, load_labels, read_image
from cytonet.io.params import parse_params as read_params

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "patch_px": 64,
    "pixel_size_um": 16.0,
    "count": 2000,
    "count_per": "brain",
    "sampling": "random",
    "grid_stride_px": 0,
    "min_tissue_fraction": 0.5,
    "seed": 0,
    "shard_patches": 256,
    "on_bad_section": "error",
}
_CHOICES = {"count_per": ("section", "brain"), "sampling": ("random", "grid"), "on_bad_section": ("error", "skip")}
TABLE_COLUMNS = ["index", "brain", "section", "x_px", "y_px", "x_mm", "y_mm", "z_mm", "area_id",
                 "tissue_fraction", "labelled"]
READ_TILE_PX = 256  # virtual tile of the LRU read cache; a multiple of the usual 256-px TIFF tiles
CACHE_BYTES = 256 * 2**20  # per task


# ----------------------------------------------------------------------------------------------------------------
# errors and params


class PatchInputError(ValueError):
    """Bad input for one section; names the section and the offending file."""

    def __init__(self, section: str, file: str | os.PathLike | None, problem: str):
        self.section, self.file, self.problem = section, str(file) if file is not None else "", problem
        super().__init__(f"section '{section}': {problem} (file: {self.file})")


def parse_params(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated by ``params``; unknown keys and bad values raise ``ValueError`` naming the key."""
    out = dict(DEFAULT_PARAMS)
    for key, value in (params or {}).items():
        if key not in DEFAULT_PARAMS:
            raise ValueError(f"unknown patches parameter {key!r} (known: {', '.join(sorted(DEFAULT_PARAMS))})")
        default = DEFAULT_PARAMS[key]
        try:
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"patches parameter {key!r}: cannot use value {value!r}") from None
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"patches parameter {key!r} must be one of {_CHOICES[key]}, got {value!r}")
        out[key] = value
    for key in ("patch_px", "shard_patches", "count"):
        if out[key] < 1:
            raise ValueError(f"patches parameter {key!r} must be >= 1, got {out[key]}")
    if out["pixel_size_um"] <= 0:
        raise ValueError(f"patches parameter 'pixel_size_um' must be > 0, got {out['pixel_size_um']}")
    if not 0.0 <= out["min_tissue_fraction"] <= 1.0:
        raise ValueError(f"patches parameter 'min_tissue_fraction' must be in [0, 1], got {out['min_tissue_fraction']}")
    if out["grid_stride_px"] < 0:
        raise ValueError(f"patches parameter 'grid_stride_px' must be >= 0, got {out['grid_stride_px']}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row/column (int32 while it cannot overflow: half the memory)."""
    dtype = np.int32 if mask.size < 2**31 else np.int64
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(np.cumsum(mask > 0, axis=0, dtype=dtype), axis=1, out=ii[1:, 1:])
    return ii


def _box_fraction(ii: np.ndarray, cell: tuple[float, float], y0: np.ndarray, x0: np.ndarray, y1: np.ndarray,
                  x1: np.ndarray) -> np.ndarray:
    """Fraction of mask pixels whose centres lie in the full-res boxes [y0, y1) × [x0, x1) (edge coordinates)."""
    sy, sx = cell
    mh, mw = ii.shape[0] - 1, ii.shape[1] - 1
    r0 = np.clip(np.ceil(y0 / sy - 0.5), 0, mh).astype(np.int64)
    r1 = np.clip(np.ceil(y1 / sy - 0.5), 0, mh).astype(np.int64)
    c0 = np.clip(np.ceil(x0 / sx - 0.5), 0, mw).astype(np.int64)
    c1 = np.clip(np.ceil(x1 / sx - 0.5), 0, mw).astype(np.int64)
    # A footprint smaller than one mask pixel holds no mask-pixel centre: use the pixel under the footprint centre.
    small = (r1 <= r0) | (c1 <= c0)
    if small.any():
        cy = np.clip(((y0 + y1) / 2 / sy).astype(np.int64), 0, mh - 1)
        cx = np.clip(((x0 + x1) / 2 / sx).astype(np.int64), 0, mw - 1)
        r0, r1 = np.where(small, cy, r0), np.where(small, cy + 1, r1)
        c0, c1 = np.where(small, cx, c0), np.where(small, cx + 1, c1)
    total = ii[r1, c1].astype(np.int64) - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]
    return total / ((r1 - r0) * (c1 - c0))


def _lookup(grid: np.ndarray, shape: tuple[int, int], cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Value of a coarse grid (same extent as the full-res image ``shape``) at full-res edge coordinates."""
    r = np.clip((cy * grid.shape[0] / shape[0]).astype(np.int64), 0, grid.shape[0] - 1)
    c = np.clip((cx * grid.shape[1] / shape[1]).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[r, c]


def section_rng(seed: int, section_id: str) -> np.random.Generator:
    """Random generator of one section: independent of section order and of the other sections."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(section_id.encode())])


def sample_locations(
    mask: np.ndarray,
    image_shape: tuple[int, int],
    patch_px: int,
    scale: float,
    count: int,
    *,
    sampling: str = "random",
    min_tissue_fraction: float = 0.5,
    seed: int = 0,
    section_id: str = "",
    labels: np.ndarray | None = None,
    grid_stride_px: int = 0,
    mask_file: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Patch positions of one section, vectorised and deterministic from ``(seed, section_id)``.

    ``mask`` is the tissue mask on a coarse grid of the same extent as the full-res image (``image_shape``),
    ``scale`` the target pixel size over the full-res pixel size; ``labels`` (optional, own grid of the same
    extent) restricts centres to label > 0 and gives ``area_id``. Returns columns ``tx0, ty0`` (patch top-left on
    the target-resolution grid), ``x_px, y_px`` (centre, full-res pixel-index coordinates), ``tissue_fraction``,
    ``area_id``; sorted spatially (Z-order of 256-px cells) so that neighbouring patches share read tiles.
    Raises ``PatchInputError`` when the section has no tissue or no valid position.
    """
    H, W = int(image_shape[0]), int(image_shape[1])
    S = int(patch_px)
    foot = S * scale  # footprint side in full-res pixels
    cell = (H / mask.shape[0], W / mask.shape[1])
    ii = _integral(mask)
    if ii[-1, -1] == 0:
        raise PatchInputError(section_id, mask_file, "empty section: the tissue mask holds no tissue")
    region = (labels > 0) if labels is not None else (mask > 0)
    what = "annotated cortex" if labels is not None else "tissue"
    if not region.any():
        raise PatchInputError(section_id, mask_file, f"empty section: no {what} to sample from")
    # Target grid positions whose footprint fits the image.
    tx_max, ty_max = math.floor(W / scale) - S, math.floor(H / scale) - S
    if tx_max < 0 or ty_max < 0:
        raise PatchInputError(section_id, mask_file, f"image {W}x{H} px is smaller than one patch footprint "
                                                      f"({foot:.0f} px)")

    def evaluate(tx0: np.ndarray, ty0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x0, y0 = tx0 * scale, ty0 * scale
        frac = _box_fraction(ii, cell, y0, x0, y0 + foot, x0 + foot)
        cy, cx = y0 + foot / 2, x0 + foot / 2
        ok = (frac >= min_tissue_fraction - 1e-9) & (_lookup(region, (H, W), cy, cx) > 0)
        area = _lookup(labels, (H, W), cy, cx).astype(np.int64) if labels is not None else np.zeros(len(tx0), np.int64)
        return ok, frac, area

    rng = section_rng(seed, section_id)
    if sampling == "grid":
        stride = int(grid_stride_px) or S
        gx = np.arange((tx_max % stride) // 2, tx_max + 1, stride)
        gy = np.arange((ty_max % stride) // 2, ty_max + 1, stride)
        ty0, tx0 = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
        ok, frac, area = evaluate(tx0, ty0)
        tx0, ty0, frac, area = tx0[ok], ty0[ok], frac[ok], area[ok]
        if len(tx0) > count:  # thin evenly so the grid still covers the whole section
            keep = np.unique(np.linspace(0, len(tx0) - 1, count).round().astype(np.int64))
            tx0, ty0, frac, area = tx0[keep], ty0[keep], frac[keep], area[keep]
    elif sampling == "random":
        # Candidate cells: all region cells first; when few candidates pass (thin tissue, high minimum
        # fraction) keep only cells whose approximate fraction (footprint box around the cell centre) passes.
        # The exact test always runs after snapping to the target grid.
        rh, rw = region.shape
        ry, rx = np.divmod(np.flatnonzero(region).astype(np.int32 if region.size < 2**31 else np.int64), rw)
        chunks: list[tuple[np.ndarray, ...]] = []
        have, tries, prefiltered = 0, 0, False
        while have < count and tries < 30:
            n = max(2 * (count - have), 1024)
            pick = rng.integers(0, len(ry), n)
            cy = (ry[pick] + rng.random(n)) * H / rh
            cx = (rx[pick] + rng.random(n)) * W / rw
            t_x = np.clip(np.rint(cx / scale - S / 2), 0, tx_max).astype(np.int64)
            t_y = np.clip(np.rint(cy / scale - S / 2), 0, ty_max).astype(np.int64)
            ok, frac, area = evaluate(t_x, t_y)
            chunks.append((t_x[ok], t_y[ok], frac[ok], area[ok]))
            have += int(ok.sum())
            tries += 1
            if not prefiltered and ok.mean() < 0.25 and have < count:
                prefiltered = True
                ccy, ccx = (ry + 0.5) * H / rh, (rx + 0.5) * W / rw
                approx = _box_fraction(ii, cell, ccy - foot / 2, ccx - foot / 2, ccy + foot / 2, ccx + foot / 2)
                good = approx >= min_tissue_fraction - 0.1
                if not good.any():
                    break
                ry, rx = ry[good], rx[good]
        tx0, ty0, frac, area = (np.concatenate(c)[:count] for c in zip(*chunks))
        if len(tx0) < count:
            warnings.warn(f"section '{section_id}': only {len(tx0)} of {count} patch positions passed "
                          f"min_tissue_fraction={min_tissue_fraction}", stacklevel=2)
    else:
        raise ValueError(f"sampling must be 'random' or 'grid', got {sampling!r}")
    if len(tx0) == 0:
        raise PatchInputError(section_id, mask_file, f"empty section: no patch position in {what} with tissue "
                                                      f"fraction >= {min_tissue_fraction}")
    # Z-order of the read-tile cell of the centre, so a task's patches share cached tiles.
    cyx = (np.asarray(ty0) * scale + foot / 2), (np.asarray(tx0) * scale + foot / 2)
    order = np.argsort(_morton((cyx[0] // (READ_TILE_PX * scale)).astype(np.int64),
                               (cyx[1] // (READ_TILE_PX * scale)).astype(np.int64)), kind="stable")
    return pd.DataFrame({
        "tx0": np.asarray(tx0, np.int64)[order], "ty0": np.asarray(ty0, np.int64)[order],
        "x_px": cyx[1][order] - 0.5, "y_px": cyx[0][order] - 0.5,
        "tissue_fraction": np.asarray(frac, np.float64)[order], "area_id": np.asarray(area, np.int64)[order],
    })


def _morton(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Interleave the bits of y and x (Z-order curve key)."""
    key = np.zeros(len(y), np.int64)
    for b in range(21):
        key |= ((x >> b) & 1) << (2 * b) | ((y >> b) & 1) << (2 * b + 1)
    return key


def allocate_counts(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` over keys in proportion to ``weights`` (largest remainder, deterministic)."""
    keys = list(weights)
    w = np.array([max(float(weights[k]), 0.0) for k in keys])
    if w.sum() <= 0:
        return {k: 0 for k in keys}
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.lexsort((np.arange(len(keys)), -(exact - base)))
    base[order[:rest]] += 1
    return {k: int(n) for k, n in zip(keys, base)}


# ----------------------------------------------------------------------------------------------------------------
# reading and resampling


def _default_opener(path: str, pixel_size_um: float | None = None, section_id: str | None = None):
    from cytonet.io.readers import open_section

    return open_section(path, pixel_size_um=pixel_size_um, section_id=section_id)


def _open_tiff_level(section: Any, level: int) -> tuple[Any, Any] | None:
    """(TiffFile, page) to decode tiles of ``level`` directly, when the level is a tiled grey uint8 TIFF page.

    Going through tifffile's zarr store costs several ms of overhead per region; decoding the stored tiles
    directly costs about the deflate time alone. Anything else (RGB, OME-Zarr, strips) uses ``region()``.
    """
    path = getattr(section, "path", None)
    if path is None or getattr(section, "is_rgb", True) or str(path).lower().endswith((".png", ".jpg", ".jpeg")):
        return None
    try:
        import tifffile

        tf = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF (e.g. OME-Zarr): use the reader
        return None
    try:
        series = tf.series[0]
        lv = series.levels[level]
        page = lv.keyframe
        if (len(lv.pages) == 1 and page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel == 1
                and page.imagedepth == 1 and tuple(lv.shape) == tuple(section.levels[level].shape[:2])
                and not page.photometric == 0):  # MINISWHITE would need inverting: leave it to the reader
            return tf, lv.pages[0]
    except Exception:  # noqa: BLE001
        pass
    tf.close()
    return None


class TileCache:
    """Reads rectangles of one pyramid level through an LRU cache of aligned tiles (each tile decoded once).

    Tiles are the file's own tiles when the level is a tiled grey TIFF (decoded directly), else virtual
    ``tile``-px squares read with ``section.region``.
    """

    def __init__(self, section: Any, level: int, tile: int = READ_TILE_PX, budget: int = CACHE_BYTES):
        self.section, self.level = section, level
        self.shape = tuple(section.levels[level].shape[:2])
        self.tiff = _open_tiff_level(section, level)
        if self.tiff is not None:
            page = self.tiff[1]
            self.th, self.tw = int(page.tilelength), int(page.tilewidth)
            self.ntx = -(-self.shape[1] // self.tw)
        else:
            self.th = self.tw = tile
        self.cap = max(4, budget // (self.th * self.tw))
        self.tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.decoded_bytes = 0
        self.reads = 0

    def close(self) -> None:
        """Close the directly opened TIFF, if any."""
        if self.tiff is not None:
            self.tiff[0].close()
            self.tiff = None

    def _decode(self, ty: int, tx: int, h: int, w: int) -> np.ndarray:
        tf, page = self.tiff
        idx = ty * self.ntx + tx
        offset, count = page.dataoffsets[idx], page.databytecounts[idx]
        if count == 0:  # sparse tile: not stored
            return np.zeros((h, w), np.uint8)
        fh = tf.filehandle
        fh.seek(offset)
        data = fh.read(count)
        if len(data) != count:
            raise OSError(f"{self.section.path}: tile {idx} of level {self.level} is truncated")
        tile = page.decode(data, idx, jpegtables=page.jpegtables)[0]
        return np.asarray(tile).reshape(self.th, self.tw)[:h, :w]

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        arr = self.tiles.get(key)
        if arr is None:
            h, w = min(self.th, self.shape[0] - ty * self.th), min(self.tw, self.shape[1] - tx * self.tw)
            if self.tiff is not None:
                arr = self._decode(ty, tx, h, w)
            else:
                arr = np.asarray(self.section.region(self.level, ty * self.th, tx * self.tw, h, w), dtype=np.uint8)
            self.decoded_bytes += arr.nbytes
            self.reads += 1
            self.tiles[key] = arr
            if len(self.tiles) > self.cap:
                self.tiles.popitem(last=False)
        else:
            self.tiles.move_to_end(key)
        return arr

    def read(self, y0: int, x0: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rectangle [y0, y0+h) × [x0, x0+w) of the level, zero outside the image (as ``region``), into ``out``."""
        inside = y0 >= 0 and x0 >= 0 and y0 + h <= self.shape[0] and x0 + w <= self.shape[1]
        if out is None:
            out = np.empty((h, w), np.uint8) if inside else np.zeros((h, w), np.uint8)
        elif not inside:
            out[...] = 0
        th, tw = self.th, self.tw
        ya, yb = max(y0, 0), min(y0 + h, self.shape[0])
        xa, xb = max(x0, 0), min(x0 + w, self.shape[1])
        for ty in range(ya // th, (yb - 1) // th + 1 if yb > ya else 0):
            for tx in range(xa // tw, (xb - 1) // tw + 1 if xb > xa else 0):
                tile = self._tile(ty, tx)
                sy0, sy1 = max(ya, ty * th), min(yb, ty * th + tile.shape[0])
                sx0, sx1 = max(xa, tx * tw), min(xb, tx * tw + tile.shape[1])
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty * th:sy1 - ty * th, sx0 - tx * tw:sx1 - tx * tw]
        return out


def _area_weights(origin: float, f: float, n_out: int, start: int, n_in: int):
    """Sparse (n_out × n_in) box-filter weights: output pixel j averages input [origin + j f, origin + (j+1) f)."""
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for j in range(n_out):
        a, b = origin + j * f, origin + (j + 1) * f
        for k in range(int(math.floor(a)), int(math.ceil(b))):
            overlap = min(b, k + 1) - max(a, k)
            if overlap > 1e-9:
                rows.append(j), cols.append(k - start), vals.append(overlap / f)
    return csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def cut_patch(reader: Callable[[int, int, int, int], np.ndarray], tx0: int, ty0: int, S: int, f: float) -> np.ndarray:
    """Patch S×S whose target-grid top-left is (ty0, tx0), from a level whose pixel is 1/f target pixels.

    Anti-aliased: each output pixel is the area average of the level pixels it covers (block mean when f is an
    integer, exact box weights otherwise).
    """
    fi = round(f)
    if abs(f - fi) < 1e-6 and fi >= 1:
        region = reader(ty0 * fi, tx0 * fi, S * fi, S * fi)
        if fi == 1:
            return region
        block = region.reshape(S, fi, S, fi).astype(np.float32).mean(axis=(1, 3))
        return np.rint(block).astype(np.uint8)
    oy, ox = ty0 * f, tx0 * f
    y0, x0 = int(math.floor(oy)), int(math.floor(ox))
    n = int(math.ceil(oy + S * f)) - y0, int(math.ceil(ox + S * f)) - x0
    region = reader(y0, x0, n[0], n[1]).astype(np.float32)
    wy = _area_weights(oy, f, S, y0, n[0])
    wx = _area_weights(ox, f, S, x0, n[1])
    out = (wx @ (wy @ region).T).T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def level_and_factor(section: Any, pixel_size_um: float) -> tuple[int, float]:
    """Pyramid level to read for a target resolution, and target pixel size / level pixel size."""
    level = int(section.level_for(pixel_size_um))
    return level, pixel_size_um / float(section.levels[level].pixel_size_um)


# ----------------------------------------------------------------------------------------------------------------
# tasks (run on Dask workers; return only small metadata)


def _extract_task(task: dict[str, Any]) -> dict[str, Any]:
    """Cut the patches of whole shards and write them; returns counts, or the failing section instead of raising."""
    import zarr

    # One core per task: zarr's codec thread pool would only add switching (~20% faster shard writes).
    with zarr.config.set({"threading.max_workers": 1}):
        return _extract_task_inner(task)


def _extract_task_inner(task: dict[str, Any]) -> dict[str, Any]:
    import zarr

    delay = float(os.environ.get("CYTONET_TEST_TASK_DELAY_S", "0") or 0)  # test hook: makes kill tests reliable
    opener = task.get("opener") or _default_opener
    arr = zarr.open_array(task["array"], mode="r+")
    S, t = task["patch_px"], task["pixel_size_um"]
    sections: dict[int, tuple[TileCache, float]] = {}
    t0 = time.perf_counter()
    stats = {"patches": 0, "decoded_bytes": 0, "tile_reads": 0, "error": None, "seconds": 0.0}
    sec_idx, tx0, ty0 = task["section"], task["tx0"], task["ty0"]
    pos = 0
    for s0, s1 in task["shards"]:
        buf = np.empty((s1 - s0, S, S), np.uint8)
        for i in range(s1 - s0):
            si = int(sec_idx[pos])
            info = task["sections"][si]
            try:
                if si not in sections:
                    sec = opener(info["image"], pixel_size_um=info["pixel_size_um"], section_id=info["section"])
                    level, f = level_and_factor(sec, t)
                    sections[si] = (TileCache(sec, level), f)
                cache, f = sections[si]
                if abs(f - 1.0) < 1e-6:  # same grid: tiles go straight into the shard buffer (no extra copy)
                    cache.read(int(ty0[pos]), int(tx0[pos]), S, S, out=buf[i])
                else:
                    buf[i] = cut_patch(cache.read, int(tx0[pos]), int(ty0[pos]), S, f)
            except Exception as exc:  # noqa: BLE001 - reported to the driver with section and file
                for cache, _ in sections.values():
                    cache.close()
                stats["error"] = {"section": info["section"], "file": info["image"],
                                  "problem": f"cannot read image: {type(exc).__name__}: {exc}"}
                return stats
            pos += 1
        arr[s0:s1] = buf
        stats["patches"] += s1 - s0
        if delay:
            time.sleep(delay)
    for cache, _ in sections.values():
        stats["decoded_bytes"] += cache.decoded_bytes
        stats["tile_reads"] += cache.reads
        cache.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------------------------------
# brain-level driver


@dataclass
class SectionInfo:
    """What the driver knows about one section (no pixel data)."""

    section: str
    image: str
    pixel_size_um: float
    shape: tuple[int, int]
    mask_file: str
    annotation: str | None
    transform: Any
    tissue_area_um2: float = 0.0
    extra: dict = field(default_factory=dict)


def inspect_section(row: Any, masks_dir: str | os.PathLike, areas: pd.DataFrame, base_dir: str | os.PathLike,
                    opener: Callable | None = None) -> tuple[SectionInfo, np.ndarray, np.ndarray | None]:
    """Open one section's image (metadata only), mask and annotation; raise ``PatchInputError`` on bad input."""
    from cytonet.io.transforms import SectionTransform

    sid = str(row["section_id"])
    image = row["image"]
    if not is_set(image):
        raise PatchInputError(sid, None, "no image given")
    image = str(image)
    if not Path(image).exists():
        raise PatchInputError(sid, image, "image file not found")
    px = row.get("pixel_size_um")
    px = float(px) if is_set(px) else None
    opener = opener or _default_opener
    try:
        sec = opener(image, pixel_size_um=px, section_id=sid)
    except Exception as exc:  # noqa: BLE001 - SectionReadError or anything a broken file throws
        msg = str(exc)
        if "pixel size" in msg.lower() or "pixel_size" in msg.lower():
            raise PatchInputError(sid, image, f"missing pixel size: {msg}") from exc
        raise PatchInputError(sid, image, f"cannot read image (corrupt or truncated?): {msg}") from exc
    p0 = getattr(sec, "pixel_size_um", None)
    if p0 is None or not np.isfinite(float(p0)) or float(p0) <= 0:
        raise PatchInputError(sid, image, "missing pixel size: neither the image metadata nor the sections table "
                                          "(column pixel_size_um) gives one")
    shape = tuple(int(s) for s in sec.levels[0].shape[:2])
    mask_file = Path(masks_dir) / f"{sid}.png"
    if not mask_file.is_file():
        raise PatchInputError(sid, mask_file, "tissue mask not found")
    try:
        mask = read_image(mask_file)
    except Exception as exc:  # noqa: BLE001
        raise PatchInputError(sid, mask_file, f"cannot read tissue mask: {exc}") from exc
    if mask.ndim == 3:
        mask = mask[..., 0]
    if not (mask > 0).any():
        raise PatchInputError(sid, f"{image} (mask {mask_file})", "empty section: the tissue mask holds no tissue")
    annotation = row.get("annotation")
    labels = None
    if is_set(annotation):
        try:
            labels = load_labels(annotation, sid, areas, shape)
        except AnnotationError as exc:
            raise PatchInputError(sid, exc.path, exc.problem) from exc
    try:
        transform = SectionTransform.from_spec(row["transform"], base_dir)
    except Exception as exc:  # noqa: BLE001
        raise PatchInputError(sid, row["transform"], f"bad transform: {exc}") from exc
    area = float((mask > 0).mean()) * shape[0] * shape[1] * float(p0) ** 2
    info = SectionInfo(sid, image, float(p0), shape, str(mask_file), str(annotation) if labels is not None else None,
                       transform, area, {"pixel_size_override": px})
    return info, mask, labels


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_brain(
    brain: str,
    sections: pd.DataFrame,
    areas: pd.DataFrame,
    masks_dir: str | os.PathLike,
    out: str | os.PathLike,
    params: dict[str, Any] | None = None,
    *,
    threads: int = 1,
    scheduler: str | None = None,
    dask: dict[str, Any] | None = None,
    progress: bool = True,
    base_dir: str | os.PathLike = ".",
    opener: Callable | None = None,
) -> dict[str, Any]:
    """Sample and extract the patches of one brain into ``out`` (store, table, qc.csv, manifest.json last).

    ``sections`` is a sections table (``load_sections`` output: section_id, image, pixel_size_um, transform,
    annotation). ``opener`` replaces ``cytonet.io.readers.open_section`` (for tests; must be picklable when
    ``threads > 1``). Returns the manifest.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    p = parse_params(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A previous run may have been killed: nothing it left can look complete, but clear it so outputs are fresh.
    (out / "manifest.json").unlink(missing_ok=True)
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir()
    # The cluster starts (seconds; minutes for Slurm worker jobs) while the driver inspects and samples the
    # sections. One local worker and no scheduler: everything runs in this process.
    dask_cfg = parse_dask_config(dask)
    starter = BackgroundClient(dask_cfg, threads, scheduler) if wants_cluster(dask_cfg, threads, scheduler) else None
    workers = threads if scheduler else worker_count(dask_cfg, threads)
    try:
        t_start = time.time()
        qc: list[dict[str, str]] = []

        def bad(err: PatchInputError) -> None:
            if p["on_bad_section"] == "error":
                raise err
            warnings.warn(f"skipping {err}", stacklevel=3)
            log.warning("skipping %s", err)
            qc.append({"section": err.section, "file": err.file, "problem": err.problem})

        timings: dict[str, float] = {}
        tick = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            timings[name] = round(now - tick, 3)
            tick = now

        # Pass 1: metadata of every section (and tissue area for per-brain counts).
        infos: list[SectionInfo] = []
        cached: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # masks/labels kept while small
        cached_bytes = 0
        for _, row in sections.iterrows():
            try:
                info, mask, labels = inspect_section(row, masks_dir, areas, base_dir, opener)
            except PatchInputError as err:
                bad(err)
                continue
            infos.append(info)
            size = mask.nbytes + (labels.nbytes if labels is not None else 0)
            if cached_bytes + size <= 512 * 2**20:
                cached[info.section] = (mask, labels)
                cached_bytes += size
        if p["count_per"] == "brain":
            counts = allocate_counts(p["count"], {i.section: i.tissue_area_um2 for i in infos})
        else:
            counts = {i.section: p["count"] for i in infos}

        # Pass 2: sampling, section by section (masks and labels are coarse; one section in memory at a time).
        frames = []
        kept: list[SectionInfo] = []
        rows_by_sec = {str(r["section_id"]): r for _, r in sections.iterrows()}
        for info in infos:
            if counts[info.section] == 0:
                continue
            try:
                if info.section in cached:
                    mask, labels = cached.pop(info.section)
                else:
                    _, mask, labels = inspect_section(rows_by_sec[info.section], masks_dir, areas, base_dir, opener)
                with warnings.catch_warnings():
                    warnings.simplefilter("default")
                    df = sample_locations(mask, info.shape, p["patch_px"], p["pixel_size_um"] / info.pixel_size_um,
                                          counts[info.section], sampling=p["sampling"],
                                          min_tissue_fraction=p["min_tissue_fraction"], seed=p["seed"],
                                          section_id=info.section, labels=labels, grid_stride_px=p["grid_stride_px"],
                                          mask_file=info.mask_file)
            except PatchInputError as err:
                bad(err)
                continue
            xyz = info.transform.to_mm(df["x_px"].to_numpy(), df["y_px"].to_numpy())
            df["x_mm"], df["y_mm"], df["z_mm"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
            df["section"] = info.section
            df["labelled"] = labels is not None
            df["_sec"] = len(kept)
            kept.append(info)
            frames.append(df)
        if not frames:
            raise PatchInputError("*", masks_dir, f"brain '{brain}': no section gave any patch")
        plan = pd.concat(frames, ignore_index=True)
        lap("inspect_and_sample_s")

        # Extraction; a section that fails to decode mid-way is skipped (or raised) and the store rebuilt without it.
        S, k = p["patch_px"], p["shard_patches"]
        if k * S * S > 512 * 2**20:
            warnings.warn(f"shard_patches={k} with patch_px={S} holds {k * S * S / 2**20:.0f} MiB per task", stacklevel=2)
        client = None
        stats_total = {"decoded_bytes": 0, "tile_reads": 0}
        try:
            if starter is not None:
                client = starter.get()
            lap("cluster_wait_s")
            while True:
                n = len(plan)
                store_path = staging / "patches.zarr"
                shutil.rmtree(store_path, ignore_errors=True)
                group = zarr.open_group(store_path, mode="w", zarr_format=3)
                group.attrs.update({"pixel_size_um": p["pixel_size_um"], "patch_px": S, "brain": brain})
                group.create_array("patches", shape=(n, S, S), dtype="uint8", chunks=(1, S, S),
                                   shards=(min(k, n), S, S), compressors=ZstdCodec(level=1),
                                   fill_value=0)
                error = _run_tasks(plan, kept, p, str(store_path / "patches"), client, workers, progress, opener,
                                   stats_total)
                if error is None:
                    break
                bad(PatchInputError(error["section"], error["file"], error["problem"]))
                plan = plan[plan["section"] != error["section"]].reset_index(drop=True)
                if plan.empty:
                    raise PatchInputError("*", masks_dir, f"brain '{brain}': no section gave any patch")
            lap("extract_s")
        finally:
            if starter is not None:
                starter.close()
        lap("cluster_close_s")

        # Table, QC, then move into place; the manifest goes last.
        plan.insert(0, "index", np.arange(len(plan), dtype=np.int64))
        plan["brain"] = brain
        table = plan[TABLE_COLUMNS].astype({"area_id": np.int64, "labelled": bool})
        table.to_parquet(staging / "patches.parquet", index=False)
        pd.DataFrame(qc, columns=["section", "file", "problem"]).to_csv(staging / "qc.csv", index=False)
        for name in ("patches.zarr", "patches.parquet", "qc.csv"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(staging / name, target)
        shutil.rmtree(staging, ignore_errors=True)
        from cytonet import __version__ as version

        manifest = {
            "brain": brain,
            "n_patches": int(len(table)),
            "patch_px": S,
            "pixel_size_um": p["pixel_size_um"],
            "shard_patches": k,
            "sections": {s: int(c) for s, c in table["section"].value_counts(sort=False).items()},
            "skipped_sections": [q["section"] for q in qc],
            "params": p,
            "table_sha256": _sha256(out / "patches.parquet"),
            "decoded_bytes": int(stats_total["decoded_bytes"]),
            "timings": {**timings, "task_seconds_total": round(stats_total.get("task_seconds", 0.0), 3)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t_start, 3),
            "cytonet_version": version,
        }
        tmp = out / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out / "manifest.json")
        return manifest
    except BaseException:
        if starter is not None:
            starter.close()
        shutil.rmtree(staging, ignore_errors=True)  # an error leaves nothing behind (a kill is cleared by the rerun)
        raise


def _run_tasks(plan: pd.DataFrame, infos: list[SectionInfo], p: dict[str, Any], array_path: str, client: Any,
               workers: int, progress: bool, opener: Callable | None, stats_total: dict[str, int]) -> dict | None:
    """Split the plan into whole-shard tasks, run them, return the first failing section (or None)."""
    from tqdm.auto import tqdm

    n, k = len(plan), p["shard_patches"]
    shards = [(s, min(s + k, n)) for s in range(0, n, k)]
    workers = max(1, workers)
    # Enough tasks to balance the workers, few enough that each reuses its cached tiles over many patches.
    per_task = max(1, min(math.ceil(len(shards) / (4 * workers)), max(1, 4096 // k)))
    sec_meta = [{"section": i.section, "image": i.image, "pixel_size_um": i.extra.get("pixel_size_override")}
                for i in infos]
    sec_col, tx, ty = plan["_sec"].to_numpy(), plan["tx0"].to_numpy(), plan["ty0"].to_numpy()
    tasks = []
    for j in range(0, len(shards), per_task):
        group = shards[j:j + per_task]
        a, b = group[0][0], group[-1][1]
        used = sorted(set(sec_col[a:b].tolist()))
        tasks.append({"array": array_path, "patch_px": p["patch_px"], "pixel_size_um": p["pixel_size_um"],
                      "shards": group, "section": sec_col[a:b], "tx0": tx[a:b], "ty0": ty[a:b],
                      "sections": {s: sec_meta[s] for s in used}, "opener": opener})
    bar = tqdm(total=n, unit="patch", desc="patches", disable=not progress, mininterval=1.0)
    error = None
    try:
        if client is None:
            results: Iterable = (_extract_task(t) for t in tasks)
        else:
            from dask.distributed import as_completed

            futures = client.map(_extract_task, tasks, pure=False)
            results = (f.result() for f in as_completed(futures))
        for res in results:
            if res["error"] is not None and error is None:
                error = res["error"]
                if client is not None:
                    client.cancel(futures)
                break
            stats_total["decoded_bytes"] += res["decoded_bytes"]
            stats_total["tile_reads"] += res["tile_reads"]
            stats_total["task_seconds"] = stats_total.get("task_seconds", 0.0) + res["seconds"]
            bar.update(res["patches"])
    finally:
        bar.close()
    return error


# ----------------------------------------------------------------------------------------------------------------
# validation


def validate_store(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` on any inconsistency of a patch store directory (or its manifest.json)."""
    import zarr

    path = Path(path)
    out = path.parent if path.name == "manifest.json" else path
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"patch store {out}: manifest.json missing (store incomplete)")
    manifest = json.loads(mpath.read_text())
    tpath = out / "patches.parquet"
    if not tpath.is_file():
        raise ValueError(f"patch store {out}: patches.parquet missing")
    if _sha256(tpath) != manifest.get("table_sha256"):
        raise ValueError(f"patch store {out}: patches.parquet checksum differs from manifest")
    table = pd.read_parquet(tpath)
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"patch store {out}: table lacks columns {missing}")
    try:
        group = zarr.open(out / "patches.zarr", mode="r")
        arr = group["patches"]
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"patch store {out}: cannot open patches.zarr/patches: {exc}") from exc
    n, S = manifest["n_patches"], manifest["patch_px"]
    if arr.shape != (n, S, S) or arr.dtype != np.uint8:
        raise ValueError(f"patch store {out}: array {arr.shape} {arr.dtype} != manifest ({n}, {S}, {S}) uint8")
    if len(table) != n:
        raise ValueError(f"patch store {out}: table has {len(table)} rows, store {n} patches")
    if not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        raise ValueError(f"patch store {out}: table index is not 0..N-1")
    if set(table["brain"]) - {manifest["brain"]}:
        raise ValueError(f"patch store {out}: table names other brains than {manifest['brain']!r}")
    for key in ("pixel_size_um", "patch_px", "brain"):
        if group.attrs.get(key) != manifest[key]:
            raise ValueError(f"patch store {out}: attribute {key}={group.attrs.get(key)!r} != manifest {manifest[key]!r}")
    counts = table["section"].value_counts().to_dict()
    if {s: int(c) for s, c in counts.items()} != manifest["sections"]:
        raise ValueError(f"patch store {out}: per-section counts differ from manifest")
    # Every shard must exist on disk (a missing shard would silently read as fill value 0).
    shard_dir = out / "patches.zarr" / "patches" / "c"
    k = arr.shards[0] if arr.shards else 1
    expected = math.ceil(n / k) if n else 0
    found = sum(1 for f in shard_dir.rglob("*") if f.is_file()) if shard_dir.exists() else 0
    if found != expected:
        raise ValueError(f"patch store {out}: {found} shard files on disk, expected {expected}")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet patches``."""
    parser.add_argument("--brain", required=True, help="brain id (row of the brains table)")
    parser.add_argument("--brains-table", required=True, help="brains table (CSV/TSV)")
    parser.add_argument("--areas", required=True, help="areas table (CSV/TSV)")
    parser.add_argument("--masks-dir", required=True, help="folder with <section>.png tissue masks")
    parser.add_argument("--out", required=True, help="output folder of the patch store")
    parser.add_argument("--threads", type=int, default=1, help="Dask worker processes (1 = in-process)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler to use instead")
    parser.add_argument("--dask", default=None, metavar="JSON",
                        help="where the Dask workers run: the config's dask section as a JSON object, or a YAML/JSON "
                             "file of it (keys in cytonet.preprocess.dask_cluster.DEFAULTS; default: a local cluster of "
                             "--threads workers)")
    parser.add_argument("--params", default=None, help="JSON object, or path to a JSON file, of parameters")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="set one parameter")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cli_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params:
        text = args.params
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        params.update(json.loads(text))
    for item in args.param:
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet patches``."""
    from cytonet.io.tables import load_areas, load_brains, load_sections

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = parse_params(_cli_params(args))
    brains = load_brains(args.brains_table)
    rows = brains[brains["brain_id"] == args.brain]
    if rows.empty:
        raise ValueError(f"brain {args.brain!r} not in brains table {args.brains_table}")
    sections_path = rows.iloc[0]["sections"]
    sections = load_sections(sections_path, args.brain, check_files=False)
    areas = load_areas(args.areas)
    dask = parse_dask_config(read_params(args.dask))
    manifest = extract_brain(args.brain, sections, areas, args.masks_dir, args.out, params, threads=args.threads,
                             scheduler=args.scheduler, dask=dask, progress=not args.no_progress,
                             base_dir=Path(sections_path).parent)
    log.info("brain %s: %d patches from %d sections in %.1f s -> %s", args.brain, manifest["n_patches"],
             len(manifest["sections"]), manifest["seconds"], args.out)
    return 0
