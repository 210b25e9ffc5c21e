"""Section reading: one place for every image format the pipeline accepts.

``open_section(path)`` returns a :class:`Section` that exposes the image pyramid, the physical pixel size and lazy
(dask) access to the stain channel at any resolution. Supported inputs:

* tiled pyramidal (OME-)TIFF / BigTIFF, read tile-wise through tifffile's Zarr store (``series[0].levels``);
* OME-Zarr (NGFF 0.4 attributes ``multiscales`` or 0.5 ``ome.multiscales``), pixel size from the ``scale``
  coordinate transformation;
* plain PNG / JPEG (single level; small by contract, so they are decoded once at open time).

Stain channel convention (docs/contracts.md): uint8, stain dark on a light background. Grey images pass through
(uint16 is scaled to uint8). RGB(A) images are converted through optical density: ``OD_c = -log((I_c+1)/256)``,
the channel mean ``OD`` is mapped back with ``255·exp(-OD)``. This is the geometric mean of the channels: a
stain-agnostic "total absorbance" that works for Nissl (blue/violet) and DAB (brown) alike, and keeps white glass
at 255. Transparent pixels (alpha 0) are treated as glass.

Pixel size: from OME PhysicalSizeX (+unit), TIFF XResolution/ResolutionUnit, or OME-Zarr scale; otherwise from the
``pixel_size_um`` argument (the sections table). Both present and >1 % apart is an error; neither is an error.
PNG/JPEG dpi is ignored, as it is almost always a screen default (72/96 dpi), not a physical calibration.

No torch, no snakemake here: this module runs inside light CPU preprocessing jobs.
"""

from __future__ import annotations

import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

__all__ = ["Level", "Section", "SectionReadError", "open_section", "to_stain"]

# Tolerance when matching a requested resolution to a pyramid level / integer factor.
_REL_TOL = 0.01
# Output chunk edge of resampled arrays (pixels).
_CHUNK = 1024

_UNIT_TO_UM = {
    "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "å": 1e-4, "angstrom": 1e-4,
}


class SectionReadError(Exception):
    """A section image cannot be read; the message names the file (and the section when known)."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: its pixel size in µm and its (H, W) shape."""

    pixel_size_um: float
    shape: tuple[int, int]


def _where(path: Path | str, section_id: str | None) -> str:
    return f"section {section_id!r} ({path})" if section_id else f"{path}"


# --------------------------------------------------------------------------------------------------------------------
# stain channel conversion


