"""Tests of cytonet.preprocess.mask: synthetic truth, real sections from ../shared/data, the CLI, empty sections."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cytonet.cli import main as cli_main
from cytonet.io.readers import open_section
from cytonet.preprocess.mask import EmptySectionError, compute_mask, mask_image
from test_readers import write_pyramid_tiff


def _shared_data() -> Path:
    env = os.environ.get("CYTONET_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SECTIONS = _shared_data() / "sections"
needs_data = pytest.mark.skipif(not SECTIONS.is_dir(),
                                reason=f"real reference sections not found at {SECTIONS} (set CYTONET_SHARED_DATA)")


# ------------------------------------------------------------------------------------------------------- synthetic


def synthetic_section(seed: int = 0, rgb: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Glass, two tissue pieces (pale textured WM core, dark cortex rim), a ventricle, dust, a pen stroke.

    Returns (image uint8, truth bool). Image is RGB (Nissl-like violet) or grey.
    """
    rng = np.random.default_rng(seed)
    H, W = 400, 520
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0

    # wavy outline so the cortex is "folded" a bit
    wobble = 8 * np.sin(np.arctan2(yy - 200, xx - 200) * 7)
    piece_a = ((yy - 200) / 150) ** 2 + ((xx - 200) / 170) ** 2 <= (1 + wobble / 170) ** 2
    piece_b = ellipse(120, 445, 70, 50)
    tissue = piece_a | piece_b
    inner = ndimage.binary_erosion(tissue, iterations=14)  # white matter core; the 14-px rim is cortex
    ventricle = ellipse(210, 190, 25, 45)
    truth = tissue & ~ventricle

    glass = np.array([242, 242, 240], np.float32)
    wm = np.array([222, 219, 234], np.float32)  # pale: only ~20 grey levels below glass
    ctx = np.array([150, 128, 200], np.float32)
    img = np.empty((H, W, 3), np.float32)
    img[:] = glass
    img[tissue] = ctx
    img[inner] = wm
    img[ventricle] = glass
    tex = ndimage.gaussian_filter(rng.normal(0, 14, (H, W)).astype(np.float32), 0.8)  # cell/fibre texture
    img[truth] += tex[truth, None]
    # dust specks on the glass and a dark pen stroke across the glass
    for _ in range(12):
        cy, cx = rng.integers(5, H - 5), rng.integers(5, W - 5)
        if not ndimage.binary_dilation(tissue, iterations=6)[cy, cx]:
            img[cy - 1:cy + 2, cx - 1:cx + 1] = (60, 60, 60)
    pen = (np.abs(yy - (360 - 0.35 * (xx - 300))) < 2.5) & (xx > 300) & ~ndimage.binary_dilation(tissue, iterations=4)
    img[pen] = (35, 35, 45)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # scanner noise
    img = np.clip(img, 0, 255).astype(np.uint8)
    if not rgb:
        img = img.mean(axis=-1).astype(np.uint8)
    return img, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("rgb", [True, False])
def test_synthetic_iou(rgb: bool) -> None:
    img, truth = synthetic_section(rgb=rgb)
    mask = compute_mask(img, pixel_size_um=20)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert iou(mask, truth) >= 0.95
    # the ventricle stays a hole, both pieces are found, nothing of the pen stroke survives
    assert mask[205:215, 180:200].mean() < 0.05
    lab, n = ndimage.label(mask)
    assert n == 2
    assert not mask[380:, 300:].any()


