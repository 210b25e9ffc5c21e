"""Tissue masking of whole sections at low resolution.

Algorithm (at a working grid of ``resolution_um`` µm/px, e.g. 16-64; the image is read lazily and downsampled with
anti-aliasing by :mod:`cytonet.io.readers`):

1. **Glass colours.** Pixels that are locally flat (3×3 std below a noise floor) and bright are binned by colour; the
   bins holding >= 0.3 % of the image whose brightness is within ``glass_band`` of the brightest such bin are
   candidates. The brightest is glass; another is glass only when a large flat region of it (pixels nearest to that
   colour) reaches the outer glass, so flat pale white matter enclosed by cortex never becomes a glass colour. These are
   the glass / background colours (e.g. white outside the slide *and* the slightly tinted slide itself). Dark flat areas
   (black scanner frames) are never glass.
2. **Tissue candidates** are pixels whose (lightly smoothed) colour differs from every glass colour by more than a
   threshold set from the glass noise (``k·noise``, at least ``min_contrast`` grey levels). This keeps pale white
   matter, which is only slightly darker than glass (and for RGB also tinted), where a global Otsu threshold fails.
3. **Artefact pixels** are removed: near-black pixels (frames, ink) and, for colour stains, dark *achromatic*
   pixels (pen marks, grid lines, text, debris), whose chroma is small relative to their darkness. A 3×3 opening
   cuts thin lines and bridges; components that vanish under a 9×9 erosion (lines, frame rims, hairs) go.
4. **Components** are filtered: small ones (area < ``min_component_fraction`` of the largest piece, or below an
   absolute area in mm²) are dust or labels; ones whose median is near-black or that are mostly achromatic-dark are
   rejected. Several large pieces are all kept.
5. **Holes** enclosed by tissue are filled only when they are small (< ``max_fill_hole_px``) or not glass-coloured
   (removed line pixels inside tissue, texture dips in pale white matter: mean distance to glass > thr/2).
   Glass-coloured holes (ventricles, sulcal gaps) stay holes.

Outputs: a 0/255 PNG mask on the working grid and a QC overlay PNG (thumbnail, tissue tinted, outline drawn).
An empty result raises :class:`EmptySectionError`. No torch, no snakemake.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cytonet.io.atomic import atomic_write_png
from cytonet.io.readers import Section, SectionReadError, open_section

__all__ = ["EmptySectionError", "MaskResult", "compute_mask", "mask_image", "default_resolution",
           "configure_parser", "run", "qc_overlay"]

# Working grid defaults: coarse enough to be cheap, fine enough for cortex (2-4 mm thick) to span many pixels.
DEFAULT_RESOLUTION_UM = 32.0
MAX_WORK_SIDE_PX = 2048


class EmptySectionError(ValueError):
    """No tissue found in a section (the message names the section and file); callers may choose to skip it."""


@dataclass
class MaskResult:
    """Result of :func:`mask_image`: the mask and the grid it lies on."""

    mask: np.ndarray
    resolution_um: float
    shape: tuple[int, int]
    source_level: int
    path: Path
    out_png: Path
    qc_png: Path | None = None
    tissue_fraction: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# core algorithm


def _local_std(img: np.ndarray, size: int = 3) -> np.ndarray:
    m = ndimage.uniform_filter(img, size, mode="reflect")
    m2 = ndimage.uniform_filter(img * img, size, mode="reflect")
    return np.sqrt(np.clip(m2 - m * m, 0, None))


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r + 0.5


def _glass_colours(col: np.ndarray, grey_raw: np.ndarray, glass_band: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Estimate the glass colours (k, C), their noise level and the map of flat bright pixels they come from."""
    n = grey_raw.size
    # Texture on the *unsmoothed* image: glass is flat, while even pale white matter carries fibre/cell texture.
    std = _local_std(grey_raw, 3)
    bright = grey_raw >= 100.0
    if bright.sum() < 0.01 * n:
        bright = grey_raw >= np.percentile(grey_raw, 50)
    flat_thr = max(3.0, 3.0 * float(np.percentile(std[bright], 10)))  # >= 3: JPEG noise on glass
    flat = bright & (std <= flat_thr)
    if flat.sum() < 0.01 * n:  # no flat glass at all (tissue fills the frame): use the brightest pixels
        flat = grey_raw >= np.percentile(grey_raw, 98)
    fc = col[flat]
    q = np.clip(np.rint(fc / 4.0), 0, 64).astype(np.int64)  # colour bins of 4 grey levels
    keys = q[:, 0]
    for c in range(1, q.shape[1]):
        keys = keys * 65 + q[:, c]
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    big = np.flatnonzero(counts >= max(0.003 * n, 4))
    if big.size == 0:
        big = np.array([int(np.argmax(counts))])
    cols = np.stack([fc[inv == b].mean(axis=0) for b in big])
    light = cols.mean(axis=1)
    keep = light >= light.max() - glass_band
    cols, big = cols[keep], big[keep]
    sel = np.isin(inv, big)
    # Glass noise after the caller's smoothing (robust: MAD around the nearest kept colour).
    d = np.min(np.linalg.norm(fc[sel][:, None, :] - cols[None], axis=-1), axis=1)
    noise = float(np.median(d)) * 1.4826
    return cols, noise, flat


