"""Measurements on a written demo (used by the tests): laminar profiles, thickness fractions, patch features.

Everything here reads only what the generator wrote (images and ground-truth PNGs), so it checks the files,
not the generator's internals.  Depth in the cortex is the equidistant fraction ``d_pia / (d_pia + d_wm)`` from
Euclidean distance transforms of the ground-truth tissue and layer maps.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi


@dataclass
class SectionData:
    """One section at a reduced resolution."""

    brain: str
    section_id: str
    image: np.ndarray  # uint8
    layer: np.ndarray  # 0 none, 1..6, 7 WM
    area: np.ndarray
    tissue: np.ndarray
    frac: np.ndarray  # depth fraction in cortex, nan elsewhere
    factor: int


def load_section(demo_dir: Path, brain: str, row: dict, factor: int = 2) -> SectionData:
    """Read a section's image (pyramid level ``log2(factor)``) and ground truth, subsampled by ``factor``."""
    bdir = Path(demo_dir) / brain
    sid = row["section_id"]
    lvl = int(np.log2(factor))
    with tifffile.TiffFile(bdir / row["image"]) as tf:
        page = tf.pages[0]
        image = page.asarray() if lvl == 0 else tf.pages[0].pages[lvl - 1].asarray()

    def png(kind: str) -> np.ndarray:
        return np.asarray(Image.open(bdir / "truth" / f"{sid}_{kind}.png"))[::factor, ::factor]

    layer, area, tissue = png("layer"), png("area"), png("tissue") > 0
    h, w = layer.shape
    image = image[:h, :w]
    d_pia = ndi.distance_transform_edt(tissue)
    d_wm = ndi.distance_transform_edt(layer != 7)
    cortex = (layer >= 1) & (layer <= 6)
    d_pia, d_wm = d_pia - 0.5, d_wm - 0.5  # distances to pixel centres overshoot the boundary by half a pixel
    thick = d_pia + d_wm
    frac = np.where(cortex, d_pia / np.maximum(thick, 1e-6), np.nan)
    # keep pixels whose local thickness is typical of their area: drops tears, cut gyri and missing white matter
    for a in np.unique(area[cortex]):
        m = cortex & (area == a)
        med = np.median(thick[m])
        frac[m & ((thick < 0.75 * med) | (thick > 1.3 * med))] = np.nan
    return SectionData(brain, sid, image, layer, area, tissue, frac, factor)


def read_sections(demo_dir: Path, brain: str) -> list[dict]:
    """Rows of a brain's sections table."""
    with open(Path(demo_dir) / brain / "sections.csv") as fh:
        return list(csv.DictReader(fh))


def optical_density(sec: SectionData) -> np.ndarray:
    """``-log(I / glass)`` with the glass level estimated from the non-tissue pixels."""
    glass = np.median(sec.image[~sec.tissue]) if (~sec.tissue).any() else 255.0
    return -np.log(np.maximum(sec.image.astype(np.float64), 1) / glass)


def layer_means(secs: list[SectionData], area_id: int) -> np.ndarray:
    """Mean optical density per layer I..VI (nan where the layer is absent)."""
    out = np.full(6, np.nan)
    acc = [[] for _ in range(6)]
    for s in secs:
        od = optical_density(s)
        m = s.area == area_id
        for L in range(6):
            v = od[m & (s.layer == L + 1)]
            if v.size:
                acc[L].append(v)
    for L in range(6):
        if acc[L] and sum(a.size for a in acc[L]) > 200:
            out[L] = np.concatenate(acc[L]).mean()
    return out


def depth_profile(secs: list[SectionData], area_id: int, n_bins: int = 18, od: bool = False) -> np.ndarray:
    """Mean intensity (or optical density) in ``n_bins`` equidistant depth bins of an area, pia first."""
    sums, counts = np.zeros(n_bins), np.zeros(n_bins)
    for s in secs:
        m = (s.area == area_id) & np.isfinite(s.frac)
        val = optical_density(s)[m] if od else s.image[m].astype(np.float64)
        b = np.clip((s.frac[m] * n_bins).astype(int), 0, n_bins - 1)
        sums += np.bincount(b, val, n_bins)
        counts += np.bincount(b, minlength=n_bins)
    return sums / np.maximum(counts, 1)


def thickness_fractions(secs: list[SectionData], area_id: int, n_bins: int = 100) -> np.ndarray:
    """Layer thickness fractions measured back from the layer maps: mean over depth bins of P(layer | depth)."""
    counts = np.zeros((n_bins, 6))
    for s in secs:
        m = (s.area == area_id) & np.isfinite(s.frac)
        b = np.clip((s.frac[m] * n_bins).astype(int), 0, n_bins - 1)
        np.add.at(counts, (b, s.layer[m].astype(int) - 1), 1)
    p = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return p[counts.sum(1) > 0].mean(0)


def patch_features(sec: SectionData, n_patches: int, patch_mm: float, pixel_size_um: float,
                   rng: np.random.Generator, n_depth: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample patches centred in cortex; return (global stats features, laminar profile features, area ids).

    Global: mean, std and a 16-bin histogram of the whole patch.  Laminar: mean intensity in ``n_depth``
    depth bins of the patch's cortex pixels of the centre's area (z-scored within the patch).
    """
    px = pixel_size_um * sec.factor
    half = int(round(patch_mm * 1000 / px / 2))
    cy, cx = np.nonzero(sec.area > 0)
    ok = (cy >= half) & (cy < sec.area.shape[0] - half) & (cx >= half) & (cx < sec.area.shape[1] - half)
    cy, cx = cy[ok], cx[ok]
    pick = rng.choice(len(cy), size=min(n_patches, len(cy)), replace=False)
    g, lam, y = [], [], []
    for i in pick:
        sl = (slice(cy[i] - half, cy[i] + half), slice(cx[i] - half, cx[i] + half))
        img = sec.image[sl].astype(np.float64)
        a = sec.area[cy[i], cx[i]]
        hist = np.histogram(img, bins=16, range=(0, 256))[0] / img.size
        g.append(np.concatenate([[img.mean(), img.std()], hist]))
        fr, ar = sec.frac[sl], sec.area[sl]
        m = (ar == a) & np.isfinite(fr)
        b = np.clip((fr[m] * n_depth).astype(int), 0, n_depth - 1)
        prof = np.bincount(b, img[m], n_depth) / np.maximum(np.bincount(b, minlength=n_depth), 1)
        filled = np.bincount(b, minlength=n_depth) > 0
        prof[~filled] = prof[filled].mean() if filled.any() else 0
        prof = (prof - prof.mean()) / (prof.std() + 1e-6)
        lam.append(prof)
        y.append(a)
    return np.array(g), np.array(lam), np.array(y)
