"""Tests of cytonet.io.readers: formats, pixel size, level choice, anti-aliased lazy reads, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from cytonet.io.readers import Level, SectionReadError, open_section, to_stain


def write_pyramid_tiff(path: Path, img: np.ndarray, px_um: float | None = 0.5, levels: int = 3, ome: bool = True,
                       resolution: tuple | None = None) -> Path:
    """Tiled pyramidal (Sub-IFD) deflate TIFF; OME PhysicalSizeX when px_um is given."""
    pyr = [img]
    for _ in range(levels - 1):
        a = pyr[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.float32)
        pyr.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4).round().astype(img.dtype))
    rgb = img.ndim == 3
    meta: dict = {"axes": "YXS" if rgb else "YX"}
    if px_um is not None:
        meta.update(PhysicalSizeX=px_um, PhysicalSizeXUnit="µm", PhysicalSizeY=px_um, PhysicalSizeYUnit="µm")
    kw = dict(tile=(64, 64), compression="zlib", photometric="rgb" if rgb else "minisblack")
    with tifffile.TiffWriter(path, ome=ome, bigtiff=True) as tw:
        extra = {"resolution": resolution[:2], "resolutionunit": resolution[2]} if resolution else {}
        tw.write(pyr[0], subifds=levels - 1, metadata=meta if ome else None, **kw, **extra)
        for a in pyr[1:]:
            tw.write(a, subfiletype=1, **kw)
    return path


def write_ome_zarr(path: Path, img: np.ndarray, px_um: float = 2.0, levels: int = 2) -> Path:
    """Minimal OME-NGFF 0.4-style multiscale group written with zarr v3 (y, x axes, scale in micrometer)."""
    import zarr

    grp = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    a = img
    for i in range(levels):
        grp.create_array(str(i), data=a, chunks=(32, 32))
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [px_um * 2 ** i, px_um * 2 ** i]}]})
        a = a[::2, ::2]
    grp.attrs["multiscales"] = [{"version": "0.4", "name": "s",
                                 "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                          {"name": "x", "type": "space", "unit": "micrometer"}],
                                 "datasets": datasets}]
    return path


@pytest.fixture
def grey_img() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(300, 420), dtype=np.uint8)


def test_tiff_levels_and_pixel_size(tmp_path: Path, grey_img: np.ndarray) -> None:
    p = write_pyramid_tiff(tmp_path / "s.ome.tif", grey_img, px_um=0.5)
    sec = open_section(p)
    assert sec.pixel_size_um == pytest.approx(0.5)
    assert [lv.shape for lv in sec.levels] == [(300, 420), (150, 210), (75, 105)]
    assert sec.levels[1] == Level(pytest.approx(1.0), (150, 210))
    assert sec.level_for(0.5) == 0 and sec.level_for(0.9) == 0 and sec.level_for(1.0) == 1
    assert sec.level_for(1.9) == 1 and sec.level_for(2.0) == 2 and sec.level_for(50) == 2
    assert sec.level_for(0.1) == 0
    full = sec.read(0.5)
    assert isinstance(full, da.Array) and full.dtype == np.uint8
    np.testing.assert_array_equal(full.compute(), grey_img)
    np.testing.assert_array_equal(sec.read(1.0).compute(), tifffile.imread(p, level=1))


def test_read_is_lazy_and_uses_chosen_level(tmp_path: Path, grey_img: np.ndarray) -> None:
    sec = open_section(write_pyramid_tiff(tmp_path / "s.ome.tif", grey_img, px_um=0.5))
    for um, level in [(1.5, 1), (2.0, 2), (3.0, 2), (0.7, 0)]:
        arr = sec.read(um)
        assert isinstance(arr, da.Array)
        keys = " ".join(str(k) for k in dict(arr.__dask_graph__()).keys())
        assert f"level{level}" in keys
        # No other (in particular no full-resolution) level is touched.
        assert all(f"level{o}" not in keys for o in range(3) if o != level)
        assert arr.shape == (round(300 * 0.5 / um), round(420 * 0.5 / um))


def test_tiff_resolution_tags_and_argument(tmp_path: Path, grey_img: np.ndarray) -> None:
    # 20000 px/cm = 0.5 µm/px through plain TIFF resolution tags (no OME).
    p = write_pyramid_tiff(tmp_path / "r.tif", grey_img, px_um=None, ome=False, resolution=(20000, 20000, "CENTIMETER"))
    assert open_section(p).pixel_size_um == pytest.approx(0.5)
    assert open_section(p, pixel_size_um=0.502).pixel_size_um == pytest.approx(0.5)  # within 1 %: metadata wins


def test_downsampling_preserves_mean_and_antialiases(tmp_path: Path) -> None:
    # 1-px checkerboard: any point sampling aliases to black/white; a proper low-pass gives flat ~127.5.
    yy, xx = np.mgrid[0:256, 0:256]
    board = np.where((yy + xx) % 2 == 0, 55, 200).astype(np.uint8)
    sec = open_section(write_pyramid_tiff(tmp_path / "c.ome.tif", board, px_um=1.0, levels=1))
    for um in (2.0, 3.0, 2.5, 4.7):
        out = sec.read(um).compute().astype(float)
        assert abs(out.mean() - board.mean()) < 1.0
        assert out[2:-2, 2:-2].std() < 3.0, um  # no aliasing pattern
    # smooth ramp: mean preserved and values follow the ramp
    ramp = np.tile(np.linspace(0, 255, 300), (200, 1)).astype(np.uint8)
    sec = open_section(write_pyramid_tiff(tmp_path / "ramp.ome.tif", ramp, px_um=1.0, levels=1))
    out = sec.read(3.3).compute().astype(float)
    assert abs(out.mean() - ramp.mean()) < 1.5
    assert np.all(np.diff(out[10]) >= -1)


def test_rgb_tiff_stain_channel(tmp_path: Path) -> None:
    img = np.full((128, 160, 3), 245, np.uint8)
    img[32:96, 40:120] = (120, 90, 200)  # violet Nissl-like stain on near-white glass
    sec = open_section(write_pyramid_tiff(tmp_path / "rgb.ome.tif", img, px_um=2.0, levels=2))
    assert sec.is_rgb and sec.levels[1].shape == (64, 80)
    g = sec.read(2.0).compute()
    assert g.dtype == np.uint8 and g.shape == (128, 160)
    assert g[5, 5] >= 240 and g[60, 80] < 150  # stain dark, glass light
    reg = sec.region(1, -4, 70, 10, 20)
    assert reg.shape == (10, 20) and np.all(reg[:4] == 0) and np.all(reg[4:, 10:] == 0)  # zero-padded outside
    assert reg[5, 2] >= 240


def test_region_clipping(tmp_path: Path, grey_img: np.ndarray) -> None:
    sec = open_section(write_pyramid_tiff(tmp_path / "s.ome.tif", grey_img, px_um=0.5))
    r = sec.region(0, 290, 400, 20, 40)
    np.testing.assert_array_equal(r[:10, :20], grey_img[290:, 400:])
    assert np.all(r[10:] == 0) and np.all(r[:, 20:] == 0)
    np.testing.assert_array_equal(sec.region(1, 10, 20, 5, 6), tifffile.imread(sec.path, level=1)[10:15, 20:26])
    assert np.all(sec.region(2, 500, 500, 3, 3) == 0)


def test_ome_zarr(tmp_path: Path, grey_img: np.ndarray) -> None:
    p = write_ome_zarr(tmp_path / "s.ome.zarr", grey_img, px_um=2.0)
    sec = open_section(p)
    assert sec.pixel_size_um == pytest.approx(2.0)
    assert [lv.shape for lv in sec.levels] == [(300, 420), (150, 210)]
    assert sec.levels[1].pixel_size_um == pytest.approx(4.0)
    np.testing.assert_array_equal(sec.read(4.0).compute(), grey_img[::2, ::2])
    assert sec.read(8.0).shape == (75, 105)
    with pytest.raises(SectionReadError, match="s.ome.zarr"):
        open_section(p, pixel_size_um=3.0)


def test_png_jpeg(tmp_path: Path) -> None:
    img = np.full((60, 80, 3), 250, np.uint8)
    img[10:50, 20:60] = (150, 100, 60)  # DAB brown
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(img[..., 0]).save(tmp_path / "g.png")
    for name in ("a.png", "a.jpg", "g.png"):
        sec = open_section(tmp_path / name, pixel_size_um=10)
        assert len(sec.levels) == 1 and sec.pixel_size_um == 10
        g = sec.read(20).compute()
        assert g.shape == (30, 40) and g.dtype == np.uint8
        assert g[15, 20] < g[2, 2]
    # JPEG dpi (screen default) is not taken for a physical pixel size
    Image.fromarray(img).save(tmp_path / "dpi.jpg", dpi=(72, 72))
    with pytest.raises(SectionReadError, match="pixel_size_um"):
        open_section(tmp_path / "dpi.jpg")


def test_to_stain_od() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [200, 200, 200], [255, 255, 255]]], np.uint8)
    rgba = np.concatenate([rgb, np.array([[[255], [255], [255], [0]]], np.uint8)], axis=-1)
    out = to_stain(rgba)
    assert out[0, 0] == 255 and out[0, 1] == 0 and abs(int(out[0, 2]) - 200) <= 1 and out[0, 3] == 255
    assert to_stain(np.array([[0, 65535]], np.uint16)).tolist() == [[0, 255]]


# ---------------------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SectionReadError, match=r"nope\.tif.*not found"):
        open_section(tmp_path / "nope.tif", pixel_size_um=1)
    with pytest.raises(SectionReadError, match=r"brainA_s001.*nope\.tif"):
        open_section(tmp_path / "nope.tif", pixel_size_um=1, section_id="brainA_s001")


def test_truncated_tiff(tmp_path: Path, grey_img: np.ndarray) -> None:
    p = write_pyramid_tiff(tmp_path / "t.ome.tif", grey_img, px_um=0.5)
    data = p.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    for frac in (0.5, 0.9):
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(SectionReadError, match="cut.ome.tif"):
            sec = open_section(cut, section_id="s7")
            sec.read(0.5).compute()  # if the header survives, reading the pixels must fail with the name
    cut.write_bytes(data[:100])
    with pytest.raises(SectionReadError, match="cut.ome.tif"):
        open_section(cut).read(0.5).compute()


def test_garbage_and_unsupported(tmp_path: Path) -> None:
    for name in ("junk.tif", "junk.png", "junk.jpg", "junk.dat"):
        (tmp_path / name).write_bytes(b"this is not an image\x00\x01" * 10)
        with pytest.raises(SectionReadError, match=name.replace(".", r"\.")):
            open_section(tmp_path / name, pixel_size_um=1)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(SectionReadError, match="empty.tif"):
        open_section(tmp_path / "empty.tif", pixel_size_um=1)
    (tmp_path / "bad_png.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(SectionReadError, match="bad_png.png"):
        open_section(tmp_path / "bad_png.png", pixel_size_um=1)
    (tmp_path / "dir.zarr").mkdir()
    with pytest.raises(SectionReadError, match="dir.zarr"):
        open_section(tmp_path / "dir.zarr", pixel_size_um=1)
    (tmp_path / "meta.json").write_text(json.dumps({}))
    with pytest.raises(SectionReadError, match="unsupported"):
        open_section(tmp_path / "meta.json")


def test_missing_and_conflicting_pixel_size(tmp_path: Path, grey_img: np.ndarray) -> None:
    p = write_pyramid_tiff(tmp_path / "nopx.tif", grey_img, px_um=None, ome=False)
    with pytest.raises(SectionReadError, match=r"nopx\.tif.*add pixel_size_um.*sections table"):
        open_section(p)
    assert open_section(p, pixel_size_um=0.25).levels[1].pixel_size_um == pytest.approx(0.5)
    q = write_pyramid_tiff(tmp_path / "px.ome.tif", grey_img, px_um=0.5)
    with pytest.raises(SectionReadError, match=r"px\.ome\.tif.*conflict"):
        open_section(q, pixel_size_um=0.6, section_id="b_s002")
    Image.fromarray(grey_img).save(tmp_path / "g.png")
    with pytest.raises(SectionReadError, match=r"g\.png.*add pixel_size_um"):
        open_section(tmp_path / "g.png")