def _reaches(region: np.ndarray, target: np.ndarray, min_px: float) -> bool:
    """Whether a connected piece of ``region`` of at least ``min_px`` pixels touches ``target``."""
    lab, _ = ndimage.label(region)
    touching = np.unique(lab[target & (lab > 0)])
    return bool(touching.size) and float(np.max(ndimage.sum_labels(region, lab, touching))) >= min_px


def _read_grey_rgb(section_or_array: Section | np.ndarray, resolution_um: float | None,
                   pixel_size_um: float | None) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """(grey float32, RGB float32 or None, µm/px or None) of a section at the working grid, or of an array."""
    if isinstance(section_or_array, Section):
        sec = section_or_array
        res = float(resolution_um) if resolution_um else default_resolution(sec)
        grey = sec.read(res).compute().astype(np.float32)
        rgb = sec.read_rgb(res)
        rgb = rgb.compute() if rgb is not None else None
        return grey, rgb, res
    arr = np.asarray(section_or_array)
    px_um = float(pixel_size_um or resolution_um or 0) or None
    if arr.ndim == 3:
        from cytonet.io.readers import to_stain

        rgb = arr[..., :3].astype(np.float32)
        grey = to_stain(arr).astype(np.float32)
    else:
        rgb, grey = None, arr.astype(np.float32)
        if arr.dtype == np.uint16:
            grey = grey / 257.0
    return grey, rgb, px_um