def to_stain(block: np.ndarray) -> np.ndarray:
    """Convert a (H, W) grey or (H, W, C) RGB(A) block to the uint8 stain channel (dark stain, light background)."""
    if block.ndim == 2:
        if block.dtype == np.uint8:
            return block
        if block.dtype == np.uint16:
            return (block.astype(np.uint32) // 257).astype(np.uint8)
        if np.issubdtype(block.dtype, np.floating):
            # Floats are taken as 0..1 intensities when they look like it, else as 0..255.
            scale = 255.0 if np.nanmax(block, initial=0) <= 1.0 else 1.0
            return np.clip(np.nan_to_num(block * scale), 0, 255).astype(np.uint8)
        return np.clip(block, 0, 255).astype(np.uint8)
    rgb = block[..., :3]
    if rgb.dtype == np.uint16:
        rgb = rgb.astype(np.float32) / 257.0
    rgb = rgb.astype(np.float32)
    if block.shape[-1] == 1:
        return to_stain(block[..., 0])
    if rgb.shape[-1] < 3:  # grey + alpha
        rgb = np.repeat(rgb[..., :1], 3, axis=-1)
    od = -np.log((np.clip(rgb, 0, 255) + 1.0) / 256.0).mean(axis=-1)
    out = 256.0 * np.exp(-od) - 1.0
    if block.shape[-1] in (2, 4):
        alpha = block[..., -1]
        out = np.where(alpha == 0, 255.0, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# lazily opened level arrays (picklable: they store the path and re-open in each process)


class _LevelArray:
    """Array-like view of one pyramid level, (H, W) or (H, W, C); wraps read errors into SectionReadError."""

    def __init__(self, path: Path, where: str, shape: tuple[int, ...], dtype: np.dtype, kind: str, key: Any,
                 axes_map: tuple[Any, ...] | None = None) -> None:
        self.path, self.where, self.kind, self.key = path, where, kind, key
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        # axes_map: indexer applied to the raw array to obtain (Y, X[, C]) order (None = already in that order)
        self.axes_map = axes_map
        self._handle: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open(self) -> Any:
        with self._lock:
            if self._handle is None:
                import zarr

                if self.kind == "tiff":
                    import tifffile

                    store = tifffile.imread(str(self.path), aszarr=True, series=0)
                    node = zarr.open(store, mode="r")
                    self._handle = node[str(self.key)] if isinstance(node, zarr.Group) else node
                elif self.kind == "zarr":
                    self._handle = zarr.open_group(str(self.path), mode="r")[self.key]
                else:  # in-memory array (PNG/JPEG)
                    self._handle = self.key
            return self._handle

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            arr = self._open()
            if self.axes_map is None:
                return np.asarray(arr[index])
            # Raw array has extra axes (t, c, z ...): select / transpose, then index.
            sel, perm = self.axes_map
            raw = np.asarray(arr[sel])
            return np.transpose(raw, perm)[index] if perm is not None else raw[index]
        except SectionReadError:
            raise
        except Exception as exc:  # truncated tiles, codec errors, vanished files ...
            raise SectionReadError(f"cannot read pixels of {self.where}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------------
# Section


class Section:
    """An opened section image: pyramid levels, pixel size and lazy access to the stain channel."""

    def __init__(self, path: Path, levels: list[Level], arrays: list[_LevelArray], section_id: str | None = None,
                 is_rgb: bool = False) -> None:
        self.path = Path(path)
        self.section_id = section_id
        self.levels = levels
        self.is_rgb = is_rgb
        self._arrays = arrays
        self._dask: dict[int, da.Array] = {}

    def __repr__(self) -> str:
        lv = ", ".join(f"{lv.shape[0]}x{lv.shape[1]}@{lv.pixel_size_um:g}µm" for lv in self.levels)
        return f"Section({str(self.path)!r}, levels=[{lv}], rgb={self.is_rgb})"

    @property
    def pixel_size_um(self) -> float:
        """Pixel size of the full-resolution level in µm."""
        return self.levels[0].pixel_size_um

    @property
    def where(self) -> str:
        """Human-readable 'section (file)' for messages."""
        return _where(self.path, self.section_id)

    def level_for(self, um: float) -> int:
        """Index of the coarsest level whose pixel size is at or finer than ``um`` (level 0 if all are coarser)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.pixel_size_um <= um * (1 + _REL_TOL) and lv.pixel_size_um >= self.levels[best].pixel_size_um:
                best = i
        return best

    def _level_raw(self, level: int) -> da.Array:
        """Raw (un-converted) dask array of one level, (H, W) or (H, W, C)."""
        arr = self._arrays[level]
        # Chunks: multiples of the storage tiles, ~1-2k px, so one task reads a handful of tiles.
        chunks: tuple = (_CHUNK, _CHUNK) + tuple(arr.shape[2:])
        name = f"cytonet-read-{dask.base.tokenize(str(self.path), os.path.getmtime(self.path))}-level{level}"
        return da.from_array(arr, chunks=chunks, name=name, asarray=False, fancy=False)

    def level_array(self, level: int) -> da.Array:
        """Lazy uint8 stain channel of one pyramid level (H, W)."""
        if level not in self._dask:
            raw = self._level_raw(level)
            if raw.ndim == 2 and raw.dtype == np.uint8:
                self._dask[level] = raw
            else:
                self._dask[level] = raw.map_blocks(to_stain, dtype=np.uint8, drop_axis=list(range(2, raw.ndim)),
                                                   chunks=raw.chunks[:2])
        return self._dask[level]

    def read(self, um: float | None = None) -> da.Array:
        """Lazy uint8 stain channel at exactly ``um`` µm/px (anti-aliased downsampling of the nearest finer level)."""
        if um is None:
            return self.level_array(0)
        if um < self.pixel_size_um * (1 - _REL_TOL):
            raise ValueError(f"{self.where}: requested {um} µm/px is finer than the full resolution "
                             f"{self.pixel_size_um:g} µm/px (upsampling is not supported)")
        level = self.level_for(um)
        arr = self.level_array(level)
        factor = um / self.levels[level].pixel_size_um
        return downsample(arr, factor)

    def read_rgb(self, um: float) -> da.Array | None:
        """Lazy float32 (H, W, 3) RGB at ``um`` µm/px for colour-based QC/masking, or None for grey images."""
        if not self.is_rgb:
            return None
        level = self.level_for(um)
        raw = self._level_raw(level)
        raw = raw[..., :3].astype(np.float32)
        if self._arrays[level].dtype == np.uint16:
            raw = raw / 257.0
        factor = um / self.levels[level].pixel_size_um
        return da.stack([downsample(raw[..., c], factor, dtype=np.float32) for c in range(3)], axis=-1)

    def region(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """One (h, w) uint8 stain region of ``level``, clipped to the image and zero-padded outside it."""
        H, W = self.levels[level].shape
        out = np.zeros((h, w), dtype=np.uint8)
        ya, yb, xa, xb = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
        if ya < yb and xa < xb:
            raw = self._arrays[level][ya:yb, xa:xb]
            out[ya - y0:yb - y0, xa - x0:xb - x0] = to_stain(raw)
        return out


# --------------------------------------------------------------------------------------------------------------------
# anti-aliased lazy downsampling


def _block_mean(arr: da.Array, k: int) -> da.Array:
    """Integer-factor block mean (exact box anti-aliasing); trailing partial blocks are averaged too."""
    H, W = arr.shape
    # Rechunk to multiples of k so that every block reduces locally (no cross-chunk blocks).
    cy = max(k, (_CHUNK // k) * k) if k <= _CHUNK else k
    arr = arr.rechunk((cy, cy))

    def reduce(block: np.ndarray) -> np.ndarray:
        h, w = block.shape
        oh, ow = -(-h // k), -(-w // k)
        pad = np.zeros((oh * k, ow * k), dtype=np.float64)
        cnt = np.zeros_like(pad)
        pad[:h, :w] = block
        cnt[:h, :w] = 1.0
        s = pad.reshape(oh, k, ow, k).sum(axis=(1, 3))
        n = cnt.reshape(oh, k, ow, k).sum(axis=(1, 3))
        return (s / n).astype(np.float32)

    out_chunks = tuple(tuple(-(-c // k) for c in ch) for ch in arr.chunks)
    return arr.map_blocks(reduce, dtype=np.float32, chunks=out_chunks)


def _resample_block(block: np.ndarray, ys: np.ndarray, xs: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    block = block.astype(np.float32)
    if sigma > 0.05:
        block = ndimage.gaussian_filter(block, sigma, mode="nearest")
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(block, [yy, xx], order=1, mode="nearest").astype(np.float32)


def _resample(arr: da.Array, factor: float, out_shape: tuple[int, int]) -> da.Array:
    """Gaussian prefilter (sigma from the residual factor) + bilinear resampling, built block-wise and lazily."""
    H, W = arr.shape
    oh, ow = out_shape
    sigma = max(0.0, (factor - 1.0) / 2.0) if factor > 1 else 0.0
    halo = int(math.ceil(3 * sigma)) + 2
    fy, fx = H / oh, W / ow
    rows = []
    for oy0 in range(0, oh, _CHUNK):
        oy1 = min(oy0 + _CHUNK, oh)
        # pixel-centre alignment: output centre (o+0.5) maps to input (o+0.5)*f - 0.5
        ycs = (np.arange(oy0, oy1) + 0.5) * fy - 0.5
        ya, yb = max(0, int(math.floor(ycs[0])) - halo), min(H, int(math.ceil(ycs[-1])) + halo + 1)
        cols = []
        for ox0 in range(0, ow, _CHUNK):
            ox1 = min(ox0 + _CHUNK, ow)
            xcs = (np.arange(ox0, ox1) + 0.5) * fx - 0.5
            xa, xb = max(0, int(math.floor(xcs[0])) - halo), min(W, int(math.ceil(xcs[-1])) + halo + 1)
            # Stay in dask-array land (no delayed): the graph keeps the level's named layer and stays lazy.
            src = arr[ya:yb, xa:xb].rechunk((yb - ya, xb - xa))
            piece = src.map_blocks(_resample_block, np.clip(ycs - ya, 0, yb - ya - 1),
                                   np.clip(xcs - xa, 0, xb - xa - 1), sigma, dtype=np.float32,
                                   chunks=((oy1 - oy0,), (ox1 - ox0,)))
            cols.append(piece)
        rows.append(cols)
    return da.block(rows)


def downsample(arr: da.Array, factor: float, dtype: Any = np.uint8) -> da.Array:
    """Anti-aliased lazy downsampling of a 2-D dask array by ``factor`` (>= 1); output size round(shape / factor)."""
    H, W = arr.shape
    if factor <= 1 + _REL_TOL:
        return arr if arr.dtype == dtype else arr.astype(dtype)
    out_shape = (max(1, int(round(H / factor))), max(1, int(round(W / factor))))
    k = int(math.floor(factor + _REL_TOL))
    out: da.Array = arr
    if k >= 2:
        out = _block_mean(arr, k)  # exact box average: cheap and alias-free for the integer part
    residual = factor / k if k >= 2 else factor
    if abs(residual - 1.0) > _REL_TOL or out.shape != out_shape:
        out = _resample(out, max(residual, (out.shape[0] / out_shape[0])), out_shape)
    if np.dtype(dtype) == np.uint8:
        return out.map_blocks(lambda b: np.clip(np.rint(b), 0, 255).astype(np.uint8), dtype=np.uint8)
    return out.astype(dtype)


# --------------------------------------------------------------------------------------------------------------------
# format readers


def _check_pixel_size(meta_um: float | None, arg_um: float | None, where: str, source: str) -> float:
    if meta_um is not None and not (math.isfinite(meta_um) and meta_um > 0):
        meta_um = None
    if arg_um is not None and not (math.isfinite(float(arg_um)) and float(arg_um) > 0):
        raise SectionReadError(f"{where}: pixel_size_um must be a positive number, got {arg_um!r}")
    if meta_um is not None and arg_um is not None:
        if abs(meta_um - float(arg_um)) > _REL_TOL * max(meta_um, float(arg_um)):
            raise SectionReadError(
                f"{where}: pixel size conflict: the image {source} says {meta_um:g} µm/px but pixel_size_um is "
                f"{float(arg_um):g} µm/px (they differ by more than 1 %); fix the sections table or the image")
        return meta_um
    if meta_um is not None:
        return meta_um
    if arg_um is not None:
        return float(arg_um)
    raise SectionReadError(f"{where}: the image has no pixel size in its metadata; "
                           f"add pixel_size_um for this section to the sections table")


def _unit_um(unit: str | None, default: float | None = 1.0) -> float | None:
    """µm per ``unit`` (None when the unit is unknown); ``default`` when no unit is given."""
    if unit is None or str(unit).strip() == "":
        return default
    return _UNIT_TO_UM.get(str(unit).strip().lower())


def _ome_pixel_size(ome_xml: str | None) -> float | None:
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            factor = _unit_um(el.attrib.get("PhysicalSizeXUnit"), 1.0)  # OME default unit is µm
            if factor is None:
                return None
            return float(el.attrib["PhysicalSizeX"]) * factor
    return None


def _tiff_resolution_um(page: Any) -> float | None:
    tags = page.tags
    xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    unit_v = int(unit.value)
    if not num or not den or unit_v not in (2, 3):  # 1 = no absolute unit
        return None
    per_unit = num / den
    # 72 / 96 dpi are writer defaults (screen resolution), not a scanner calibration.
    if unit_v == 2 and round(per_unit, 3) in (72.0, 96.0):
        return None
    um_per_unit = 25400.0 if unit_v == 2 else 10000.0
    return um_per_unit / per_unit


def _tiff_axes(axes: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Any, bool]:
    """Return (Y, X[, C]) shape, axes_map for _LevelArray, is_rgb from a tifffile series axes string."""
    axes = axes.upper()
    if axes == "YX":
        return tuple(shape), None, False
    if axes in ("YXS", "YXC") and shape[-1] in (3, 4):
        return tuple(shape), None, True
    sel: list[Any] = []
    kept = ""
    for ax, n in zip(axes, shape):
        if ax in "YX" or (ax in "SC" and n in (3, 4)):
            sel.append(slice(None))
            kept += ax
        else:
            sel.append(0)  # first plane of T/Z/extra channels
    perm = tuple(kept.index(a) for a in "YX") + tuple(i for i, a in enumerate(kept) if a not in "YX")
    new_shape = tuple(shape[axes.index(a)] for a in kept)
    new_shape = tuple(new_shape[p] for p in perm)
    return new_shape, (tuple(sel), perm), len(kept) == 3


def _open_tiff(path: Path, pixel_size_um: float | None, where: str, section_id: str | None) -> Section:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            if not tf.series:
                raise SectionReadError(f"{where}: TIFF has no image series")
            series = tf.series[0]
            size = os.path.getsize(path)
            levels_info = []
            for lv in series.levels:
                # A truncated file keeps its IFDs but loses tile data: check the tile table against the file size.
                for page in lv.pages[:1] if lv.pages else []:
                    offs = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
                    if offs and max(offs) > size:
                        raise SectionReadError(f"{where}: TIFF is truncated (tile data ends at byte {max(offs)}, "
                                               f"file has {size} bytes)")
                levels_info.append((lv.shape, lv.dtype, lv.axes))
            meta_um = _ome_pixel_size(tf.ome_metadata) if tf.is_ome else None
            source = "OME metadata"
            if meta_um is None:
                meta_um = _tiff_resolution_um(series.levels[0].keyframe)
                source = "TIFF resolution tags"
    except SectionReadError:
        raise
    except Exception as exc:
        raise SectionReadError(f"{where}: not a readable TIFF: {type(exc).__name__}: {exc}") from exc
    px = _check_pixel_size(meta_um, pixel_size_um, where, source)
    levels, arrays, is_rgb = [], [], False
    W0 = None
    for i, (shape, dtype, axes) in enumerate(levels_info):
        yxc, axes_map, rgb = _tiff_axes(axes, shape)
        is_rgb = is_rgb or rgb
        W0 = W0 or yxc[1]
        um = px * W0 / yxc[1]
        levels.append(Level(float(um), (int(yxc[0]), int(yxc[1]))))
        # A single-level store opens as a zarr array, not a group; _open then ignores the key.
        arrays.append(_LevelArray(path, where, yxc, dtype, "tiff", str(i), axes_map))
    return Section(path, levels, arrays, section_id=section_id, is_rgb=is_rgb)


def _open_ome_zarr(path: Path, pixel_size_um: float | None, where: str, section_id: str | None) -> Section:
    import zarr

    try:
        grp = zarr.open_group(str(path), mode="r")
        attrs = dict(grp.attrs)
        ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not ms:
            raise SectionReadError(f"{where}: Zarr group has no OME-NGFF 'multiscales' metadata")
        ms0 = ms[0]
        axes = ms0.get("axes") or [{"name": n} for n in "tczyx"[-len(grp[ms0["datasets"][0]["path"]].shape):]]
        axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
        names = [a["name"].lower() for a in axes]
        if "y" not in names or "x" not in names:
            raise SectionReadError(f"{where}: OME-Zarr axes {names} lack y/x")
        ix, iy = names.index("x"), names.index("y")
        unit = axes[ix].get("unit")
        unit_um = _unit_um(unit, default=None)

        def scales(entry: dict) -> list[float] | None:
            for t in entry.get("coordinateTransformations", []) or []:
                if t.get("type") == "scale":
                    return [float(v) for v in t["scale"]]
            return None

        global_scale = scales(ms0) or [1.0] * len(names)
        infos = []
        for d in ms0["datasets"]:
            arr = grp[d["path"]]
            s = scales(d)
            sx = s[ix] * global_scale[ix] if s else None
            infos.append((d["path"], tuple(arr.shape), arr.dtype, sx))
    except SectionReadError:
        raise
    except Exception as exc:
        raise SectionReadError(f"{where}: not a readable OME-Zarr: {type(exc).__name__}: {exc}") from exc
    sx0 = infos[0][3]
    meta_um = sx0 * unit_um if (sx0 is not None and unit_um is not None) else None
    px = _check_pixel_size(meta_um, pixel_size_um, where, "OME-Zarr scale")
    levels, arrays, is_rgb = [], [], False
    ic = names.index("c") if "c" in names else None
    for key, shape, dtype, sx in infos:
        sel: list[Any] = []
        kept = []
        for i, (_n, size) in enumerate(zip(names, shape)):
            if i in (iy, ix) or (i == ic and size in (3, 4)):
                sel.append(slice(None))
                kept.append(i)
            else:
                sel.append(0)
        order = [kept.index(iy), kept.index(ix)] + ([kept.index(ic)] if ic in kept else [])
        yxc = tuple(shape[kept[o]] for o in order)
        is_rgb = is_rgb or len(yxc) == 3
        um = (sx / sx0 * px) if (sx and sx0) else px * infos[0][1][ix] / shape[ix]
        axes_map = (None if (len(kept) == len(shape) and order == list(range(len(order))))
                    else (tuple(sel), tuple(order)))
        levels.append(Level(float(um), (int(yxc[0]), int(yxc[1]))))
        arrays.append(_LevelArray(path, where, yxc, dtype, "zarr", key, axes_map))
    # Levels finest first, as the contract says.
    order_lv = sorted(range(len(levels)), key=lambda i: levels[i].pixel_size_um)
    return Section(path, [levels[i] for i in order_lv], [arrays[i] for i in order_lv], section_id=section_id,
                   is_rgb=is_rgb)


def _open_plain(path: Path, pixel_size_um: float | None, where: str, section_id: str | None) -> Section:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # small by contract: decode now, so truncation is reported at open time with the file name
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode in ("1",):
                im = im.convert("L")
            arr = np.asarray(im)
    except Exception as exc:
        raise SectionReadError(f"{where}: not a readable PNG/JPEG image: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] == 2:  # LA: grey + alpha
        arr = np.stack([arr[..., 0]] * 3 + [arr[..., 1]], axis=-1)
    px = _check_pixel_size(None, pixel_size_um, where, "metadata")
    arrays = [_LevelArray(path, where, arr.shape, arr.dtype, "mem", arr)]
    return Section(path, [Level(px, (int(arr.shape[0]), int(arr.shape[1])))], arrays, section_id=section_id,
                   is_rgb=arr.ndim == 3)


def open_section(path: str | os.PathLike, pixel_size_um: float | None = None,
                 section_id: str | None = None) -> Section:
    """Open a section image (pyramidal TIFF, OME-Zarr, PNG/JPEG); raise SectionReadError naming the file on failure."""
    path = Path(path)
    where = _where(path, section_id)
    if not path.exists():
        raise SectionReadError(f"{where}: file not found")
    if pixel_size_um is not None:
        try:
            pixel_size_um = float(pixel_size_um)
        except (TypeError, ValueError) as exc:
            raise SectionReadError(f"{where}: pixel_size_um must be a number, got {pixel_size_um!r}") from exc
        if math.isnan(pixel_size_um):
            pixel_size_um = None  # an empty cell in the sections table
    if path.is_dir():
        if (path / "zarr.json").exists() or (path / ".zattrs").exists() or (path / ".zgroup").exists():
            return _open_ome_zarr(path, pixel_size_um, where, section_id)
        raise SectionReadError(f"{where}: is a directory but not an OME-Zarr group")
    with open(path, "rb") as fh:
        head = fh.read(16)
    name = path.name.lower()
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _open_tiff(path, pixel_size_um, where, section_id)
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        return _open_plain(path, pixel_size_um, where, section_id)
    if re.search(r"\.(tiff?|btf|svs|png|jpe?g)$", name):
        raise SectionReadError(f"{where}: file content is not a valid {path.suffix} image (corrupt or empty file)")
    raise SectionReadError(f"{where}: unsupported image format (expected (OME-)TIFF, OME-Zarr, PNG or JPEG)")
