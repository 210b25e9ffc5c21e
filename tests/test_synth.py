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
from cytonet.synth.demo import brain_model
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


def test_packaged_profile_statistics_equal_shared() -> None:
    from cytonet.synth.reference import derive_profiles, load_packaged_profiles

    shared = shared_data_dir()
    if shared is None:
        pytest.skip("../shared/data absent: cannot compare the packaged profile statistics")
    derived, packaged = derive_profiles(shared), load_packaged_profiles()
    keys = ["area", "quantity", "index"]
    assert (derived[keys].to_numpy() == packaged[keys].to_numpy()).all()
    np.testing.assert_allclose(derived.value.to_numpy(), packaged.value.to_numpy(), atol=1e-6)


def test_profile_components_reproduce_bigbrain_covariance() -> None:
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("../shared/data absent: no BigBrain profiles")
    with np.load(shared / "bigbrain" / "bigbrain_profiles18_layers_areas.npz", allow_pickle=True) as d:
        names, prof, economo, thick = list(d["economo_names"]), d["profiles"], d["economo"], d["layer_thickness_mm"]
    for m in area_models():
        darks = []
        for h in (0, 1):
            keep = (economo[h] == names.index(m.name)) & (prof[h] < 65535).all(1) & np.isfinite(thick[h]).all(1)
            darks.append(1 - prof[h][keep] / 65535.0)
        # pooled within-hemisphere covariance: the covariance the phantom's columns are drawn from
        cov = sum(np.cov(x.T) * (len(x) - 1) for x in darks) / (sum(map(len, darks)) - 2)
        rel = np.linalg.norm(m.pcs.T @ m.pcs - cov) / np.linalg.norm(cov)
        print(f"{m.name}: {sum(map(len, darks))} vertices, covariance reproduced to {rel:.1e}")
        assert rel < 1e-3, m.name
        np.testing.assert_allclose(m.profile, np.vstack(darks).mean(0), atol=1e-5)


def test_bok_equivolumetric_layers_and_gradual_borders() -> None:
    from cytonet.synth.geometry import BORDER_MM, equivolumetric

    f = np.linspace(0, 1, 11, dtype=np.float32)
    crown, flat, fundus = (equivolumetric(f, np.full_like(f, k)) for k in (1.0, 0.0, -1.0))
    np.testing.assert_allclose(flat, f, atol=1e-6)
    # crowns: the superficial half of the volume lies in less than half the depth, so deep layers are thicker
    assert (crown[1:-1] > f[1:-1]).all() and (fundus[1:-1] < f[1:-1]).all()
    np.testing.assert_allclose([crown[-1], fundus[-1]], [1, 1], atol=1e-6)
    brain = brain_model(DemoParams(), 0)
    starts = brain.borders(0.0)
    L = brain.sheet_length(0.0)
    b = starts[1]  # the border FB | FA
    pos = (b + np.array([-1.0, -0.5, -0.01, 0.01, 0.5, 1.0]) * BORDER_MM / L) % 1.0
    area, nb, w = brain.area_blend(pos, 0.0)
    assert list(area) == [0, 0, 0, 1, 1, 1] and list(nb) == [1, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(w[[1, 4]], 0.1, atol=1e-3)  # 0.9 -> 0.1 over the transition zone
    assert abs(w[2] - 0.5) < 0.02 and w[0] < 0.02


def test_folding_is_irregular() -> None:
    for i in range(4):
        brain = brain_model(DemoParams(), i)
        gaps = np.diff(np.sort(brain.theta0), append=brain.theta0.min() + 2 * np.pi)
        cv_gap, cv_depth = gaps.std() / gaps.mean(), brain.depth0.std() / brain.depth0.mean()
        print(f"brain {i}: {len(gaps)} sulci, spacing CV {cv_gap:.2f}, depth CV {cv_depth:.2f}")
        assert cv_gap > 0.2 and cv_depth > 0.3
        kappa = brain.sheet_curvature(0.0)
        assert kappa.max() > 0.9 and kappa.min() < -0.9  # crowns and fundi


def test_depth_profiles_follow_bigbrain(sections) -> None:
    allsec = sum(sections.values(), [])
    for m in area_models():
        prof = an.depth_profile(allsec, AREA_ID[m.name], 18, od=True)
        r = np.corrcoef(prof, m.profile)[0, 1]
        print(f"{m.name}: rendered depth profile vs BigBrain mean profile r = {r:.3f}")
        assert r > 0.9, m.name
    fa = an.layer_means(allsec, AREA_ID["FA"])
    assert np.isnan(fa[3]), "FA must have no layer IV"


@pytest.fixture(scope="module")
def rendered() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One whole section of the small demo: the render and the renderer's ground-truth fields."""
    from cytonet.synth.demo import section_specs_one

    r = section_specs_one(DemoParams.from_cfg(SMALL_DEMO), "demo1", 1).renderer
    h, w = r.shape
    rows, cols = np.broadcast_arrays(np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None])
    return r.render_full(), r.labels(rows, cols, (0, 0, h, w))