def _near_outer_glass(dists: np.ndarray, light: np.ndarray, g_s: np.ndarray, thr: float) -> np.ndarray:
    """Pixels at or next to the outer glass: the brightest flat colour (with the black frame) reaching the border."""
    H, W = g_s.shape
    edge = np.zeros((H, W), bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    blab, _ = ndimage.label((dists[..., int(np.argmax(light))] <= thr) | (g_s < 35.0))
    outer = np.isin(blab, np.unique(blab[edge & (blab > 0)]))
    return ndimage.binary_dilation(outer, iterations=2) | edge


def _glass_map(col: np.ndarray, g_s: np.ndarray, glass: np.ndarray, flat: np.ndarray, thr: float,
               info: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """Step 2: the accepted glass colours and where glass is.

    The brightest flat colour is glass everywhere. Other flat colours (a tinted slide on a white scan background)
    count as glass only where their region touches the image border or the outer glass, so a large flat pale
    white-matter region enclosed by cortex is never taken for glass. Returns (glass colours, nearest glass colour
    per pixel, distance to the primary glass colours, glass map, distance to the nearest glass colour).
    """
    H, W = g_s.shape
    light = glass.mean(axis=1)
    dists = np.linalg.norm(col[:, :, None, :] - glass[None, None, :, :], axis=-1)
    near_outer = _near_outer_glass(dists, light, g_s, thr)
    # Any other flat colour is glass only when a large flat region of it reaches the outer glass (a tinted slide
    # does). Flat pale white matter enclosed by cortex does not: taking its colour for glass would lose it, and
    # with it the pale layer-I rim that touches the outer glass.
    nearest_all = np.argmin(dists, axis=-1)
    accepted = [j for j in range(len(glass)) if light[j] == light.max()
                or _reaches(flat & (nearest_all == j) & (dists[..., j] <= thr), near_outer, 0.005 * H * W)]
    glass, light, dists = glass[accepted], light[accepted], dists[..., accepted]
    info["glass_colours"] = glass.round(1).tolist()
    primary = light >= light.max() - 8.0
    nearest = np.argmin(dists, axis=-1)
    dist_primary = np.min(dists[..., primary], axis=-1)
    glass_map = dist_primary <= thr
    if (~primary).any():
        # Secondary glass colours count as glass only where their region touches the outer glass.
        sec_map = np.min(dists[..., ~primary], axis=-1) <= thr
        slab, _ = ndimage.label(sec_map)
        touching = np.unique(slab[near_outer & sec_map])
        glass_map |= np.isin(slab, touching[touching > 0])
    dist = np.take_along_axis(dists, nearest[..., None], axis=-1)[..., 0]
    return glass, nearest, dist_primary, glass_map, dist


def _artefact_pixels(g_s: np.ndarray, rgb: np.ndarray | None, col: np.ndarray, glass: np.ndarray,
                     nearest: np.ndarray, cand: np.ndarray, achromatic_ratio: float,
                     info: dict[str, Any]) -> np.ndarray:
    """Step 3a: near-black pixels (frames, ink) always; dark achromatic ones (pen, grid lines) on colour stains."""
    art = g_s < 35.0
    colour_stain = False
    if rgb is not None and cand.any():
        # Optical density relative to the local glass colour: a stain absorbs some channels more than others,
        # while pen, ink, grid lines, text and debris absorb all channels alike (grey/black).
        od = np.clip(-np.log((col + 1.0) / (glass[nearest] + 1.0)), 0, None)
        od_mean = od.mean(axis=-1)
        od_ratio = (od.max(axis=-1) - od.min(axis=-1)) / np.maximum(od_mean, 1e-3)
        # Only for colour-stained sections: BigBrain-like grey images stored as RGB have ratio 0 everywhere.
        colour_stain = float(np.median(od_ratio[cand & (od_mean > 0.05)])) > 0.4 if (cand & (od_mean > 0.05)).any() \
            else False
        if colour_stain:
            art |= (od_mean > 0.08) & (od_ratio < achromatic_ratio)
    info["colour_stain"] = colour_stain
    return art


def _drop_artefacts(cand: np.ndarray, art: np.ndarray, g_s: np.ndarray) -> np.ndarray:
    """Step 3b: remove artefact pixels and thin structures from the tissue candidates."""
    # The blurred rim of a black frame is neither black nor glass: exclude a 2-px band around black areas.
    black_zone = ndimage.binary_dilation(g_s < 35.0, iterations=2)
    art |= black_zone
    cand &= ~art
    cand = ndimage.binary_opening(cand, structure=np.ones((3, 3), bool))
    # Drop structures thinner than ~9 px everywhere (grid lines, frame rims, hairs, pen strokes, which the
    # pre-smoothing widens): keep only components that survive a 9x9 erosion somewhere, with their full extent.
    core = ndimage.binary_erosion(cand, structure=np.ones((9, 9), bool))
    lab0, n0 = ndimage.label(cand, structure=np.ones((3, 3), bool))
    cand = np.isin(lab0, np.unique(lab0[core]))
    cand[lab0 == 0] = False
    # Thin artefacts that cross tissue (grid lines, scratches) cut it apart: give back the thin artefact pixels that
    # tissue closes over, but not thick ones (debris, pen blobs) nor lines sticking out into the glass.
    art_thick = ndimage.binary_opening(art, structure=np.ones((5, 5), bool))
    disk = _disk(3)
    cand |= art & ~art_thick & ~black_zone & ndimage.binary_closing(cand, structure=disk, border_value=0)
    return cand


def _keep_components(cand: np.ndarray, g_s: np.ndarray, px_um: float | None, min_component_fraction: float,
                     min_component_mm2: float) -> tuple[np.ndarray, int, float] | None:
    """Step 4: (mask of the kept components, how many, minimum area in px), or None when there is no component."""
    lab, n = ndimage.label(cand, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(cand), lab, idx)
    med = ndimage.median(g_s, lab, idx)
    min_area = max(min_component_fraction * areas.max(), 4.0)
    if px_um:
        min_area = max(min_area, min_component_mm2 * 1e6 / (px_um * px_um))
        min_area = min(min_area, 0.5 * areas.max())  # never drop the largest piece for being small
    keep = (areas >= min_area) & (np.asarray(med) >= 35.0)
    return np.isin(lab, idx[keep]), int(keep.sum()), float(min_area)


def _fill_holes(mask: np.ndarray, glass_map: np.ndarray, dist_primary: np.ndarray, dist: np.ndarray, thr: float,
                max_fill_hole_px: int) -> np.ndarray:
    """Step 5: fill small holes and non-glass ones (cut artefact lines inside tissue); keep ventricles/sulci."""
    holes = ndimage.binary_fill_holes(mask) & ~mask
    hlab, hn = ndimage.label(holes)
    if hn:
        hidx = np.arange(1, hn + 1)
        harea = ndimage.sum_labels(np.ones_like(holes), hlab, hidx)
        hglass = ndimage.mean(glass_map, hlab, hidx)
        # Texture dips inside pale tissue touch the glass colour only on average: their mean distance to glass is
        # near the threshold, while real ventricles / sulci sit at the glass level (distance ~ noise).
        hdist = ndimage.mean(np.where(glass_map & (dist_primary > thr), dist, dist_primary), hlab, hidx)
        fill = (harea <= max_fill_hole_px) | (hglass < 0.5) | (np.asarray(hdist) > 0.5 * thr)
        mask |= np.isin(hlab, hidx[fill])
    return mask


def compute_mask(section_or_array: Section | np.ndarray, resolution_um: float | None = None, *,
                 pixel_size_um: float | None = None, min_contrast: float = 8.0, k_noise: float = 6.0,
                 glass_band: float = 24.0, min_component_fraction: float = 0.01, min_component_mm2: float = 0.05,
                 max_fill_hole_px: int = 9, achromatic_ratio: float = 0.25, return_info: bool = False) -> Any:
    """Boolean tissue mask of a section (or of a (H, W) grey / (H, W, 3) RGB array) on a ``resolution_um`` grid.

    For arrays, ``pixel_size_um`` gives their pixel size (used only for the absolute minimum component area) and
    ``resolution_um`` is ignored. Returns the mask, or ``(mask, info)`` when ``return_info``.
    The steps are those of the module docstring.
    """
    grey, rgb, px_um = _read_grey_rgb(section_or_array, resolution_um, pixel_size_um)
    info: dict[str, Any] = {}
    H, W = grey.shape
    # Light smoothing: noise in flat glass averages out, so a small colour offset (pale WM) becomes significant.
    g_s = ndimage.gaussian_filter(grey, 1.0)
    col = (np.dstack([ndimage.gaussian_filter(rgb[..., c], 1.0) for c in range(3)]) if rgb is not None
           else g_s[..., None])
    # 1. glass colours and the threshold set from their noise
    glass, noise, flat = _glass_colours(col, grey, glass_band)
    info["glass_noise"] = noise
    thr = max(min_contrast, k_noise * noise) * (math.sqrt(col.shape[-1]) if col.shape[-1] > 1 else 1.0) ** 0.5
    info["threshold"] = thr
    # 2. glass map; tissue candidates are the rest
    glass, nearest, dist_primary, glass_map, dist = _glass_map(col, g_s, glass, flat, thr, info)
    cand = ~glass_map
    info["glass_fraction"] = float(glass_map.mean())
    # 3. artefact pixels
    art = _artefact_pixels(g_s, rgb, col, glass, nearest, cand, achromatic_ratio, info)
    cand = _drop_artefacts(cand, art, g_s)
    # 4. components, 5. holes
    kept = _keep_components(cand, g_s, px_um, min_component_fraction, min_component_mm2)
    if kept is None:
        info["n_components"] = 0
        mask = np.zeros((H, W), bool)
        return (mask, info) if return_info else mask
    mask, n_kept, min_area = kept
    mask = _fill_holes(mask, glass_map, dist_primary, dist, thr, max_fill_hole_px)
    info.update(n_components=n_kept, min_area_px=min_area, shape=(H, W))
    return (mask, info) if return_info else mask


# --------------------------------------------------------------------------------------------------------------------
# files and QC


def default_resolution(sec: Section) -> float:
    """Working µm/px: the image's own grid when already coarse, else ~32 µm/px (finer for small sections)."""
    native = sec.pixel_size_um
    H, W = sec.levels[0].shape
    extent = max(H, W) * native
    return max(native, min(DEFAULT_RESOLUTION_UM, extent / MAX_WORK_SIDE_PX))


def qc_overlay(grey_or_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB QC image: the section with tissue tinted green, background tinted red, and the mask outline in yellow."""
    img = grey_or_rgb.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    out = img.copy()
    out[mask] = 0.75 * img[mask] + 0.25 * np.array([0, 200, 0], np.float32)
    out[~mask] = 0.7 * img[~mask] + 0.3 * np.array([255, 0, 0], np.float32)
    edge = mask ^ ndimage.binary_erosion(mask, iterations=1)
    out[edge] = (255, 230, 0)
    return np.clip(out, 0, 255).astype(np.uint8)


def mask_image(path: str | os.PathLike, out_png: str | os.PathLike, pixel_size_um: float | None = None,
               resolution_um: float | None = None, qc_png: str | os.PathLike | None = None,
               section_id: str | None = None, min_tissue_fraction: float = 0.0005, **kwargs: Any) -> MaskResult:
    """Mask one image file, write a 0/255 PNG (and a QC overlay) atomically; raise EmptySectionError if no tissue."""
    path, out_png = Path(path), Path(out_png)
    sec = open_section(path, pixel_size_um=pixel_size_um, section_id=section_id)
    res = float(resolution_um) if resolution_um else default_resolution(sec)
    if res < sec.pixel_size_um * 0.99:
        res = sec.pixel_size_um  # never upsample for masking
    mask, info = compute_mask(sec, res, return_info=True, **kwargs)
    frac = float(mask.mean())
    if frac < min_tissue_fraction:
        raise EmptySectionError(f"{sec.where}: no tissue found (tissue fraction {frac:.4%} < "
                                f"{min_tissue_fraction:.4%} at {res:g} µm/px)")
    atomic_write_png(out_png, (mask * 255).astype(np.uint8))
    if qc_png is not None:
        rgb = sec.read_rgb(res)
        base = rgb.compute() if rgb is not None else sec.read(res).compute()
        atomic_write_png(qc_png, qc_overlay(base, mask))
    return MaskResult(mask=mask, resolution_um=res, shape=tuple(mask.shape), source_level=sec.level_for(res),
                      path=path, out_png=out_png, qc_png=Path(qc_png) if qc_png else None, tissue_fraction=frac,
                      info=info)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet mask``."""
    parser.add_argument("image", help="section image: PNG, JPEG, (OME-)TIFF or OME-Zarr")
    parser.add_argument("-o", "--output", required=True, help="output mask PNG (0/255)")
    parser.add_argument("--pixel-size", type=float, default=None, help="µm/px of the image (if not in metadata)")
    parser.add_argument("--resolution", type=float, default=None,
                        help="working µm/px (default: the image grid if coarse, else ~32 µm/px)")
    parser.add_argument("--qc", default=None, help="QC overlay PNG")
    parser.add_argument("--section-id", default=None, help="section id for messages")
    parser.add_argument("--min-tissue-fraction", type=float, default=0.0005,
                        help="below this tissue fraction the section counts as empty (error)")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet mask``; prints the grid of the written mask. Returns 0, or 1/2 on unreadable/empty input."""
    try:
        res = mask_image(args.image, args.output, pixel_size_um=args.pixel_size, resolution_um=args.resolution,
                         qc_png=args.qc, section_id=args.section_id, min_tissue_fraction=args.min_tissue_fraction)
    except SectionReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except EmptySectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"mask {res.out_png}: shape {res.shape[0]}x{res.shape[1]} at {res.resolution_um:g} um/px "
          f"(pyramid level {res.source_level}), tissue fraction {res.tissue_fraction:.3f}")
    return 0
