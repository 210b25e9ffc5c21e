"""Labels of a section, read in one place: label images and GeoJSON polygons (QuPath's conventions)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytonet.io.annotations import (
    AnnotationError,
    geojson_grid,
    labels_at,
    labels_to_grid,
    load_labels,
    rasterise_geojson,
)

AREAS = pd.DataFrame({"area_id": [1, 2], "name": ["FA", "PB"]})


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(rings, **props):
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": props}


def test_geojson_names_ids_qupath_classes_and_holes(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature([_square(0, 0, 40, 40), _square(10, 10, 30, 30)], area="FA"),       # a hole in the middle
        _feature([_square(40, 0, 80, 40)], classification={"name": "PB", "color": [255, 0, 0]}),  # QuPath
        _feature([_square(0, 40, 40, 80)], area=2)]}))
    labels = rasterise_geojson(path, AREAS, (80, 80), (8, 8))  # 10 full-res px per cell
    assert labels.dtype == np.uint16 and labels.shape == (8, 8)
    assert labels[0, 0] == 1 and labels[2, 2] == 0  # inside the hole: no label
    assert labels[1, 5] == 2 and labels[5, 1] == 2 and labels[6, 6] == 0


def test_bare_feature_list_of_old_qupath(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps([_feature([_square(0, 0, 80, 80)], classification={"name": "FA"})]))
    assert (load_labels(path, "s1", AREAS, (80, 80)) == 1).mean() > 0.9


def test_one_raster_grid_for_every_reader():
    assert geojson_grid((400, 800)) == (100, 200)  # 4 full-resolution pixels a cell
    big = geojson_grid((100_000, 130_000))
    assert max(big) <= 8192 and big[0] / big[1] == pytest.approx(100 / 130, rel=0.01)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "annotation file not found"),
    (lambda p: Image.fromarray(np.full((8, 8), 7, np.uint8)).save(p), r"label value\(s\) \[7\] not in the areas"),
    (lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p), "single-channel"),
    (lambda p: Image.fromarray(np.zeros((20, 20), np.uint8)).save(p), "larger than the image"),
    (lambda p: p.write_bytes(b"not a png"), "cannot read annotation"),
])
def test_bad_labels_name_the_section_and_file(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(AnnotationError, match=message) as info:
        load_labels(path, "demo1_s003", AREAS, (16, 16))
    assert "demo1_s003" in str(info.value) and "bad.png" in str(info.value)


def test_geojson_needs_the_image_extent(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(AnnotationError, match="need the section image"):
        load_labels(path, "s1", AREAS)


def test_unknown_area_name_in_polygons_is_named(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"features": [_feature([_square(0, 0, 8, 8)], area="V9")]}))
    with pytest.raises(AnnotationError, match="'V9' is neither an area id nor a name"):
        load_labels(path, "s1", AREAS, (16, 16))


def test_labels_at_centres_and_mode_per_cell_agree_on_coarse_grids():
    full = np.repeat(np.repeat(np.array([[1, 2], [0, 1]], np.uint8), 8, 0), 8, 1)  # 16 x 16
    coarse = full[::4, ::4]
    x, y = np.array([0, 9, 3, 15]), np.array([0, 2, 12, 15])
    np.testing.assert_array_equal(labels_at(full, full.shape, x, y), labels_at(coarse, full.shape, x, y))
    np.testing.assert_array_equal(labels_to_grid(full, (2, 2), 8.0), [[1, 2], [0, 1]])


def test_polygon_problems_name_the_section_the_feature_and_the_file(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps([_feature([_square(0, 0, 8, 8)], area=7),                     # id not in the table
                                _feature([[[0, 0], [8, 0], [8, 8]]], area="FA")]))              # ring not closed
    with pytest.raises(AnnotationError, match=r"section 's1': feature 0: class 7 is neither") as info:
        load_labels(path, "s1", AREAS, (16, 16))
    assert "a.geojson" in str(info.value)
    path.write_text(json.dumps([_feature([[[0, 0], [8, 0], [8, 8]]], area="FA")]))
    with pytest.raises(AnnotationError, match="feature 0: invalid polygon .*last equal to the first"):
        load_labels(path, "s1", AREAS, (16, 16))
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"section 's1': cannot read GeoJSON: .*a\.geojson"):
        load_labels(path, "s1", AREAS, (16, 16))


def test_unlabelled_features_warn_with_the_section_and_later_features_win(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"features": [
        _feature([_square(0, 0, 16, 16)], area="FA"),
        _feature([_square(0, 0, 8, 8)], classification={"name": "PB"}),                 # overrides FA here
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties": {"area": "PB"}},
        _feature([_square(8, 8, 16, 16)], name="unnamed")]}))
    with pytest.warns(UserWarning, match=r"section 's2': .*a\.geojson: skipped 2 feature\(s\)") as record:
        labels = load_labels(path, "s2", AREAS, (16, 16))
    assert "feature 2: no polygon geometry" in str(record[0].message)
    assert "feature 3 (unnamed): no classification.name or area property" in str(record[0].message)
    assert labels.shape == (4, 4) and (labels[:2, :2] == 2).all() and (labels[2:, 2:] == 1).all()
