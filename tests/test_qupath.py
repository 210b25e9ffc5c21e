"""QuPath both ways: GeoJSON annotations -> label images (``cytonet annotation-to-labels``), area maps -> GeoJSON
(``cytonet map-to-geojson`` and ``<section>_areas.geojson`` beside every map), in QuPath's pixel-corner convention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from cytonet.cli import main
from cytonet.io.annotations import AnnotationError, load_labels, rasterise_geojson
from cytonet.io.geojson import burn
from cytonet.io.maps import SectionMapWriter

AREAS = [(1, "FA", "#e6194b"), (2, "PB", "#3cb44b"), (3, "OC", "#4363d8")]
AREAS_DF = pd.DataFrame(AREAS, columns=["area_id", "name", "color"])
H, W = 240, 320  # the section image of the end-to-end tests, full-resolution pixels


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _blob(cx, cy, r, wobble, n=90, phase=0.0):
    """A closed, irregular ring (float vertices) around (cx, cy): radius r, modulated by ``wobble``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = r * (1 + wobble * np.sin(5 * t + phase) + 0.5 * wobble * np.cos(3 * t))
    ring = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1).round(3).tolist()
    return ring + [ring[0]]


def _qupath_feature(geometry, name=None, fid=None, object_type="annotation"):
    """A feature as QuPath (>= 0.4) exports it."""
    props = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [230, 25, 75]}
    feature = {"type": "Feature", "geometry": geometry, "properties": props}
    if fid is not None:
        feature["id"] = fid
    return feature


def _polygon(*rings):
    return {"type": "Polygon", "coordinates": list(rings)}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def files(tmp_path):
    """An areas table and a grey section image (PNG, no pixel size: only its pixel grid matters)."""
    areas = tmp_path / "areas.csv"
    areas.write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in AREAS))
    image = tmp_path / "section.png"
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(image)
    return areas, image


def _irregular_export(path: Path) -> Path:
    """QuPath-style export: wobbly areas with holes, a MultiPolygon, an island in a hole (a later feature)."""
    fa = _polygon(_blob(90, 120, 70, 0.15), _blob(85, 115, 25, 0.2, phase=1.0))  # FA with a hole
    pb = {"type": "MultiPolygon", "coordinates": [
        [_blob(230, 70, 50, 0.2, phase=0.5), _square(215.3, 55.7, 240.2, 80.9)],  # part with a square hole
        [_blob(245, 185, 40, 0.25, phase=2.0)]]}
    oc = _polygon(_blob(86, 116, 12, 0.1))  # an island inside FA's hole
    return _write(path, {"type": "FeatureCollection", "features": [
        _qupath_feature(fa, "FA", "a1"), _qupath_feature(pb, "PB", "a2"), _qupath_feature(oc, "OC", "a3")]})


