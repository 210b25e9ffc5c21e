"""Area labels of a section: label images (PNG/TIFF) and GeoJSON polygons, read and checked in one place.

Patch extraction (sparse annotations), evaluation, the embedding and section metrics (ground truth) all read labels
through :func:`load_labels`. A label image covers the section's full-resolution extent on a grid of its own size
(full resolution or coarser). GeoJSON polygons (a QuPath export, or features with an ``area`` property) are in
full-resolution pixel coordinates with the origin at the top-left corner of the first pixel (QuPath's convention)
and are rasterised on one grid for every caller: :func:`geojson_grid`, a step of at least ``GEOJSON_STEP_PX``
full-resolution pixels, coarser for huge sections so the raster stays below ``GEOJSON_MAX_SIDE`` cells a side.
A cell is labelled when its centre lies inside a polygon (:mod:`cytonet.io.geojson`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GEOJSON_STEP_PX = 4        # finest rasterisation step of polygons, in full-resolution pixels
GEOJSON_MAX_SIDE = 8192    # the raster of a 100k-px section stays ~134 MB (uint16)
GEOJSON_SUFFIXES = (".geojson", ".json")


class AnnotationError(ValueError):
    """A label image or polygon file that cannot be used; the message names the section and the file."""

    def __init__(self, section: str | None, path: Any, problem: str) -> None:
        self.section, self.path, self.problem = section, path, problem
        where = f"section '{section}': " if section is not None else ""  # None: a file outside a sections table
        super().__init__(f"{where}{problem}" + (f" ({path})" if path is not None else ""))


def is_set(value: Any) -> bool:
    """A table cell that holds a value (not None, NaN or empty)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Pixel values of a PNG/TIFF as stored (palette PNGs give their indices, i.e. the area ids)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # full-resolution label images are legitimately huge
    with Image.open(path) as im:
        return np.asarray(im)


def geojson_grid(full_shape: tuple[int, int]) -> tuple[int, int]:
    """The raster grid of GeoJSON polygons over a section of ``full_shape`` full-resolution pixels."""
    step = max(GEOJSON_STEP_PX, math.ceil(max(full_shape) / GEOJSON_MAX_SIDE))
    return max(1, math.ceil(full_shape[0] / step)), max(1, math.ceil(full_shape[1] / step))


def _feature_name(feature: dict, index: int) -> str:
    """How a message names a feature: its index in the file, and its id or name where it has one."""
    label = feature.get("id") or (feature.get("properties") or {}).get("name")
    return f"feature {index}" + (f" ({label})" if label else "")


def _class_of(props: dict) -> Any:
    """The area a feature claims: ``properties.area`` (id or name), else QuPath's classification (None if none)."""
    if props.get("area") is not None:
        return props["area"]
    cls = props.get("classification")
    if isinstance(cls, str):  # QuPath also reads a bare class name
        return cls
    if isinstance(cls, dict):
        if cls.get("name") is not None:
            return cls["name"]
        if cls.get("names"):  # a derived class ("Tumor: Positive"), as QuPath >= 0.4 writes it
            return ": ".join(str(n) for n in cls["names"])
    return None


def _polygonal(geometry: Any) -> dict | None:
    """The Polygon/MultiPolygon of a geometry (the polygons of a GeometryCollection); None for points and lines."""
    if not isinstance(geometry, dict):
        return None
    if geometry.get("type") in ("Polygon", "MultiPolygon"):
        return geometry
    if geometry.get("type") == "GeometryCollection":
        parts = [_polygonal(g) for g in geometry.get("geometries") or []]
        polys = [c for p in parts if p for c in ([p["coordinates"]] if p["type"] == "Polygon" else p["coordinates"])]
        return {"type": "MultiPolygon", "coordinates": polys} if polys else None
    return None


