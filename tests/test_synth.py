"""Tests of the demo-brain generator (cytonet.synth): realism, formats, determinism."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cytonet.synth import DemoConfigError, DemoParams, generate_brain, layout, write_tables
from cytonet.synth import analysis as an
from cytonet.synth.reference import AREAS, area_models, derive_reference, load_packaged, shared_data_dir

sys.path.insert(0, str(Path(__file__).parent))
from synth_fixtures import SMALL_DEMO  # noqa: E402  (small_demo itself comes from conftest)

BRAINS = ["demo1", "demo2", "demo3", "demo4"]
AREA_ID = {name: i + 1 for i, (name, _) in enumerate(AREAS)}


@pytest.fixture(scope="module")
def sections(small_demo: Path) -> dict[str, list[an.SectionData]]:
    return {b: [an.load_section(small_demo, b, r, factor=2) for r in an.read_sections(small_demo, b)]
            for b in BRAINS}


def test_packaged_reference_equals_shared() -> None:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("../shared/data absent: cannot compare the packaged reference copy")
    derived, packaged = derive_reference(shared), load_packaged()
    assert list(derived.columns) == list(packaged.columns)
    assert (derived.area.to_numpy() == packaged.area.to_numpy()).all()
    for col in ("thickness_mm", "density_per_mm2", "cell_area_um2"):
        np.testing.assert_allclose(derived[col].to_numpy(float), packaged[col].to_numpy(float), rtol=1e-6)


def test_layer_darkness_follows_reference(sections) -> None:
    allsec = sum(sections.values(), [])
    for m in area_models():
        lm = an.layer_means(allsec, AREA_ID[m.name])
        ok = np.isfinite(lm) & (m.fractions > 0.02)
        r = np.corrcoef(lm[ok], m.od_per_layer[ok])[0, 1]
        print(f"{m.name}: per-layer darkness vs reference r = {r:.3f}")
        assert r > 0.8, m.name
    oc = an.layer_means(allsec, AREA_ID["OC"])
    assert oc[3] > oc[2] and oc[3] > oc[4], "granular layer IV peak missing in OC"
    fa = an.layer_means(allsec, AREA_ID["FA"])
    assert np.isnan(fa[3]), "FA must have no layer IV"
    # FA: no darkness peak between layers III and V (agranular)
    prof = an.depth_profile(allsec, AREA_ID["FA"], 18, od=True)
    mid = prof[6:12]
    assert not (mid.max() > mid[0] + 0.03 and mid.max() > mid[-1] + 0.03 and 0 < mid.argmax() < len(mid) - 1)


def test_thickness_fractions_match_von_economo(sections) -> None:
    allsec = sum(sections.values(), [])
    for m in area_models():
        tf = an.thickness_fractions(allsec, AREA_ID[m.name])
        present = m.fractions > 0
        rel = np.abs(tf[present] - m.fractions[present]) / m.fractions[present]
        print(f"{m.name}: measured {np.round(tf, 3)} vs table {np.round(m.fractions, 3)}; max rel err {rel.max():.2f}")
        assert rel.max() < 0.2, m.name
        assert (tf[~present] < 0.01).all()


def test_oc_fa_difference_matches_bigbrain(sections) -> None:
    shared = shared_data_dir()
    npz = shared / "bigbrain" / "bigbrain_profiles18_subset3000.npz" if shared else None
    if npz is None or not npz.exists():
        pytest.skip("../shared/data/bigbrain absent: no BigBrain profiles to compare with")
    with np.load(npz, allow_pickle=True) as d:
        names, prof = list(d["area_mean_names"]), d["area_mean_profiles"]

    def bb(area: str) -> np.ndarray:
        return (prof[names.index(f"L_{area}")] + prof[names.index(f"R_{area}")]) / 2

    bb_diff = bb("BA17") - bb("BA4")  # both: high = light = few cells, like our images
    allsec = sum(sections.values(), [])
    syn = an.depth_profile(allsec, AREA_ID["OC"], 18) - an.depth_profile(allsec, AREA_ID["FA"], 18)
    r = np.corrcoef(syn, bb_diff)[0, 1]
    print(f"OC-FA vs BigBrain BA17-BA4 profile difference: r = {r:.3f}")
    assert r > 0.5


def test_no_brightness_shortcut_but_lamination_helps(sections, small_demo: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    feats = {b: [an.patch_features(s, 80, 2.0, SMALL_DEMO["pixel_size_um"], rng) for s in sections[b]]
             for b in BRAINS}

    def stack(bs: list[str], k: int) -> np.ndarray:
        return np.concatenate([f[k] for b in bs for f in feats[b]])

    known, unknown = BRAINS[:3], BRAINS[3:]
    scores = {}
    for k, name in ((0, "global_intensity"), (1, "laminar_profile")):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        clf.fit(stack(known, k), stack(known, 2))
        scores[name] = f1_score(stack(unknown, 2), clf.predict(stack(unknown, k)), average="macro")
    print(f"macro-F1 on the unknown brain: global intensity {scores['global_intensity']:.3f}, "
          f"laminar profile {scores['laminar_profile']:.3f}")
    (small_demo / "classifier_scores.json").write_text(json.dumps(scores, indent=1))
    assert scores["global_intensity"] <= 0.4
    assert scores["laminar_profile"] >= scores["global_intensity"] + 0.15
    assert scores["laminar_profile"] < 0.95


def test_formats_and_tables(small_demo: Path) -> None:
    p = DemoParams.from_cfg(SMALL_DEMO)
    lay = layout(SMALL_DEMO)
    with open(small_demo / "brains.csv") as fh:
        brains = list(csv.DictReader(fh))
    assert [b["brain_id"] for b in brains] == list(lay)
    assert [b["role"] for b in brains] == ["known"] * 3 + ["unknown"]
    with open(small_demo / "areas.csv") as fh:
        areas = list(csv.DictReader(fh))
    assert {"FA", "PB", "OC"} <= {a["name"] for a in areas} and len(areas) >= 6
    for b in brains:
        rows = an.read_sections(small_demo, b["brain_id"])
        assert list(rows[0]) == ["section_id", "image", "pixel_size_um", "z_um", "transform", "annotation",
                                 "ground_truth"]
        assert [r["section_id"] for r in rows] == lay[b["brain_id"]]
        for i, r in enumerate(rows):
            if b["role"] == "unknown":
                assert r["annotation"] == ""
            else:
                assert (r["annotation"] != "") == (i % p.annotate_every == 0)
            bdir = small_demo / b["brain_id"]
            with tifffile.TiffFile(bdir / r["image"]) as tf:
                page = tf.pages[0]
                assert page.is_tiled and page.tilewidth == 256 and page.compression == 8  # deflate
                assert page.dtype == np.uint8 and page.samplesperpixel == 1
                levels = [page.shape] + [sp.shape for sp in page.pages]
                assert max(levels[-1]) <= 512 and len(levels) >= 2
                for a, c in zip(levels, levels[1:]):
                    assert c == ((a[0] + 1) // 2, (a[1] + 1) // 2)
                px = tf.ome_metadata
                assert f'PhysicalSizeX="{SMALL_DEMO["pixel_size_um"]}"' in px and "PhysicalSizeXUnit" in px
                shape = page.shape
                img = page.asarray()
            for kind in ("tissue", "cortex", "area", "layer"):
                assert np.asarray(Image.open(bdir / "truth" / f"{r['section_id']}_{kind}.png")).shape == shape
            assert r["ground_truth"] == f"truth/{r['section_id']}_area.png"
            tissue = np.asarray(Image.open(bdir / "truth" / f"{r['section_id']}_tissue.png")) > 0
            assert img[tissue].mean() < img[~tissue].mean() - 20  # dark tissue on light glass
            # transform: pixel -> mm; z from z_um; in-plane scale = pixel size / shrinkage
            T = np.array([float(x) for x in r["transform"].split()]).reshape(3, 4)
            assert T[2, 3] == pytest.approx(float(r["z_um"]) / 1000)
            scale = np.sqrt(abs(np.linalg.det(T[:2, :2])))
            assert 0.9 < scale / (SMALL_DEMO["pixel_size_um"] / 1000) < 1.2
        assert (small_demo / "previews" / f"{b['brain_id']}.png").exists()
    z = [float(r["z_um"]) for r in an.read_sections(small_demo, "demo1")]
    assert np.allclose(np.diff(z), p.section_spacing_um)


def test_params_validation(tmp_path: Path) -> None:
    with pytest.raises(DemoConfigError, match="bogus"):
        DemoParams.from_cfg({"bogus": 1})
    with pytest.raises(DemoConfigError, match="n_brains"):
        DemoParams.from_cfg({"n_brains": "four"})
    a, b = write_tables({"n_brains": 2, "n_unknown": 1}, tmp_path)
    assert a.exists() and b.read_text().count("\n") == 3


def test_determinism(tmp_path: Path, small_demo: Path) -> None:
    cfg = dict(SMALL_DEMO, sections_per_brain=1, n_jobs=1)
    generate_brain("demo2", cfg, tmp_path / "a")
    generate_brain("demo2", cfg, tmp_path / "b")
    ref = small_demo / "demo2" / "images" / "demo2_s000.ome.tif"
    a = tifffile.imread(tmp_path / "a" / "demo2" / "images" / "demo2_s000.ome.tif")
    assert (a == tifffile.imread(tmp_path / "b" / "demo2" / "images" / "demo2_s000.ome.tif")).all()
    assert (a == tifffile.imread(ref)).all()  # the section does not depend on how many sections are written
    other = generate_brain("demo2", dict(cfg, seed=8), tmp_path / "c")
    assert not (a == tifffile.imread(other.parent / "images" / "demo2_s000.ome.tif")).all()


def test_big_section_tiling(tmp_path: Path) -> None:
    from cytonet.synth import write_big_section

    path = write_big_section(tmp_path / "big.ome.tif", 4096, pixel_size_um=4.0, seed=1)
    # written under a temporary name and renamed; the spilled pyramid levels are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ome.tif", "big_tissue_ds16.png"]
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.shape == (4096, 4096) and page.is_tiled and page.compression == 8
        assert [sp.shape for sp in page.pages] == [(2048, 2048), (1024, 1024), (512, 512)]
        full = page.asarray()
        lvl1 = page.pages[0].asarray()
    # seamless block rendering: level 1 equals the 2x2 mean of the full-resolution image
    from cytonet.synth.tiff import downsample2

    assert (downsample2(full) == lvl1).all()
    mask = np.asarray(Image.open(tmp_path / "big_tissue_ds16.png"))
    assert mask.shape == (256, 256) and 0.1 < (mask > 0).mean() < 0.9
    small = full[::16, ::16][mask > 0].mean()
    assert small < full[::16, ::16][mask == 0].mean()
