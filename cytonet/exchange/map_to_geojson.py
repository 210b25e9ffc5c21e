"""``cytonet map-to-geojson``: an area map as QuPath-importable GeoJSON, for an anatomist to review and correct.

MAP is a label image (PNG/TIFF of area ids; coordinates are its own pixels) or a map written by ``cytonet infer``
or ``cytonet smooth3d`` (its ``<section>_infer.json``, or the ``<section>_areas.png`` beside it): then the
coordinates are full-resolution section pixels, a map cell being ``output_um / image_pixel_size_um`` pixels a side
(from the manifest), so the polygons lie on the section image in QuPath. Each area becomes one annotation (a
MultiPolygon of its regions, holes as interior rings) classified by the area's name and colour; outside tissue (0)
and the uncertain value are left out. The same file is written beside every map (``<section>_areas.geojson``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from cytonet.io.annotations import read_image
from cytonet.io.geojson import labels_to_geojson, write_geojson
from cytonet.io.maps import label_encoding
from cytonet.io.tables import TableError, load_areas

log = logging.getLogger(__name__)
MANIFEST_SUFFIX, AREAS_PNG_SUFFIX = "_infer.json", "_areas.png"


class MapError(ValueError):
    """A map that cannot be exported; the message names the file (and the key)."""


def _manifest_of(path: Path) -> Path | None:
    """The infer manifest that MAP is or sits beside (None for a plain label image)."""
    if path.name.endswith(MANIFEST_SUFFIX):
        return path
    if path.name.endswith(AREAS_PNG_SUFFIX):
        beside = path.with_name(path.name[: -len(AREAS_PNG_SUFFIX)] + MANIFEST_SUFFIX)
        return beside if beside.is_file() else None
    return None


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float, dict | None]:
    """(label grid, full-resolution pixels per cell, infer manifest or None) of MAP."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f"{path}: map not found")
    manifest_path, scale, manifest = _manifest_of(path), 1.0, None
    if manifest_path is not None:
        try:
            manifest = json.loads(manifest_path.read_text())
            image = manifest_path.parent / manifest["outputs"]["areas_png"]
            scale = float(manifest["output_um"]) / float(manifest["image_pixel_size_um"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MapError(f"{manifest_path}: not a readable infer manifest ({type(exc).__name__}: {exc})") from exc
        path = image
    try:
        labels = read_image(path)
    except Exception as exc:  # noqa: BLE001 - any broken image is reported with its name
        raise MapError(f"{path}: cannot read the area map: {exc}") from exc
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise MapError(f"{path}: an area map must be a single-channel integer label image, got {labels.dtype} "
                       f"{labels.shape}")
    return labels, scale, manifest


def map_to_geojson(map_path: str | os.PathLike, out: str | os.PathLike,
                   areas: str | os.PathLike | None = None) -> dict:
    """Export MAP's areas as GeoJSON to ``out``; ``areas`` defaults to the areas in the infer manifest."""
    labels, scale, manifest = read_map(map_path)
    if areas is not None:
        table = load_areas(areas)
        rows = list(zip(table["area_id"].astype(int), table["name"].astype(str), table["color"].astype(str)))
    elif manifest is not None:
        rows = [(int(a["area_id"]), str(a["name"]), str(a["color"])) for a in manifest.get("areas", [])]
    else:
        raise MapError(f"{map_path}: a plain label image needs --areas (the areas table)")
    ids = [r[0] for r in rows]
    uncertain = int(manifest["uncertain_value"]) if manifest and "uncertain_value" in manifest \
        else label_encoding(ids)[1]
    unknown = sorted(set(np.unique(labels).tolist()) - set(ids) - {0, uncertain})
    if unknown:
        raise MapError(f"{map_path}: label value(s) {unknown} are not in the areas table")
    collection = labels_to_geojson(labels, [r for r in rows if r[0] != uncertain], scale)
    write_geojson(out, collection)
    log.info("%s: %d area(s), %d region(s), %g full-resolution px per map cell, from %s", out,
             len(collection["features"]), sum(len(f["geometry"]["coordinates"]) for f in collection["features"]),
             scale, map_path)
    return collection


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet map-to-geojson``."""
    parser.add_argument("map", help="a label image (PNG/TIFF), or a map of cytonet infer: <section>_infer.json or "
                                    "the <section>_areas.png beside it")
    parser.add_argument("--areas", default=None,
                        help="areas table (area_id, name, color); default for infer maps: the manifest's areas")
    parser.add_argument("-o", "--output", required=True,
                        help="GeoJSON file to write (QuPath imports it as annotations, e.g. importObjectsFromFile)")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet map-to-geojson``; 1 on unreadable input."""
    try:
        collection = map_to_geojson(args.map, args.output, args.areas)
    except (MapError, TableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    names = [f["properties"]["name"] for f in collection["features"]]
    print(f"{args.output}: {len(names)} area(s): {', '.join(names) or 'none'}")
    return 0