def _area_value(area: Any, by_name: dict[str, int]) -> int | None:
    """Area id of a class: a name of the areas table, or one of its ids (None when it is neither)."""
    text = str(area).strip()
    if text in by_name:
        return by_name[text]
    ids = set(by_name.values())
    return int(text) if text.isdigit() and int(text) in ids else None


def _feature_shape(feature: Any, index: int, by_name: dict[str, int], section: str | None,
                   path: Any) -> tuple[dict, int] | str:
    """(geometry, area id) of one feature, or why it is skipped; a class not in the areas table is an error."""
    from rasterio.features import is_valid_geom

    if not isinstance(feature, dict):
        return f"feature {index}: not a GeoJSON Feature"
    name, props = _feature_name(feature, index), feature.get("properties") or {}
    area, geometry = _class_of(props), _polygonal(feature.get("geometry"))
    if props.get("objectType", "annotation") not in ("annotation", "unknown"):
        return f"{name}: a QuPath {props['objectType']}, not an annotation"
    if area is None:
        return f"{name}: no classification.name or area property"
    if geometry is None:
        return f"{name}: no polygon geometry"
    value = _area_value(area, by_name)
    if value is None:
        raise AnnotationError(section, path, f"{name}: class {area!r} is neither an area id nor a name in the "
                                             f"areas table (names: {', '.join(by_name)})")
    if not is_valid_geom(geometry):
        raise AnnotationError(section, path, f"{name}: invalid polygon (each ring needs >= 4 positions, the last "
                                             "equal to the first)")
    return geometry, value


def geojson_shapes(path: str | os.PathLike, areas: pd.DataFrame,
                   section: str | None = None) -> list[tuple[dict, int]]:
    """(polygonal geometry, area id) of every annotation of a GeoJSON file (QuPath export or ``area`` property).

    Features without a class (or without a polygon, or QuPath detections/cells) are skipped with one warning that
    names them and the file; a class that is not in the areas table is an :class:`AnnotationError`.
    """
    from cytonet.io.geojson import read_features

    try:
        features = read_features(path)
    except (OSError, ValueError) as exc:
        raise AnnotationError(section, path, f"cannot read GeoJSON: {exc}") from exc
    by_name = {str(n): int(i) for i, n in zip(areas["area_id"], areas["name"])}
    shapes, skipped = [], []
    for k, feature in enumerate(features):
        shape = _feature_shape(feature, k, by_name, section, path)
        (skipped if isinstance(shape, str) else shapes).append(shape)
    if skipped:
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        where = f"section '{section}': " if section is not None else ""
        warnings.warn(f"{where}{path}: skipped {len(skipped)} feature(s) that give no area label: "
                      f"{'; '.join(skipped[:10])}{more}", stacklevel=2)
    return shapes


def rasterise_geojson(path: str | os.PathLike, areas: pd.DataFrame, full_shape: tuple[int, int],
                      grid: tuple[int, int], section: str | None = None) -> np.ndarray:
    """Annotations of a GeoJSON file (full-res pixel corners, holes as extra rings) as a uint16 grid of ``grid``.

    A cell gets an area when its centre lies inside the area's polygon (QuPath's pixel-corner convention, see
    :mod:`cytonet.io.geojson`); where annotations overlap, the later one in the file wins.
    """
    from cytonet.io.geojson import burn

    return burn(geojson_shapes(path, areas, section), grid, full_shape, np.uint16)