def test_mask_image_files_and_grid(tmp_path: Path) -> None:
    img, truth = synthetic_section(seed=1)
    Image.fromarray(img).save(tmp_path / "s.png")
    res = mask_image(tmp_path / "s.png", tmp_path / "out" / "m.png", pixel_size_um=20, resolution_um=40,
                     qc_png=tmp_path / "out" / "qc.png", section_id="syn_s001")
    out = np.asarray(Image.open(tmp_path / "out" / "m.png"))
    assert res.shape == (200, 260) and res.resolution_um == 40 and out.shape == (200, 260)
    assert set(np.unique(out)) <= {0, 255}
    small = truth[::2, ::2]
    assert iou(out > 0, small) > 0.93
    qc = np.asarray(Image.open(tmp_path / "out" / "qc.png"))
    assert qc.shape == (200, 260, 3)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_empty_section(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blank = np.clip(240 + rng.normal(0, 2, (200, 200)), 0, 255).astype(np.uint8)
    Image.fromarray(blank).save(tmp_path / "blank.png")
    with pytest.raises(EmptySectionError, match=r"b_s009.*blank\.png"):
        mask_image(tmp_path / "blank.png", tmp_path / "m.png", pixel_size_um=20, section_id="b_s009")
    assert not (tmp_path / "m.png").exists()
    assert cli_main(["mask", str(tmp_path / "blank.png"), "-o", str(tmp_path / "m.png"), "--pixel-size", "20"]) == 2
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img, _ = synthetic_section(seed=2)
    Image.fromarray(img).save(tmp_path / "s.png")
    rc = cli_main(["mask", str(tmp_path / "s.png"), "-o", str(tmp_path / "m.png"), "--pixel-size", "50",
                   "--qc", str(tmp_path / "qc.png"), "--section-id", "x_s001"])
    assert rc == 0
    out = capsys.readouterr().out
    # 50 µm/px is already coarse: the mask is on the image's own grid
    assert "400x520" in out and "50 um/px" in out
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == (400, 520) and set(np.unique(m)) == {0, 255}
    assert (tmp_path / "qc.png").exists()


def test_cli_pyramidal_tiff(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img, truth = synthetic_section(seed=3)
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 800x1040 at 8 µm/px
    p = write_pyramid_tiff(tmp_path / "s.ome.tif", big, px_um=8.0, levels=3)
    rc = cli_main(["mask", str(p), "-o", str(tmp_path / "m.png"), "--resolution", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "200x260 at 32 um/px" in out and "level 2" in out
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == (200, 260) and set(np.unique(m)) <= {0, 255}
    assert iou(m > 0, truth[::2, ::2]) > 0.9
    # default resolution on a fine image: a coarser working grid, still printed
    rc = cli_main(["mask", str(p), "-o", str(tmp_path / "m2.png")])
    assert rc == 0 and "um/px" in capsys.readouterr().out
    # unreadable input: error naming the file, exit code 1, no output
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    assert cli_main(["mask", str(tmp_path / "bad.tif"), "-o", str(tmp_path / "m3.png"), "--pixel-size", "1"]) == 1
    assert "bad.tif" in capsys.readouterr().err and not (tmp_path / "m3.png").exists()


# ------------------------------------------------------------------------------------------------------- real data


def _box(mask: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> float:
    return float(mask[y0:y1, x0:x1].mean())


@needs_data
def test_brainmaps_nissl_keeps_pale_white_matter(tmp_path: Path) -> None:
    res = mask_image(SECTIONS / "brainmaps_coronal_nissl.png", tmp_path / "m.png", pixel_size_um=60,
                     qc_png=tmp_path / "qc.png")
    m = res.mask
    assert m.shape == (544, 758)
    # pale white matter (only ~20 grey levels below glass): boxes (y0, y1, x0, x1) in image pixels
    for box in [(240, 260, 140, 160), (140, 160, 440, 460), (300, 320, 560, 580)]:
        assert _box(m, *box) > 0.95, box
    # slide background (corners)
    for box in [(0, 40, 0, 40), (500, 544, 0, 60), (520, 544, 700, 758)]:
        assert _box(m, *box) == 0.0, box
    # ventricles: lateral (left, right) and the third ventricle
    for box in [(228, 242, 275, 310), (228, 242, 430, 470), (280, 330, 370, 380)]:
        assert _box(m, *box) < 0.1, box
    # dark debris in the interhemispheric fissure, pen dot at the top-right corner
    assert _box(m, 100, 140, 372, 392) < 0.05
    assert _box(m, 0, 10, 712, 730) == 0.0
    assert 0.55 < m.mean() < 0.75
    lab, n = ndimage.label(m)
    assert np.bincount(lab.ravel())[1:].max() / m.sum() > 0.95


@needs_data
def test_bigbrain_frame_field_and_white_matter(tmp_path: Path) -> None:
    m = compute_mask(open_section(SECTIONS / "bigbrain_coronal_200um.png", pixel_size_um=200), 200)
    assert m.shape == (486, 942)
    assert _box(m, 0, 80, 0, 942) == 0.0 and _box(m, 0, 486, 0, 260) == 0.0  # black frame
    assert _box(m, 360, 400, 300, 600) == 0.0 and _box(m, 100, 120, 290, 330) == 0.0  # light field
    assert _box(m, 195, 205, 375, 385) == 1.0 and _box(m, 180, 200, 520, 540) == 1.0  # white matter
    assert _box(m, 214, 222, 427, 440) < 0.1  # ventricle
    lab, n = ndimage.label(m)
    assert np.bincount(lab.ravel())[1:].max() / m.sum() > 0.95


@needs_data
def test_macaque_series_one_main_component() -> None:
    files = sorted((SECTIONS / "macaque_sagittal").glob("*.jpg"))
    if not files:
        pytest.skip(f"no macaque sections in {SECTIONS / 'macaque_sagittal'}")
    fractions = []
    for f in files[::4]:  # every 4th section keeps the test fast
        m = compute_mask(open_section(f, pixel_size_um=150), 150)
        lab, n = ndimage.label(m)
        areas = np.bincount(lab.ravel())[1:]
        assert n >= 1, f
        fractions.append(areas.max() / areas.sum())
        assert fractions[-1] >= 0.6, (f.name, fractions[-1])  # some sections hold a detached cerebellum piece
        assert 0.01 < m.mean() < 0.5, f.name  # never the whole slide, never nothing
    assert np.median(fractions) >= 0.95


@needs_data
def test_mouse_dab_plausible(tmp_path: Path) -> None:
    files = sorted((SECTIONS / "mouse_dab").glob("*.png"))
    if not files:
        pytest.skip(f"no mouse DAB sections in {SECTIONS / 'mouse_dab'}")
    for f in files:
        m = compute_mask(open_section(f, pixel_size_um=20), 20)
        assert 0.05 < m.mean() < 0.7, f.name
        assert not m[:5].any() and not m[-5:].any() and not m[:, :5].any() and not m[:, -5:].any(), f.name
        lab, n = ndimage.label(m)
        assert np.bincount(lab.ravel())[1:].max() / m.sum() > 0.5, f.name


# ------------------------------------------------------------------------------------------------------ demo brains


def test_masks_match_demo_ground_truth(small_demo: Path, tmp_path: Path) -> None:
    """Every section of every demo brain: IoU >= 0.95 against the generator's tissue mask (pale WM, layer I kept)."""
    from skimage.transform import resize

    scores = {}
    for image in sorted(small_demo.glob("*/images/*.ome.tif")):
        section = image.name.removesuffix(".ome.tif")
        result = mask_image(image, tmp_path / f"{section}.png", resolution_um=32)
        truth = np.asarray(Image.open(image.parent.parent / "truth" / f"{section}_tissue.png")) > 0
        truth = resize(truth.astype(np.float32), result.shape, order=1, anti_aliasing=True) > 0.5
        scores[section] = iou(result.mask, truth)
    assert len(scores) == 12
    assert min(scores.values()) >= 0.95, scores
