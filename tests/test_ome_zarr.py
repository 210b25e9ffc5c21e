"""The maps are NGFF 0.5 that other tools read: ome-zarr-models validates them, ome_zarr's Reader finds every image.

One small map is written with the shared writer (:class:`cytonet.io.maps.SectionMapWriter`, as infer and smooth3d
write theirs): 3 areas on a 40 x 57 grid of 20 µm cells (odd width: partial blocks), three pyramid levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytonet.io.maps import NGFF_VERSION, UNCERTAIN_U8, SectionMapWriter, normalised_entropy

models = pytest.importorskip("ome_zarr_models.v05")
zarr = pytest.importorskip("zarr")

AREAS = [{"area_id": 1, "name": "hOc1", "color": "#ff0000"}, {"area_id": 2, "name": "hOc2", "color": "#00ff00"},
         {"area_id": 4, "name": "FG1", "color": "#0000ff"}]
GRID, OUTPUT_UM, IMAGE_UM, LEVELS, CHUNK = (40, 57), 20.0, 1.0, 3, 16
SHAPES = [(40, 57), (20, 29), (10, 15)]


def _scale(level: int) -> float:
    return OUTPUT_UM * 2 ** level


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(map path, probabilities (h, w, areas), tissue mask) of a map written block by block."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=GRID).astype(np.float32)
    tissue = np.ones(GRID, bool)
    tissue[:3] = False
    out = tmp_path_factory.mktemp("maps")
    with SectionMapWriter(out, "sec", GRID, AREAS, 0.6, CHUNK, "test") as writer:
        for i0 in range(0, GRID[0], CHUNK):
            for j0 in range(0, GRID[1], CHUNK):
                block = np.s_[i0:i0 + CHUNK, j0:j0 + CHUNK]
                writer.write(i0, j0, probs[block], tissue[block])
        paths = writer.finish(OUTPUT_UM, IMAGE_UM, LEVELS, None, {"model": "test"})
    return paths["zarr"], probs, tissue


def _check_datasets(datasets, channel: bool) -> None:
    """scale = cell size at each level, translation = cell centre relative to the image's pixel (0, 0) centre."""
    assert len(datasets) == LEVELS
    for lv, ds in enumerate(datasets):
        scale, translation = ds.coordinateTransformations
        um, shift = _scale(lv), _scale(lv) / 2 - IMAGE_UM / 2
        assert list(scale.scale) == ([1.0] if channel else []) + [um, um]
        assert list(translation.translation) == ([0.0] if channel else []) + [shift, shift]


def test_metadata_validates_as_ngff_05(written):
    """(a) ome-zarr-models: the map is a v0.5 Image, with a Labels group and a valid image-label for 'areas'."""
    path, _, _ = written
    root = zarr.open_group(str(path), mode="r")
    image = models.Image.from_zarr(root)
    assert image.ome_attributes.version == NGFF_VERSION
    probabilities, entropy = image.ome_attributes.multiscales  # readers use the first unless asked for a name
    assert probabilities.name == "probabilities" and entropy.name == "entropy"
    assert [a.name for a in probabilities.axes] == ["c", "y", "x"] and [a.name for a in entropy.axes] == ["y", "x"]
    assert [ds.path for ds in entropy.datasets] == [f"entropy/{lv}" for lv in range(LEVELS)]
    _check_datasets(probabilities.datasets, channel=True)
    _check_datasets(entropy.datasets, channel=False)
    assert image.labels is not None and image.labels.label_paths == ["areas"]
    label = image.labels.get_image_labels_group("areas").ome_attributes
    assert label.image_label.source.image == "../../"
    colours = {c.label_value: tuple(c.rgba) for c in label.image_label.colors}
    assert colours == {1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 4: (0, 0, 255, 255),
                       UNCERTAIN_U8: (128, 128, 128, 255)}
    _check_datasets(label.multiscales[0].datasets, channel=False)
    # the entropy group is an NGFF image on its own as well (what a viewer opens at <map>/entropy)
    alone = models.Image.from_zarr(root["entropy"]).ome_attributes.multiscales
    assert [m.name for m in alone] == ["entropy"] and [ds.path for ds in alone[0].datasets] == ["0", "1", "2"]
    _check_datasets(alone[0].datasets, channel=False)


def _node_scales(node) -> list[list[float]]:
    return [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]


def test_reader_finds_probabilities_labels_and_entropy(written):
    """(b) ome_zarr.reader: probabilities (omero channel names) and labels from the map, entropy where it is listed."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, probs, tissue = written
    nodes = list(Reader(parse_url(str(path)))())
    images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    labels = [n for n in nodes if n.load(Label)]
    assert len(images) == 1 and len(labels) == 1
    image, label = images[0], labels[0]
    assert [d.shape for d in image.data] == [(len(AREAS), *s) for s in SHAPES]
    assert _node_scales(image) == [[1.0, _scale(lv), _scale(lv)] for lv in range(LEVELS)]
    assert image.metadata["channel_names"] == [a["name"] for a in AREAS]  # omero: names, colours, 0-1 window
    assert image.metadata["colormap"][0] == [[0, 0, 0], [1.0, 0.0, 0.0]]
    assert image.metadata["contrast_limits"] == [[0.0, 1.0]] * len(AREAS)
    p0 = np.asarray(image.data[0])
    np.testing.assert_allclose(np.moveaxis(p0, 0, -1)[tissue], probs[tissue], rtol=1e-6)
    assert np.isnan(p0[:, ~tissue]).all()

    assert label.metadata["name"] == "areas" and not label.visible
    assert [d.shape for d in label.data] == SHAPES and _node_scales(label) == [[_scale(lv)] * 2 for lv in range(LEVELS)]
    lab = np.asarray(label.data[0])
    ids = np.array([a["area_id"] for a in AREAS])
    top = probs.max(-1) >= 0.6
    assert (lab[~tissue] == 0).all()
    assert (lab[tissue & top] == ids[probs.argmax(-1)][tissue & top]).all()
    assert (lab[tissue & ~top] == UNCERTAIN_U8).all() and (tissue & ~top).any()
    assert label.metadata["properties"][UNCERTAIN_U8] == {"name": "uncertain"}

    # entropy: the root lists it by name; the Reader opens the group its datasets are in
    listed = zarr.open_group(str(path), mode="r").attrs["ome"]["multiscales"]
    (entry,) = [m for m in listed if m["name"] == "entropy"]
    group = entry["datasets"][0]["path"].rsplit("/", 1)[0]
    (ent_node,) = list(Reader(parse_url(str(path / group)))())
    assert ent_node.load(Multiscales) and ent_node.metadata["name"] == "entropy"
    assert [d.shape for d in ent_node.data] == SHAPES
    assert _node_scales(ent_node) == [[_scale(lv)] * 2 for lv in range(LEVELS)]
    ent = np.asarray(ent_node.data[0])
    np.testing.assert_allclose(ent[tissue], normalised_entropy(probs)[tissue], atol=1e-6)
    assert np.isnan(ent[~tissue]).all() and np.nanmax(ent) <= 1.0