def load_labels(path: str | os.PathLike, section_id: str, areas: pd.DataFrame,
                full_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Label grid of one section, checked: single channel, only ids of the areas table (0 = no label).

    ``full_shape`` (the section's full-resolution shape) is needed for GeoJSON; a label image that is larger than
    it is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(section_id, path, "annotation file not found")
    geojson = path.suffix.lower() in GEOJSON_SUFFIXES
    if geojson and full_shape is None:
        raise AnnotationError(section_id, path, "GeoJSON polygons need the section image for their extent")
    try:
        labels = (rasterise_geojson(path, areas, full_shape, geojson_grid(full_shape), section_id) if geojson
                  else read_image(path))
    except AnnotationError:
        raise
    except Exception as exc:  # noqa: BLE001 - any broken file is reported with its name
        raise AnnotationError(section_id, path, f"cannot read annotation: {exc}") from exc
    if labels.ndim != 2:
        raise AnnotationError(section_id, path,
                              f"annotation must be a single-channel label image, got shape {labels.shape}")
    unknown = sorted(set(int(v) for v in np.unique(labels)) - {0} - set(int(a) for a in areas["area_id"]))
    if unknown:
        raise AnnotationError(section_id, path, f"annotation has label value(s) {unknown} not in the areas table")
    if full_shape is not None and (labels.shape[0] > full_shape[0] or labels.shape[1] > full_shape[1]):
        raise AnnotationError(section_id, path, f"annotation is {labels.shape}, larger than the image {full_shape}")
    return labels


def labels_at(labels: np.ndarray, full_shape: tuple[int, int], x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """Label (int64) at full-resolution pixel-index centres; the label grid spans the same extent as the image.

    The edge coordinate of centre ``i`` is ``i + 0.5``, scaled to the grid and floored: on the full-resolution grid
    this is the pixel holding the centre, on a coarse grid the cell holding it.
    """
    r = np.floor((np.asarray(y_px, float) + 0.5) * labels.shape[0] / full_shape[0]).astype(np.int64)
    c = np.floor((np.asarray(x_px, float) + 0.5) * labels.shape[1] / full_shape[1]).astype(np.int64)
    return labels[np.clip(r, 0, labels.shape[0] - 1), np.clip(c, 0, labels.shape[1] - 1)].astype(np.int64)


def labels_to_grid(gt: np.ndarray, grid_shape: tuple[int, int], cell_px: float,
                   gt_factor: tuple[float, float] = (1.0, 1.0), strip_rows: int = 1024) -> np.ndarray:
    """Mode of the labels inside each output cell (0 where a cell holds no label pixel).

    ``cell_px``: output cell side in full-resolution pixels. ``gt_factor``: full-resolution pixels per label pixel
    along (rows, cols). Processed in row strips, so memory stays at O(grid × labels) plus one strip.
    """
    gh, gw = grid_shape
    if gt.dtype.kind == "u" and gt.dtype.itemsize <= 2:
        # compact label indices through a lookup table (np.unique sorts every pixel: 0.6 s per demo section)
        values = np.flatnonzero(np.bincount(gt.ravel(), minlength=1))
        lut = np.zeros(int(values[-1]) + 1, np.int64)
        lut[values] = np.arange(len(values))
        inverse = lut[gt]
    else:
        values, inverse = np.unique(gt, return_inverse=True)
        inverse = inverse.reshape(gt.shape)
    nlab = len(values)
    H, W = gt.shape
    # cell index of each label pixel centre: floor((r + 0.5) * f / c)
    ci = np.floor((np.arange(H) + 0.5) * gt_factor[0] / cell_px).astype(np.int64)
    cj = np.floor((np.arange(W) + 0.5) * gt_factor[1] / cell_px).astype(np.int64)
    okj = cj < gw
    counts = np.zeros((gh * gw, nlab), np.int64)
    for r0 in range(0, H, strip_rows):
        r1 = min(r0 + strip_rows, H)
        rows = ci[r0:r1]
        okr = rows < gh
        if not okr.any():
            continue
        cell = rows[okr, None] * gw + cj[None, okj]
        lab = inverse[r0:r1][okr][:, okj]
        counts += np.bincount((cell * nlab + lab).ravel(), minlength=gh * gw * nlab).reshape(gh * gw, nlab)
    has = counts.sum(1) > 0
    out = values[np.argmax(counts, axis=1)]  # argmax: ties -> first (smallest) label value
    out = np.where(has, out, 0)
    return out.reshape(gh, gw).astype(gt.dtype if gt.dtype.kind in "ui" else np.int64)