def _reference_labels(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Independent rasterisation: pixel (r, c) is inside when its centre (c + .5, r + .5) is (even-odd rings)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    out = np.zeros(shape, np.uint8)
    by_name = {n: i for i, n, _ in AREAS}
    for feature in json.loads(path.read_text())["features"]:
        geom = feature["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polys:
            inside = np.zeros(len(centres), bool)
            for ring in rings:
                inside ^= MplPath(np.asarray(ring)).contains_points(centres)
            out.ravel()[inside] = by_name[feature["properties"]["classification"]["name"]]
    return out


def _iou(a: np.ndarray, b: np.ndarray, value: int) -> float:
    return float(((a == value) & (b == value)).sum() / ((a == value) | (b == value)).sum())


# ------------------------------------------------------------------------------------------------ reading QuPath
def test_qupath_export_classes_multipolygon_and_holes(tmp_path):
    path = _write(tmp_path / "export.geojson", {"type": "FeatureCollection", "features": [
        _qupath_feature({"type": "MultiPolygon", "coordinates": [
            [_square(0, 0, 40, 40), _square(10, 10, 30, 30)],   # a part with a hole
            [_square(40, 40, 80, 80)]]}, "FA"),
        _qupath_feature(_polygon(_square(40, 0, 80, 40)), "PB")]})
    labels = rasterise_geojson(path, AREAS_DF, (80, 80), (80, 80))
    expected = np.zeros((80, 80), np.uint16)
    expected[:40, :40] = 1
    expected[10:30, 10:30] = 0
    expected[40:, 40:] = 1
    expected[:40, 40:] = 2
    np.testing.assert_array_equal(labels, expected)


def test_unclassified_annotations_are_skipped_with_a_warning_naming_them(tmp_path):
    path = _write(tmp_path / "export.geojson", {"type": "FeatureCollection", "features": [
        _qupath_feature(_polygon(_square(0, 0, 8, 8)), "FA"),
        _qupath_feature(_polygon(_square(8, 0, 16, 8)), None, fid="c0ffee"),       # no class
        _qupath_feature(_polygon(_square(0, 8, 8, 16)), None),                      # no class, no id
        _qupath_feature(_polygon(_square(8, 8, 16, 16)), "PB", object_type="detection")]})
    with pytest.warns(UserWarning, match=r"export\.geojson: skipped 3 feature\(s\)") as record:
        labels = rasterise_geojson(path, AREAS_DF, (16, 16), (16, 16))
    message = str(record[0].message)
    assert "feature 1 (c0ffee): no classification.name" in message and "feature 2: no classification" in message
    assert "feature 3: a QuPath detection" in message
    assert (labels[:8, :8] == 1).all() and (labels[:, 8:] == 0).all() and (labels[8:] == 0).all()


def test_unknown_class_is_an_error_naming_class_and_file(tmp_path):
    path = _write(tmp_path / "export.geojson", [_qupath_feature(_polygon(_square(0, 0, 8, 8)), "V9", fid="x1")])
    with pytest.raises(AnnotationError, match=r"feature 0 \(x1\): class 'V9' is neither") as info:
        rasterise_geojson(path, AREAS_DF, (16, 16), (16, 16))
    assert "export.geojson" in str(info.value) and "FA, PB, OC" in str(info.value)
    with pytest.raises(AnnotationError, match="section 's7': feature 0 .*'V9'.*export.geojson"):
        load_labels(path, "s7", AREAS_DF, (16, 16))


@pytest.mark.parametrize("grid, cells", [((8, 8), 4), ((4, 4), 2), ((2, 2), 1)])
def test_pixel_corner_convention_on_any_grid_of_the_same_extent(tmp_path, grid, cells):
    """A square from (0, 0) to (4, 4) covers exactly pixels 0..3, and the cells whose centres it holds."""
    path = _write(tmp_path / "sq.geojson", [_qupath_feature(_polygon(_square(0, 0, 4, 4)), "FA")])
    labels = rasterise_geojson(path, AREAS_DF, (8, 8), grid)
    expected = np.zeros(grid, np.uint16)
    expected[:cells, :cells] = 1
    np.testing.assert_array_equal(labels, expected)


def test_only_pixels_whose_centres_are_inside():
    inner = burn([(_polygon(_square(0.6, 0.6, 3.4, 3.4)), 1)], (6, 6), (6, 6))  # centres 1.5, 2.5 inside
    assert inner.sum() == 4 and (inner[1:3, 1:3] == 1).all()
    # two polygons sharing an edge through cell centres never both claim a cell, and leave none out
    left, right = _polygon(_square(0, 0, 3, 4)), _polygon(_square(3, 0, 6, 4))
    a, b = burn([(left, 1)], (2, 3), (4, 6)), burn([(right, 1)], (2, 3), (4, 6))
    assert not (a & b).any() and (a | b).all()


# -------------------------------------------------------------------------------------- annotation-to-labels
def test_annotation_to_labels_end_to_end(tmp_path, files, capsys):
    areas, image = files
    export = _irregular_export(tmp_path / "export.geojson")
    out = tmp_path / "labels" / "section_labels.png"
    assert main(["annotation-to-labels", str(export), "--image", str(image), "--areas", str(areas),
                 "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.mode == "P" and im.size == (W, H)
        palette = np.asarray(im.getpalette()[:12]).reshape(4, 3)
        labels = np.asarray(im)
    assert palette[1].tolist() == [0xE6, 0x19, 0x4B] and palette[3].tolist() == [0x43, 0x63, 0xD8]
    reference = _reference_labels(export, (H, W))
    assert (labels == reference).mean() > 0.999  # ties on edges are the only freedom
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # the pipeline reads it as it is
    np.testing.assert_array_equal(load_labels(out, "s1", AREAS_DF, (H, W)), labels)
    assert "section_labels.png: 240x320 labels" in capsys.readouterr().out
    assert not list(out.parent.glob(".*tmp*"))
    # --step 4: the grid the pipeline itself rasterises GeoJSON on (geojson_grid), cell for cell
    coarse = tmp_path / "coarse.png"
    assert main(["annotation-to-labels", str(export), "--image", str(image), "--areas", str(areas),
                 "-o", str(coarse), "--step", "4"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(coarse)), load_labels(export, "s1", AREAS_DF, (H, W)))


def test_annotation_to_labels_errors_name_the_file(tmp_path, files, capsys):
    areas, image = files
    bad = _write(tmp_path / "bad.geojson", [_qupath_feature(_polygon(_square(0, 0, 8, 8)), "V9")])
    assert main(["annotation-to-labels", str(bad), "--image", str(image), "--areas", str(areas),
                 "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "class 'V9'" in err and "bad.geojson" in err and not (tmp_path / "x.png").exists()
    assert main(["annotation-to-labels", str(bad), "--image", str(tmp_path / "missing.png"), "--areas", str(areas),
                 "-o", str(tmp_path / "x.png")]) == 1
    assert "missing.png" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- map-to-geojson
def _features_by_name(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    return {f["properties"]["classification"]["name"]: f for f in data["features"]}


def test_map_to_geojson_on_a_label_png(tmp_path, files):
    areas, _ = files
    labels = np.zeros((20, 30), np.uint8)
    labels[2:12, 3:15] = 1
    labels[5:8, 6:9] = 0     # a hole
    labels[14:18, 20:28] = 2
    labels[0, 29] = 255      # uncertain: not exported
    png = tmp_path / "map.png"
    Image.fromarray(labels).save(png)
    out = tmp_path / "map.geojson"
    assert main(["map-to-geojson", str(png), "--areas", str(areas), "-o", str(out)]) == 0
    features = _features_by_name(out)
    assert sorted(features) == ["FA", "PB"]
    fa = features["FA"]
    assert fa["properties"]["objectType"] == "annotation"
    assert fa["properties"]["classification"]["color"] == [0xE6, 0x19, 0x4B]
    assert fa["geometry"]["type"] == "MultiPolygon" and len(fa["geometry"]["coordinates"]) == 1
    outline, hole = fa["geometry"]["coordinates"][0]
    assert {tuple(p) for p in outline} == {(3, 2), (15, 2), (15, 12), (3, 12)}  # pixel corners
    assert {tuple(p) for p in hole} == {(6, 5), (9, 5), (9, 8), (6, 8)}
    back = rasterise_geojson(out, AREAS_DF, labels.shape, labels.shape)
    np.testing.assert_array_equal(back, np.where(labels == 255, 0, labels))


def _write_map(out_dir: Path, labels: np.ndarray, output_um: float, image_um: float) -> dict[str, Path]:
    """A set of maps as cytonet infer writes them, with one-hot probabilities giving ``labels``."""
    tissue = labels > 0
    p = np.zeros(labels.shape + (len(AREAS),), np.float32)
    for k, (i, _, _) in enumerate(AREAS):
        p[..., k] = labels == i
    areas = [{"area_id": i, "name": n, "color": c} for i, n, c in AREAS]
    with SectionMapWriter(out_dir, "s001", labels.shape, areas, 0.5, 16, "test") as writer:
        writer.write(0, 0, p, tissue)
        return writer.finish(output_um, image_um, 2, None, {"model": "test"})


def test_map_to_geojson_on_an_infer_manifest_scales_to_section_pixels(tmp_path, files):
    areas, _ = files
    labels = np.zeros((24, 32), np.uint8)
    labels[3:20, 2:14] = 1
    labels[8:12, 5:9] = 3      # an island of OC in FA
    labels[4:22, 18:30] = 2
    paths = _write_map(tmp_path / "maps", labels, output_um=8.0, image_um=2.0)  # 4 section pixels a cell
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["outputs"]["areas_geojson"] == "s001_areas.geojson" and paths["areas_geojson"].is_file()
    full = (labels.shape[0] * 4, labels.shape[1] * 4)
    expected = np.kron(labels, np.ones((4, 4), np.uint8))
    for given in (paths["manifest"], paths["areas_png"]):
        out = tmp_path / f"from_{given.suffix[1:]}.geojson"
        assert main(["map-to-geojson", str(given), "--areas", str(areas), "-o", str(out)]) == 0
        np.testing.assert_array_equal(rasterise_geojson(out, AREAS_DF, full, full), expected)
        assert _features_by_name(out) == _features_by_name(paths["areas_geojson"])  # the map's own GeoJSON
    fa_outline = _features_by_name(paths["areas_geojson"])["FA"]["geometry"]["coordinates"][0][0]
    assert {tuple(p) for p in fa_outline} == {(8, 12), (56, 12), (56, 80), (8, 80)}  # cells x4, pixel corners
    # as an annotation, the map's GeoJSON gives the pipeline the map back (the GeoJSON grid has 4-pixel cells too)
    np.testing.assert_array_equal(load_labels(paths["areas_geojson"], "s001", AREAS_DF, full), labels)
    # the manifest's areas serve when no table is given
    assert main(["map-to-geojson", str(paths["manifest"]), "-o", str(tmp_path / "own.geojson")]) == 0


def test_map_to_geojson_errors_name_the_file(tmp_path, files, capsys):
    areas, _ = files
    png = tmp_path / "odd.png"
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(png)
    assert main(["map-to-geojson", str(png), "--areas", str(areas), "-o", str(tmp_path / "o.geojson")]) == 1
    assert "odd.png: label value(s) [9] are not in the areas table" in capsys.readouterr().err
    assert main(["map-to-geojson", str(png), "-o", str(tmp_path / "o.geojson")]) == 1
    assert "odd.png: a plain label image needs --areas" in capsys.readouterr().err
    broken = tmp_path / "s2_infer.json"
    broken.write_text("{}")
    assert main(["map-to-geojson", str(broken), "-o", str(tmp_path / "o.geojson")]) == 1
    assert "s2_infer.json: not a readable infer manifest (KeyError: 'outputs')" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the round trip
def test_round_trip_geojson_labels_geojson_labels_keeps_every_area(tmp_path, files, capsys):
    areas, image = files
    export = _irregular_export(tmp_path / "export.geojson")

    def to_labels(geojson: Path, name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["annotation-to-labels", str(geojson), "--image", str(image), "--areas", str(areas),
                     "-o", str(out)]) == 0
        return np.asarray(Image.open(out))

    first = to_labels(export, "first.png")
    assert main(["map-to-geojson", str(tmp_path / "first.png"), "--areas", str(areas),
                 "-o", str(tmp_path / "traced.geojson")]) == 0
    second = to_labels(tmp_path / "traced.geojson", "second.png")
    reference = _reference_labels(export, (H, W))
    ious = {name: (_iou(first, second, i), _iou(reference, second, i)) for i, name, _ in AREAS}
    with capsys.disabled():
        print("\nround-trip IoU per area (labels -> GeoJSON -> labels, and vs the original polygons):",
              {n: tuple(round(v, 4) for v in pair) for n, pair in ious.items()})
    assert all(a >= 0.95 and b >= 0.95 for a, b in ious.values()), ious
    # the traced outlines follow pixel edges, so the second rasterisation is the first one exactly
    np.testing.assert_array_equal(first, second)
    traced = _features_by_name(tmp_path / "traced.geojson")
    assert len(traced["PB"]["geometry"]["coordinates"]) == 2                 # both parts of the MultiPolygon
    assert len(traced["FA"]["geometry"]["coordinates"][0]) == 2              # FA keeps its hole
    assert all(float(v).is_integer() for ring in traced["OC"]["geometry"]["coordinates"][0] for p in ring
               for v in p)
    assert math.isclose(_iou(reference, first, 1), 1.0, abs_tol=0.01)
