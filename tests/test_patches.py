"""Patch sampling, extraction into the Zarr v3 patch store, bad input, kill-and-rerun (cytonet.preprocess.patches)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from cytonet.io.atomic import file_sha256
from cytonet.io.transforms import SectionTransform
from cytonet.preprocess import extraction
from cytonet.preprocess import patches as P

PX0 = 2.0  # full-res µm/px of the test sections
H0, W0 = 1024, 1280
AFFINE = [0.002, 0.0004, 0.0, 1.5, -0.0003, 0.002, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0]


def pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Position-dependent texture: every offset error changes the pixels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    return ((x * 7 + y * 31 + (x * y) % 17 + seed * 11) % 256).astype(np.uint8)


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k, a.shape[1] // k
    return np.rint(a[:h * k, :w * k].reshape(h, k, w, k).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)


def write_section(path: Path, seed: int = 0, shape=(H0, W0), pixel_size: float | None = PX0) -> list[np.ndarray]:
    """Tiled pyramidal OME-TIFF (levels ×1, ×2, ×4); returns the levels as written."""
    l0 = pattern(*shape, seed=seed)
    levels = [l0, block_mean(l0, 2), block_mean(l0, 4)]
    meta = {"axes": "YX"}
    if pixel_size:
        meta.update(PhysicalSizeX=pixel_size, PhysicalSizeY=pixel_size, PhysicalSizeXUnit="µm",
                    PhysicalSizeYUnit="µm")
    with tifffile.TiffWriter(path, ome=bool(pixel_size)) as tw:
        tw.write(l0, subifds=2, tile=(256, 256), compression="zlib", metadata=meta if pixel_size else None)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, tile=(128, 128), compression="zlib")
    return levels


def ellipse(shape: tuple[int, int], ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    return ((y - cy) / (ry * shape[0])) ** 2 + ((x - cx) / (rx * shape[1])) ** 2 <= 1


def make_brain(root: Path, n_sections: int = 2, annotate: tuple[int, ...] = (0,), tissue_r=(0.42, 0.30),
               brain: str = "b1") -> dict:
    """Sections, masks (32 µm grid), annotation (16 µm grid, areas 1..3 in a cortex ring), tables."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    masks = root / "masks"
    masks.mkdir(exist_ok=True)
    rows = []
    levels = {}
    for i in range(n_sections):
        sid = f"{brain}_s{i:03d}"
        img = root / "images" / f"{sid}.ome.tif"
        levels[sid] = write_section(img, seed=i)
        r = tissue_r[i % len(tissue_r)] if isinstance(tissue_r, tuple) else tissue_r
        mask = ellipse((64, 80), r, r)
        Image.fromarray((mask * 255).astype(np.uint8)).save(masks / f"{sid}.png")
        ann = ""
        if i in annotate:
            ring = ellipse((128, 160), r, r) & ~ellipse((128, 160), r * 0.6, r * 0.6)
            lab = np.zeros((128, 160), np.uint8)
            x = np.arange(160)[None, :].repeat(128, 0)
            lab[ring] = (1 + x[ring] * 3 // 160).astype(np.uint8)
            ann_path = root / f"{sid}_area.png"
            Image.fromarray(lab).save(ann_path)
            ann = ann_path.name
        aff = list(AFFINE)
        aff[11] = 0.02 * i
        rows.append({"section_id": sid, "image": f"images/{sid}.ome.tif", "pixel_size_um": "",
                     "z_um": 20.0 * i, "transform": " ".join(map(str, aff)), "annotation": ann})
    pd.DataFrame(rows).to_csv(root / "sections.csv", index=False)
    pd.DataFrame({"brain_id": [brain], "sections": ["sections.csv"], "role": ["known"]}).to_csv(
        root / "brains.csv", index=False)
    pd.DataFrame({"area_id": [1, 2, 3], "name": ["A1", "A2", "A3"],
                  "color": ["#ff0000", "#00ff00", "#0000ff"]}).to_csv(root / "areas.csv", index=False)
    return {"root": root, "levels": levels, "masks": masks, "brain": brain}


def load(d: dict):
    """Sections and areas tables built by hand (absolute paths, None where absent), as load_sections returns them."""
    from cytonet.io.tables import load_areas

    sec = pd.read_csv(d["root"] / "sections.csv", dtype=str, keep_default_na=False)
    sec["image"] = [str(d["root"] / v) for v in sec["image"]]
    sec["annotation"] = [str(d["root"] / v) if v else None for v in sec["annotation"]]
    sec["pixel_size_um"] = np.nan
    return sec, load_areas(d["root"] / "areas.csv")


def extract(d: dict, out: Path, **params):
    sections, areas = load(d)
    base = {"patch_px": 32, "pixel_size_um": 8.0, "count": 40, "count_per": "section", "shard_patches": 8,
            "min_tissue_fraction": 0.6}
    base.update(params)
    return P.extract_brain(d["brain"], sections, areas, d["masks"], out, base, threads=1, progress=False,
                           base_dir=d["root"])


def expected_patch(levels: list[np.ndarray], tx0: int, ty0: int, S: int, um: float) -> np.ndarray:
    """Independent reference: the patch from the written pyramid (nearest finer level, area average)."""
    level_um = [PX0 * 2**i for i in range(len(levels))]
    li = max(i for i, u in enumerate(level_um) if u <= um + 1e-9)
    f = um / level_um[li]
    src = levels[li]
    if abs(f - round(f)) < 1e-9:
        k = int(round(f))
        return block_mean(src[ty0 * k:(ty0 + S) * k, tx0 * k:(tx0 + S) * k], k) if k > 1 else \
            src[ty0:ty0 + S, tx0:tx0 + S]
    num = round(f * 2)  # f = num/2: upsample ×2 by repetition, then block mean of num
    up = np.repeat(np.repeat(src, 2, 0), 2, 1)
    return block_mean(up[ty0 * num:(ty0 + S) * num, tx0 * num:(tx0 + S) * num], num)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return make_brain(tmp_path_factory.mktemp("brain") / "b1")


@pytest.fixture(scope="module")
def cli_brain(tmp_path_factory):
    # every section annotated: tables.load_sections (pandas 3) cannot yet read a partly empty annotation column
    return make_brain(tmp_path_factory.mktemp("clibrain") / "b1", annotate=(0, 1))


@pytest.fixture(scope="module")
def store(brain, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "patches"
    extract(brain, out)
    return out


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("um", [8.0, 16.0, 6.0])
def test_patch_pixels_equal_expected_region(brain, tmp_path, um):
    out = tmp_path / "p"
    extract(brain, out, pixel_size_um=um, count=12)
    table = pd.read_parquet(out / "patches.parquet")
    arr = zarr.open(out / "patches.zarr", mode="r")["patches"]
    S = 32
    scale = um / PX0
    for row in table.itertuples():
        foot = S * scale
        tx0 = (row.x_px + 0.5 - foot / 2) / scale
        ty0 = (row.y_px + 0.5 - foot / 2) / scale
        assert abs(tx0 - round(tx0)) < 1e-6 and abs(ty0 - round(ty0)) < 1e-6
        exp = expected_patch(brain["levels"][row.section], int(round(tx0)), int(round(ty0)), S, um)
        got = arr[row.index]
        if um == 6.0:  # non-integer factor: rounding of the two equivalent float paths may differ by 1
            assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1
        else:
            np.testing.assert_array_equal(got, exp)


def test_direct_tile_decoding_equals_reader_regions(brain, tmp_path, monkeypatch):
    """The fast path (decoding TIFF tiles directly) and the reader's region() give the same store."""
    extract(brain, tmp_path / "fast", count=10)
    monkeypatch.setattr(extraction, "_open_tiff_level", lambda section, level: None)
    extract(brain, tmp_path / "slow", count=10)
    a = zarr.open(tmp_path / "fast" / "patches.zarr", mode="r")["patches"][:]
    b = zarr.open(tmp_path / "slow" / "patches.zarr", mode="r")["patches"][:]
    np.testing.assert_array_equal(a, b)


def test_coordinates_labels_and_tissue_fraction(brain, store):
    table = pd.read_parquet(store / "patches.parquet")
    assert list(table.columns) == P.TABLE_COLUMNS
    sections, _ = load(brain)
    for sid, part in table.groupby("section"):
        row = sections.set_index("section_id").loc[sid]
        tf = SectionTransform.from_spec(row["transform"], brain["root"])
        xyz = tf.to_mm(part.x_px.to_numpy(), part.y_px.to_numpy())
        np.testing.assert_allclose(part[["x_mm", "y_mm", "z_mm"]].to_numpy(), xyz)
        a = np.asarray(AFFINE).reshape(3, 4)
        np.testing.assert_allclose(part.x_mm, a[0, 0] * part.x_px + a[0, 1] * part.y_px + a[0, 3])
        mask = np.asarray(Image.open(brain["masks"] / f"{sid}.png")) > 0
        S, scale = 32, 8.0 / PX0
        foot = S * scale
        for r in part.itertuples():
            # tissue fraction recomputed directly: mask pixels whose centres lie in the footprint
            x0, y0 = r.x_px + 0.5 - foot / 2, r.y_px + 0.5 - foot / 2
            cy = (np.arange(mask.shape[0]) + 0.5) * H0 / mask.shape[0]
            cx = (np.arange(mask.shape[1]) + 0.5) * W0 / mask.shape[1]
            sel = mask[np.ix_((cy >= y0) & (cy < y0 + foot), (cx >= x0) & (cx < x0 + foot))]
            assert r.tissue_fraction == pytest.approx(sel.mean())
            assert r.tissue_fraction >= 0.6
            assert 0 <= x0 and x0 + foot <= W0 and 0 <= y0 and y0 + foot <= H0
        if bool(part.labelled.iloc[0]):
            lab = np.asarray(Image.open(brain["root"] / row["annotation"]))
            rr = ((part.y_px + 0.5) * lab.shape[0] / H0).astype(int)
            cc = ((part.x_px + 0.5) * lab.shape[1] / W0).astype(int)
            np.testing.assert_array_equal(part.area_id.to_numpy(), lab[rr, cc])
            assert (part.area_id > 0).all()
        else:
            assert (part.area_id == 0).all()
    assert table.labelled.any() and not table.labelled.all()


def test_store_opens_with_plain_zarr_and_shards_hold_several_chunks(store):
    P.validate_store(store)
    group = zarr.open(store / "patches.zarr", mode="r")
    arr = group["patches"]
    table = pd.read_parquet(store / "patches.parquet")
    assert arr.shape == (len(table), 32, 32) and arr.dtype == np.uint8
    assert arr.chunks == (1, 32, 32) and arr.shards == (8, 32, 32)
    assert group.attrs["pixel_size_um"] == 8.0 and group.attrs["patch_px"] == 32 and group.attrs["brain"] == "b1"
    files = [f for f in (store / "patches.zarr" / "patches" / "c").rglob("*") if f.is_file()]
    assert len(files) == -(-len(table) // 8) and len(files) < len(table)
    assert (np.asarray(arr[:]).reshape(len(table), -1).std(axis=1) > 0).all()  # no empty (unwritten) patch
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["n_patches"] == len(table) == 80
    assert list((store).glob(".staging-*")) == []


def test_grid_mode(brain, tmp_path):
    out = tmp_path / "g"
    extract(brain, out, sampling="grid", count=10000)
    t = pd.read_parquet(out / "patches.parquet")
    for _, part in t.groupby("section"):
        tx = (part.x_px + 0.5) / 4 - 16
        ty = (part.y_px + 0.5) / 4 - 16
        assert ((tx - tx.min()) % 32 == 0).all() and ((ty - ty.min()) % 32 == 0).all()
        assert not part[["x_px", "y_px"]].duplicated().any()
    P.validate_store(out)
    out2 = tmp_path / "g2"
    extract(brain, out2, sampling="grid", count=5)
    assert len(pd.read_parquet(out2 / "patches.parquet")) == 10


def test_per_brain_counts_follow_tissue_area(tmp_path):
    d = make_brain(tmp_path / "b2", n_sections=2, annotate=(), tissue_r=(0.45, 0.25), brain="b2")
    out = tmp_path / "o"
    extract(d, out, count=100, count_per="brain", min_tissue_fraction=0.3)
    t = pd.read_parquet(out / "patches.parquet")
    n = t.section.value_counts()
    area = {s: (np.asarray(Image.open(d["masks"] / f"{s}.png")) > 0).sum() for s in n.index}
    assert n.sum() == 100
    exp = 100 * area["b2_s000"] / sum(area.values())
    assert abs(n["b2_s000"] - exp) <= 1
    assert P.allocate_counts(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}


def test_sampling_deterministic_and_vectorised():
    mask = ellipse((200, 300), 0.4, 0.4)
    kw = dict(image_shape=(20000, 30000), patch_px=64, scale=2.0, min_tissue_fraction=0.5, seed=3, section_id="s")
    t0 = time.perf_counter()
    a = P.sample_locations(mask, count=200_000, **kw)
    assert time.perf_counter() - t0 < 5.0  # 200k positions: vectorised
    b = P.sample_locations(mask, count=200_000, **kw)
    pd.testing.assert_frame_equal(a, b)
    c = P.sample_locations(mask, count=1000, **{**kw, "seed": 4})
    assert not np.array_equal(a.x_px[:1000], c.x_px)
    assert (a.tissue_fraction >= 0.5).all()


def test_cli_with_dask_cluster_and_param_validation(cli_brain, tmp_path):
    brain = cli_brain
    from cytonet.cli import main

    out = tmp_path / "cli"
    args = ["patches", "--brain", "b1", "--brains-table", str(brain["root"] / "brains.csv"), "--areas",
            str(brain["root"] / "areas.csv"), "--masks-dir", str(brain["masks"]), "--out", str(out),
            "--no-progress"]
    with pytest.raises(ValueError, match="unknown patches parameter 'patch_size'"):
        main(args + ["--param", "patch_size=3"])
    with pytest.raises(ValueError, match="'sampling' must be one of"):
        main(args + ["--param", "sampling=hexagonal"])
    params = json.dumps({"patch_px": 32, "pixel_size_um": 8, "count": 60, "count_per": "brain",
                         "shard_patches": 4, "seed": 1})
    assert main(args + ["--threads", "2", "--dask", '{"cluster": "local"}', "--params", params,
                        "--param", "min_tissue_fraction=0.7"]) == 0
    P.validate_store(out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_patches"] == 60 and m["params"]["min_tissue_fraction"] == 0.7
    # same params in-process give the same table and pixels (tasks are deterministic)
    out1 = tmp_path / "cli1"
    assert main(args[:-2] + [str(out1), "--no-progress", "--threads", "1", "--params", params,
                             "--param", "min_tissue_fraction=0.7"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "patches.parquet"), pd.read_parquet(out1 / "patches.parquet"))
    np.testing.assert_array_equal(zarr.open(out / "patches.zarr", mode="r")["patches"][:],
                                  zarr.open(out1 / "patches.zarr", mode="r")["patches"][:])


def test_kill_and_rerun(cli_brain, tmp_path):
    brain = cli_brain
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "cytonet.cli", "patches", "--brain", "b1", "--brains-table",
           str(brain["root"] / "brains.csv"), "--areas", str(brain["root"] / "areas.csv"), "--masks-dir",
           str(brain["masks"]), "--out", str(out), "--no-progress", "--params",
           json.dumps({"patch_px": 32, "pixel_size_um": 8, "count": 200, "shard_patches": 4})]
    env = dict(os.environ, CYTONET_TEST_TASK_DELAY_S="0.05")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    shard_glob = ".staging-*/patches.zarr/patches/c/*/*/*"
    while time.time() < deadline and len(list(out.glob(shard_glob))) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="manifest.json missing"):
        P.validate_store(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    P.validate_store(out)
    assert len(pd.read_parquet(out / "patches.parquet")) == 200
    assert list(out.glob(".staging-*")) == []


def test_validate_store_detects_inconsistency(brain, tmp_path):
    out = tmp_path / "v"
    extract(brain, out, count=9)
    P.validate_store(out / "manifest.json")
    t = pd.read_parquet(out / "patches.parquet")
    t.iloc[:-1].to_parquet(out / "patches.parquet", index=False)
    with pytest.raises(ValueError, match="checksum"):
        P.validate_store(out)
    m = json.loads((out / "manifest.json").read_text())
    m["table_sha256"] = file_sha256(out / "patches.parquet")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="table has 17 rows, store 18 patches"):
        P.validate_store(out)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _bad_brain(tmp_path: Path, kind: str) -> tuple[dict, str, str]:
    """A 2-section brain whose section 1 is broken in one way; returns (brain, section, file named)."""
    d = make_brain(tmp_path / kind, n_sections=2, annotate=(1,) if kind == "unknown_area" else (), brain="bb")
    sid = "bb_s001"
    img = d["root"] / "images" / f"{sid}.ome.tif"
    target = str(img)
    if kind == "corrupt":
        data = bytearray(img.read_bytes())
        img.write_bytes(b"GARBAGE!" + bytes(data[8:]))
    elif kind == "truncated":
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    elif kind == "missing":
        img.unlink()
    elif kind == "no_pixel_size":
        write_section(img, seed=1, pixel_size=None)
    elif kind == "empty":
        mask = d["masks"] / f"{sid}.png"
        Image.fromarray(np.zeros((64, 80), np.uint8)).save(mask)
        target = str(mask)
    elif kind == "unknown_area":
        ann = d["root"] / f"{sid}_area.png"
        lab = np.asarray(Image.open(ann)).copy()
        lab[lab == 3] = 9
        Image.fromarray(lab).save(ann)
        target = str(ann)
    return d, sid, target


BAD = {
    "corrupt": "cannot read image",
    "truncated": "truncated",
    "missing": "image file not found",
    "no_pixel_size": "missing pixel size",
    "empty": "empty section",
    "unknown_area": r"label value\(s\) \[9\] not in the areas table",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_errors_name_section_and_file(tmp_path, kind):
    d, sid, target = _bad_brain(tmp_path, kind)
    with pytest.raises(P.PatchInputError, match=BAD[kind]) as info:
        extract(d, tmp_path / "out")
    msg = str(info.value)
    assert f"section '{sid}'" in msg and target in msg, msg
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert list((tmp_path / "out").glob(".staging-*")) == []


@pytest.mark.parametrize("kind", ["truncated", "empty", "unknown_area"])
def test_bad_input_skip_writes_qc(tmp_path, kind):
    d, sid, target = _bad_brain(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=f"skipping section '{sid}'"):
        m = extract(d, out, on_bad_section="skip")
    P.validate_store(out)
    qc = pd.read_csv(out / "qc.csv")
    assert qc.section.tolist() == [sid] and target in qc.file.iloc[0]
    assert pd.Series(qc.problem).str.contains(BAD[kind]).all()
    assert m["skipped_sections"] == [sid] and set(m["sections"]) == {"bb_s000"}


def test_decode_error_during_extraction_is_skipped(tmp_path, monkeypatch):
    """A tile that fails only when decoded (after sampling) drops the section and rebuilds the store."""
    d = make_brain(tmp_path / "de", n_sections=2, annotate=(), brain="de")
    from cytonet.io import readers as readers

    real = readers.open_section

    def flaky(path, pixel_size_um=None, section_id=None):
        sec = real(path, pixel_size_um=pixel_size_um, section_id=section_id)
        if section_id == "de_s001":
            def region(*a, **k):
                raise readers.SectionReadError(f"section 'de_s001' ({path}): cannot read pixels: bad tile")
            sec.region = region
            sec.path = None  # no direct TIFF tile decoding: go through region()
        return sec

    monkeypatch.setattr(readers, "open_section", flaky)
    with pytest.raises(P.PatchInputError, match="de_s001.*cannot read image"):
        extract(d, tmp_path / "o1")
    with pytest.warns(UserWarning, match="skipping section 'de_s001'"):
        m = extract(d, tmp_path / "o2", on_bad_section="skip")
    assert set(m["sections"]) == {"de_s000"}
    P.validate_store(tmp_path / "o2")


# ---------------------------------------------------------------------------------------------------------------
# on a generated demo brain (cytonet.synth)


def test_demo_brain_patches_agree_with_ground_truth(tmp_path):
    from cytonet.cli import main
    from synth_fixtures import masked_demo_brain

    masks = masked_demo_brain(tmp_path)
    out = tmp_path / "patches"
    assert main(["patches", "--brain", "demo1", "--brains-table", str(tmp_path / "brains.csv"), "--areas",
                 str(tmp_path / "areas.csv"), "--masks-dir", str(masks), "--out", str(out), "--no-progress",
                 "--params", json.dumps({"patch_px": 16, "pixel_size_um": 32.0, "count": 150, "count_per": "section",
                                         "shard_patches": 32, "min_tissue_fraction": 0.5})]) == 0
    P.validate_store(out)
    t = pd.read_parquet(out / "patches.parquet")
    assert len(t) == 300 and t.labelled.all() and (t.area_id > 0).all()
    sections = pd.read_csv(tmp_path / "demo1" / "sections.csv")
    for sid, part in t.groupby("section"):
        row = sections.set_index("section_id").loc[sid]
        truth = np.asarray(Image.open(tmp_path / "demo1" / row["ground_truth"]))
        rr = np.floor(part.y_px + 0.5).astype(int)
        cc = np.floor(part.x_px + 0.5).astype(int)
        np.testing.assert_array_equal(part.area_id.to_numpy(), truth[rr, cc])
        xyz = SectionTransform.from_spec(row["transform"]).to_mm(part.x_px, part.y_px)
        np.testing.assert_allclose(part[["x_mm", "y_mm", "z_mm"]].to_numpy(), xyz)
        assert np.allclose(part.z_mm, row["z_um"] / 1000)