def test_stria_of_gennari_and_betz_cells_are_drawn(rendered) -> None:
    res, lab = rendered
    dark = 1 - res["image"] / 255.0
    oc = next(m for m in area_models() if m.name == "OC")
    c = np.concatenate([[0], np.cumsum(oc.fractions)])
    iv = oc.fractions[3]
    bands = [c[3] + iv * np.array(x) for x in ((0.05, 0.2), (0.3, 0.5), (0.65, 0.95))]  # IVa, IVb, IVc
    in_oc = (res["area"] == AREA_ID["OC"]) & res["tissue"]
    iva, ivb, ivc = (dark[in_oc & (lab["layer_frac"] >= lo) & (lab["layer_frac"] < hi)].mean() for lo, hi in bands)
    print(f"OC darkness IVa {iva:.3f}, IVb {ivb:.3f}, IVc {ivc:.3f}")
    assert ivb < iva and ivb < ivc, "the cell-poor stria of Gennari (IVb) must be lighter than IVa and IVc"
    # giant Betz pyramids: large dark blobs (darker than their surround: a top-hat) in FA's layer V only
    from scipy import ndimage

    blobs = ndimage.gaussian_filter(dark, 1.0) - ndimage.grey_opening(dark, size=(9, 9)) > 0.25
    share = {a: blobs[(res["area"] == AREA_ID[a]) & (res["layer"] == 5)].mean() for a in ("FA", "PB", "PC", "TE")}
    print("share of blob pixels in layer V:", {a: round(float(v), 5) for a, v in share.items()})
    assert share["FA"] > 5 * max(share[a] for a in ("PB", "PC", "TE"))


def test_vessels_and_white_matter_texture(rendered) -> None:
    res, lab = rendered
    from cytonet.synth.demo import section_specs_one

    r = section_specs_one(DemoParams.from_cfg(SMALL_DEMO), "demo1", 1).renderer
    lumina = [(x, y, rad) for x, y, rad in r.vessels.lumina if rad > 2]
    assert len(lumina) > 20
    img = res["image"].astype(float)
    inside = [img[int(y), int(x)] for x, y, _ in lumina if res["cortex"][int(y), int(x)]]
    cortex_median = np.median(img[res["cortex"]])
    print(f"{len(inside)} lumina in the cortex: median grey {np.median(inside):.0f} vs cortex {cortex_median:.0f}")
    assert np.median(inside) > cortex_median + 20, "vessel lumina must be pale"
    wm = img[res["layer"] == 7]
    assert wm.std() > 3 and np.median(wm) > cortex_median, "white matter: paler than cortex, with texture"


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
    assert r >= 0.7


def test_no_brightness_shortcut_and_lamination_carries_signal(sections, small_demo: Path) -> None:
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
    # calibrated to real cortex, where 6-area profile classification is hard (BigBrain, L -> R: about 0.4)
    assert 0.25 <= scores["laminar_profile"] < 0.8


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
