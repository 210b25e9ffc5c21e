"""Where patches go: vectorised, seeded sampling of patch positions in one section, and counts per section.

Used by ``cytonet patches`` (:mod:`cytonet.preprocess.patches`, which documents the sampling rules). No torch.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cytonet.preprocess.extraction import READ_TILE_PX


class PatchInputError(ValueError):
    """Bad input for one section; names the section and the offending file."""

    def __init__(self, section: str, file: str | os.PathLike | None, problem: str):
        self.section, self.file, self.problem = section, str(file) if file is not None else "", problem
        super().__init__(f"section '{section}': {problem} (file: {self.file})")


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




@dataclass(frozen=True)
class _Footprints:
    """Geometry of one section's candidate patches: what the exact test of a position needs."""

    H: int  # full-res image height and width
    W: int
    S: int  # patch side (target pixels)
    scale: float  # target pixel size / full-res pixel size
    foot: float  # footprint side in full-res pixels
    cell: tuple[float, float]  # full-res pixels per mask pixel (y, x)
    ii: np.ndarray  # integral image of the coarse tissue mask
    region: np.ndarray  # where centres may lie (tissue, or annotated cortex)
    labels: np.ndarray | None
    min_tissue_fraction: float
    tx_max: int  # last target-grid top-left whose footprint fits the image
    ty_max: int

    def test(self, tx0: np.ndarray, ty0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(passes, tissue fraction, area id) of target-grid top-lefts (tx0, ty0)."""
        x0, y0 = tx0 * self.scale, ty0 * self.scale
        frac = _box_fraction(self.ii, self.cell, y0, x0, y0 + self.foot, x0 + self.foot)
        cy, cx = y0 + self.foot / 2, x0 + self.foot / 2
        ok = (frac >= self.min_tissue_fraction - 1e-9) & (_lookup(self.region, (self.H, self.W), cy, cx) > 0)
        area = _lookup(self.labels, (self.H, self.W), cy, cx).astype(np.int64) if self.labels is not None \
            else np.zeros(len(tx0), np.int64)
        return ok, frac, area


def _footprints(mask: np.ndarray, image_shape: tuple[int, int], patch_px: int, scale: float,
                labels: np.ndarray | None, min_tissue_fraction: float, section_id: str,
                mask_file: str | os.PathLike | None) -> tuple[_Footprints, str]:
    """Geometry of a section's candidate patches and the name of the sampled region; raise on an empty section."""
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
    return _Footprints(H, W, S, scale, foot, cell, ii, region, labels, min_tissue_fraction, tx_max, ty_max), what


def _grid_positions(fp: _Footprints, count: int, grid_stride_px: int) -> tuple[np.ndarray, ...]:
    """(tx0, ty0, tissue fraction, area id) of the passing positions of a regular grid, evenly thinned to count."""
    stride = int(grid_stride_px) or fp.S
    gx = np.arange((fp.tx_max % stride) // 2, fp.tx_max + 1, stride)
    gy = np.arange((fp.ty_max % stride) // 2, fp.ty_max + 1, stride)
    ty0, tx0 = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
    ok, frac, area = fp.test(tx0, ty0)
    tx0, ty0, frac, area = tx0[ok], ty0[ok], frac[ok], area[ok]
    if len(tx0) > count:  # thin evenly so the grid still covers the whole section
        keep = np.unique(np.linspace(0, len(tx0) - 1, count).round().astype(np.int64))
        tx0, ty0, frac, area = tx0[keep], ty0[keep], frac[keep], area[keep]
    return tx0, ty0, frac, area


def _prefilter_cells(fp: _Footprints, ry: np.ndarray, rx: np.ndarray) -> np.ndarray:
    """Cells whose approximate tissue fraction (footprint box around the cell centre) nearly passes."""
    rh, rw = fp.region.shape
    ccy, ccx = (ry + 0.5) * fp.H / rh, (rx + 0.5) * fp.W / rw
    foot = fp.foot
    approx = _box_fraction(fp.ii, fp.cell, ccy - foot / 2, ccx - foot / 2, ccy + foot / 2, ccx + foot / 2)
    return approx >= fp.min_tissue_fraction - 0.1


def _random_positions(fp: _Footprints, rng: np.random.Generator, count: int,
                      section_id: str) -> tuple[np.ndarray, ...]:
    """(tx0, ty0, tissue fraction, area id) of up to count uniformly drawn passing positions.

    Candidate cells: all region cells first; when few candidates pass (thin tissue, high minimum fraction) keep
    only cells whose approximate fraction passes. The exact test always runs after snapping to the target grid.
    """
    H, W, S, scale = fp.H, fp.W, fp.S, fp.scale
    rh, rw = fp.region.shape
    ry, rx = np.divmod(np.flatnonzero(fp.region).astype(np.int32 if fp.region.size < 2**31 else np.int64), rw)
    chunks: list[tuple[np.ndarray, ...]] = []
    have, tries, prefiltered = 0, 0, False
    while have < count and tries < 30:
        n = max(2 * (count - have), 1024)
        pick = rng.integers(0, len(ry), n)
        cy = (ry[pick] + rng.random(n)) * H / rh
        cx = (rx[pick] + rng.random(n)) * W / rw
        t_x = np.clip(np.rint(cx / scale - S / 2), 0, fp.tx_max).astype(np.int64)
        t_y = np.clip(np.rint(cy / scale - S / 2), 0, fp.ty_max).astype(np.int64)
        ok, frac, area = fp.test(t_x, t_y)
        chunks.append((t_x[ok], t_y[ok], frac[ok], area[ok]))
        have += int(ok.sum())
        tries += 1
        if not prefiltered and ok.mean() < 0.25 and have < count:
            prefiltered = True
            good = _prefilter_cells(fp, ry, rx)
            if not good.any():
                break
            ry, rx = ry[good], rx[good]
    tx0, ty0, frac, area = (np.concatenate(c)[:count] for c in zip(*chunks))
    if len(tx0) < count:
        warnings.warn(f"section '{section_id}': only {len(tx0)} of {count} patch positions passed "
                      f"min_tissue_fraction={fp.min_tissue_fraction}", stacklevel=3)
    return tx0, ty0, frac, area


def _spatially_ordered(tx0: np.ndarray, ty0: np.ndarray, frac: np.ndarray, area: np.ndarray, scale: float,
                       foot: float) -> pd.DataFrame:
    """The positions as a table, in Z-order of the read-tile cell of the centre (a task's patches share tiles)."""
    cyx = (np.asarray(ty0) * scale + foot / 2), (np.asarray(tx0) * scale + foot / 2)
    order = np.argsort(_morton((cyx[0] // (READ_TILE_PX * scale)).astype(np.int64),
                               (cyx[1] // (READ_TILE_PX * scale)).astype(np.int64)), kind="stable")
    return pd.DataFrame({
        "tx0": np.asarray(tx0, np.int64)[order], "ty0": np.asarray(ty0, np.int64)[order],
        "x_px": cyx[1][order] - 0.5, "y_px": cyx[0][order] - 0.5,
        "tissue_fraction": np.asarray(frac, np.float64)[order], "area_id": np.asarray(area, np.int64)[order],
    })


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
    fp, what = _footprints(mask, image_shape, patch_px, scale, labels, min_tissue_fraction, section_id, mask_file)
    rng = section_rng(seed, section_id)
    if sampling == "grid":
        tx0, ty0, frac, area = _grid_positions(fp, count, grid_stride_px)
    elif sampling == "random":
        tx0, ty0, frac, area = _random_positions(fp, rng, count, section_id)
    else:
        raise ValueError(f"sampling must be 'random' or 'grid', got {sampling!r}")
    if len(tx0) == 0:
        raise PatchInputError(section_id, mask_file, f"empty section: no patch position in {what} with tissue "
                                                      f"fraction >= {min_tissue_fraction}")
    return _spatially_ordered(tx0, ty0, frac, area, scale, fp.foot)


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
