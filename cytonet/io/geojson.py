"""Label grids to GeoJSON polygons and back, in QuPath's pixel-corner convention (torch-free).

Coordinates are full-resolution pixels with the origin at the top-left corner of the first pixel: pixel (r, c)
covers x in [c, c + 1), y in [r, r + 1) and has its centre at (c + 0.5, r + 0.5). A label grid of ``grid`` cells
over a section of ``full_shape`` pixels has the same extent, so cell (i, j) covers
x in [j·sx, (j + 1)·sx), y in [i·sy, (i + 1)·sy) with ``sy, sx = full_shape / grid``.

Both directions use GDAL through rasterio. :func:`burn` fills exactly the cells whose centres lie inside a polygon
(its holes left out; a centre exactly on an edge goes to one side only, so polygons that share an edge never
overlap). :func:`trace` returns the exact outlines of the cells of each label (cell edges, holes as interior rings),
so ``burn(trace(labels))`` gives ``labels`` back on the same grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Ring = list[list[float]]
Polygon = list[Ring]  # outline first, then its holes


def _cell_transform(grid: tuple[int, int], full_shape: tuple[int, int]) -> Any:
    from affine import Affine

    return Affine.scale(full_shape[1] / grid[1], full_shape[0] / grid[0])


def burn(shapes: Iterable[tuple[dict, int]], grid: tuple[int, int], full_shape: tuple[int, int],
         dtype: Any = np.uint16) -> np.ndarray:
    """Label grid of ``grid`` cells: each (GeoJSON geometry, value) fills the cells whose centres it holds.

    Later shapes win where shapes overlap; a hole leaves the cells below it as they were (0 or an earlier shape).
    """
    from rasterio.features import rasterize

    shapes = list(shapes)
    if not shapes:
        return np.zeros(grid, dtype)
    return rasterize(shapes, out_shape=grid, transform=_cell_transform(grid, full_shape), fill=0,
                     all_touched=False, dtype=dtype)


def trace(labels: np.ndarray, values: Sequence[int], scale: float | tuple[float, float] = 1.0,
          decimals: int = 3) -> dict[int, list[Polygon]]:
    """Outlines of the 4-connected regions of each of ``values`` in ``labels``, in full-resolution pixels.

    ``scale``: full-resolution pixels per label cell (one number, or (rows, cols)). Other label values (outside
    tissue, uncertain) are not traced. Returns, per value that occurs, its polygons (outline, then holes).
    """
    from rasterio.features import shapes

    sy, sx = (scale, scale) if np.isscalar(scale) else scale
    wanted = np.isin(labels, np.asarray(values, np.int64))
    out: dict[int, list[Polygon]] = {}
    if not wanted.any():
        return out
    source = labels if labels.dtype in (np.uint8, np.uint16, np.int16, np.int32) else labels.astype(np.int32)
    # 4-connectivity: regions touching only at a corner become separate polygons, which every reader accepts
    for geometry, value in shapes(source, mask=wanted, connectivity=4):
        rings = [[[round(x * sx, decimals), round(y * sy, decimals)] for x, y in ring]
                 for ring in geometry["coordinates"]]
        out.setdefault(int(value), []).append(rings)
    return out


def area_features(polygons: dict[int, list[Polygon]], names: dict[int, str],
                  colours: dict[int, tuple[int, int, int]]) -> dict:
    """A QuPath-importable FeatureCollection: one annotation per area (a MultiPolygon of its regions)."""
    features = []
    for value in sorted(polygons):
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": polygons[value]},
            "properties": {"objectType": "annotation", "name": names[value],
                           "classification": {"name": names[value], "color": list(colours[value])}},
        })
    return {"type": "FeatureCollection", "features": features}


def hex_rgb(colour: str) -> tuple[int, int, int]:
    """``#rrggbb`` (an areas-table colour) as an (r, g, b) tuple of 0..255."""
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def labels_to_geojson(labels: np.ndarray, areas: Sequence[tuple[int, str, str]],
                      scale: float | tuple[float, float] = 1.0) -> dict:
    """FeatureCollection of the areas ``(area_id, name, '#rrggbb')`` found in ``labels`` (other values skipped)."""
    ids = [int(a[0]) for a in areas]
    polygons = trace(labels, ids, scale)
    return area_features(polygons, {int(i): str(n) for i, n, _ in areas},
                         {int(i): hex_rgb(str(c)) for i, _, c in areas})


def write_geojson(path: str | os.PathLike, collection: dict) -> Path:
    """Write a FeatureCollection atomically, compact (section outlines have many vertices)."""
    from cytonet.io.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")


def read_features(path: str | os.PathLike) -> list[dict]:
    """The features of a GeoJSON file: a FeatureCollection, a bare list of features (old QuPath) or one Feature."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, dict) and isinstance(data.get("features"), list):
        return data["features"]
    raise ValueError("not a GeoJSON FeatureCollection, Feature or list of features")
