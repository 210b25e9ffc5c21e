"""``cytonet annotation-to-labels``: a GeoJSON annotation (a QuPath export) as the label image the pipeline trains on.

The polygons are read exactly as patch extraction reads them (:func:`cytonet.io.annotations.rasterise_geojson`:
QuPath's pixel-corner convention, a pixel is labelled when its centre lies inside a polygon, unclassified
annotations skipped with a warning, unknown classes an error) and burnt on the full-resolution pixel grid of the
section image, or on a grid of ``--step`` pixels a cell over the same extent. The result is a palette PNG coloured
by the areas table (uint8; uint16 when an area id is 255 or more), which the ``annotation`` column accepts as is.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

from cytonet.io.annotations import AnnotationError, rasterise_geojson
from cytonet.io.atomic import atomic_path
from cytonet.io.maps import label_encoding, write_label_png
from cytonet.io.readers import SectionReadError, open_section
from cytonet.io.tables import TableError, load_areas

log = logging.getLogger(__name__)


def image_shape(path: str | os.PathLike, pixel_size_um: float | None = None) -> tuple[int, int]:
    """Full-resolution (rows, cols) of a section image; raises SectionReadError naming the file."""
    try:
        return tuple(open_section(path, pixel_size_um).levels[0].shape)
    except SectionReadError:
        if pixel_size_um is not None:
            raise
        # a PNG/JPEG has no pixel size, and only the pixel grid matters here; any other failure raises again
        return tuple(open_section(path, 1.0).levels[0].shape)


def annotation_to_labels(geojson: str | os.PathLike, image: str | os.PathLike, areas: str | os.PathLike,
                         out: str | os.PathLike, step: int = 1, pixel_size_um: float | None = None) -> np.ndarray:
    """Rasterise ``geojson`` on the grid of ``image`` (``step`` full-res pixels a cell), write ``out``; return it."""
    if step < 1:
        raise ValueError(f"--step must be a positive number of pixels, got {step}")
    table = load_areas(areas)
    full = image_shape(image, pixel_size_um)
    grid = (math.ceil(full[0] / step), math.ceil(full[1] / step))
    ids, colours = [int(i) for i in table["area_id"]], [str(c) for c in table["color"]]
    dtype, unused = label_encoding(ids)
    labels = rasterise_geojson(geojson, table, full, grid).astype(dtype)
    with atomic_path(out, suffix=".tmp.png") as tmp:
        write_label_png(tmp, labels, ids, colours, unused)
    counts = {str(n): int((labels == i).sum()) for i, n in zip(ids, table["name"])}
    log.info("%s: %dx%d labels (%d full-resolution px a cell) from %s; labelled cells per area: %s", out,
             grid[0], grid[1], step, geojson, ", ".join(f"{n} {c}" for n, c in counts.items() if c) or "none")
    return labels


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet annotation-to-labels``."""
    parser.add_argument("geojson", help="GeoJSON annotations: a QuPath export (classification.name) or features "
                                        "with an 'area' property (id or name)")
    parser.add_argument("--image", required=True, help="the section image (its full-resolution pixel grid)")
    parser.add_argument("--areas", required=True, help="areas table (area_id, name, color)")
    parser.add_argument("-o", "--output", required=True, help="label image to write (palette PNG)")
    parser.add_argument("--step", type=int, default=1,
                        help="full-resolution pixels per label pixel (default 1; e.g. 4 for huge sections)")
    parser.add_argument("--pixel-size", type=float, default=None, help="µm/px of the image (if not in metadata)")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet annotation-to-labels``; 1 on unreadable input."""
    try:
        labels = annotation_to_labels(args.geojson, args.image, args.areas, args.output, args.step, args.pixel_size)
    except (AnnotationError, SectionReadError, TableError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{Path(args.output)}: {labels.shape[0]}x{labels.shape[1]} labels, {int((labels > 0).sum())} labelled")
    return 0
