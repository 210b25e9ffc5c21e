"""Whole-section inference: dense vs naive agreement, outputs, streaming, bad input (cytonet.mapping.infer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from cytonet.io import maps
from cytonet.mapping import infer as infer

PX_UM = 2.0       # section pixel size = network resolution in these tests
S = 64            # window
T = 16            # output stride
AREAS = [(1, "FA", "#e6194b"), (2, "FB", "#3cb44b"), (3, "FC", "#4363d8")]


# ------------------------------------------------------------------------------------------------ fixtures
def synth_section(h: int = 448, w: int = 1536, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 dark cells on light, area map (0 outside tissue), tissue mask at 1/4 resolution)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - h / 2) / (0.46 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2 < 1
    # three areas as wavy vertical bands; textures differ in cell density and size
    b1 = w / 3 + 12 * np.sin(yy / 40)
    b2 = 2 * w / 3 + 12 * np.cos(yy / 55)
    area = np.where(xx < b1, 1, np.where(xx < b2, 2, 3)) * tissue
    img = np.zeros((h, w), np.float32)
    for a, (density, sigma) in {1: (0.004, 1.0), 2: (0.02, 1.0), 3: (0.006, 2.5)}.items():
        dots = (rng.random((h, w)) < density) & (area == a)
        img += ndimage.gaussian_filter(dots.astype(np.float32), sigma) * (2 * np.pi * sigma ** 2)
    stain = 235 - 150 * np.clip(img, 0, 1.2) - 25 * tissue + rng.normal(0, 4, (h, w))
    image = np.clip(stain, 0, 255).astype(np.uint8)
    mask = tissue[::4, ::4]
    return image, area.astype(np.uint8), mask


def tiny_model(image: np.ndarray, area: np.ndarray, steps: int = 60, seed: int = 0, S: int = S,
               arch: str = "cnn") -> infer.DenseModel:
    """Small ResNet (cytonet.nn.models) + linear head, trained a few steps on windows of the synthetic areas.

    Random init gives near-uniform probabilities whose argmax flips on tiny perturbations; a few training steps
    make the classes separable so that argmax agreement measures the dense/naive difference, not noise.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = nn.Module()
    if arch == "resnet":
        from cytonet.nn.models import SmallResNet

        model.trunk, model.net_stride = infer._split_backbone(SmallResNet(widths=(8, 16, 32, 32)))
    else:  # plain CNN, 4 stride-2 3x3 convs: net stride 16, receptive-field margin 15 px
        layers: list[nn.Module] = []
        for cin, cout in ((1, 8), (8, 16), (16, 32), (32, 32)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        model.trunk, model.net_stride = nn.Sequential(*layers), 16
    model.head = nn.Linear(32, len(AREAS))
    dm = infer.as_dense_model(model, window_px=S, pixel_size_um=PX_UM, area_ids=[a[0] for a in AREAS],
                              area_names=[a[1] for a in AREAS])
    # windows whose centre lies well inside one area
    core = ndimage.minimum_filter(area, S // 2) == ndimage.maximum_filter(area, S // 2)
    ys, xs = np.nonzero(core & (area > 0))
    params = list(dm.trunk.parameters()) + list(dm.head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    dm.trunk.train()
    m = 3 * dm.net_stride  # context margin of the in-context half of each batch
    pad = np.pad(image, S + m, constant_values=infer.PAD_VALUE)
    K = S // dm.net_stride
    for _ in range(steps):
        k = rng.integers(0, len(ys), 16)
        cy, cx = ys[k] + S + m, xs[k] + S + m  # centres in `pad`
        target = torch.from_numpy(area[ys[k], xs[k]] - 1).long()
        # half isolated windows (what the naive path and finetune see), half windows pooled inside their context
        # (what the dense path sees): the test classifier must not depend on the zero frame of a 4x4-cell window
        iso = np.stack([pad[y - S // 2:y + S // 2, x - S // 2:x + S // 2] for y, x in zip(cy[:8], cx[:8])])
        ctx = np.stack([pad[y - S // 2 - m:y + S // 2 + m, x - S // 2 - m:x + S // 2 + m]
                        for y, x in zip(cy[8:], cx[8:])])
        f_iso = dm.trunk(dm.preprocess(torch.from_numpy(iso))).mean((2, 3))
        c = m // dm.net_stride
        f_ctx = dm.trunk(dm.preprocess(torch.from_numpy(ctx)))[:, :, c:c + K, c:c + K].mean((2, 3))
        loss = nn.functional.cross_entropy(dm.head(torch.cat([f_iso, f_ctx])), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # BatchNorm running statistics after 40 steps (momentum 0.1) are far from the data's: re-estimate them as a
    # cumulative average, so eval mode matches the trained behaviour
    with torch.no_grad():
        for mod in dm.trunk.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        for _ in range(4):
            k = rng.integers(0, len(ys), 64)
            wins = np.stack([pad[y + m + S // 2:y + m + 3 * S // 2, x + m + S // 2:x + m + 3 * S // 2]
                             for y, x in zip(ys[k], xs[k])])
            dm.trunk(dm.preprocess(torch.from_numpy(wins)))
    dm.trunk.eval()
    dm.head.eval()
    return dm


@pytest.fixture(scope="module")
def section() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return synth_section()


@pytest.fixture(scope="module")
def model(section) -> infer.DenseModel:
    # one thread: the test machine is shared, and OpenMP barriers with 2 threads on busy cores cost 20x
    torch.set_num_threads(1)
    image, area, _ = section
    return tiny_model(image, area)


def _run(tmp: Path, section, model, **kw) -> infer.InferenceResult:
    image, _, mask = section
    kw.setdefault("output_um", T * PX_UM)
    return infer.infer_section(image, mask, model, AREAS, tmp, name="s", pixel_size_um=PX_UM, progress=False, **kw)


def _probs(res: infer.InferenceResult) -> np.ndarray:
    import zarr

    return zarr.open_group(str(res.paths["zarr"]), mode="r")["0"][...]


@pytest.fixture(scope="module")
def dense_naive(tmp_path_factory, section, model) -> tuple[infer.InferenceResult, infer.InferenceResult]:
    d = _run(tmp_path_factory.mktemp("dense"), section, model, mode="dense", tile_px=256)
    n = _run(tmp_path_factory.mktemp("naive"), section, model, mode="naive", tile_px=256)
    return d, n


# ---------------------------------------------------------------------------------------------------- tests
def test_adapter_matches_classifier_forward():
    """The torchvision adapter's head(mean(trunk(x))) is the ResNet's own forward."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=3)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.eval()
    dm = infer.as_dense_model(net, window_px=64, pixel_size_um=1.0, area_ids=[1, 2, 3], area_names=list("abc"))
    assert dm.net_stride == 32
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dm.classify(x), net(x), atol=1e-5)


def test_dense_matches_naive(dense_naive, section):
    """(a) argmax agreement >= 99 % inside tissue; (b) max |Δp| under the documented bound (0.5, mean < 0.05)."""
    d, n = dense_naive
    pd_, pn = _probs(d), _probs(n)
    inside = ~np.isnan(pn[0])
    assert inside.sum() > 1000
    assert np.array_equal(inside, ~np.isnan(pd_[0]))
    agree = (pd_.argmax(0) == pn.argmax(0))[inside].mean()
    diff = np.abs(pd_ - pn)[:, inside]
    print(f"agreement {agree:.4f}, max |dp| {diff.max():.4f}, mean {diff.mean():.5f}")
    assert agree >= 0.99
    assert diff.max() < 0.75 and diff.mean() < 0.05
    # the classifier is meaningful: it recovers the synthetic areas
    _, area, _ = section
    truth = area[T // 2::T, T // 2::T][: pd_.shape[1], : pd_.shape[2]]
    ok = inside & (truth > 0)
    assert (pd_.argmax(0) + 1 == truth)[ok].mean() > 0.85


def test_outputs(dense_naive, model):
    """(c) OME-Zarr NGFF metadata, probabilities, labels, entropy, PNGs."""
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from PIL import Image

    res = dense_naive[0]
    zpath = res.paths["zarr"]
    nodes = list(Reader(parse_url(str(zpath)))())
    ms = [nd for nd in nodes if nd.specs and any(isinstance(sp, Multiscales) for sp in nd.specs)]
    assert ms, "ome_zarr.reader finds no multiscales image"
    img = ms[0]
    assert img.data[0].shape[0] == len(AREAS)
    assert len(img.data) >= 2
    root = zarr.open_group(str(zpath), mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == maps.NGFF_VERSION
    m = ome["multiscales"][0]
    assert [a["name"] for a in m["axes"]] == ["c", "y", "x"]
    assert [a["type"] for a in m["axes"]] == ["channel", "space", "space"]
    assert all(a.get("unit") == "micrometer" for a in m["axes"][1:])
    for lv, ds in enumerate(m["datasets"]):
        assert ds["coordinateTransformations"][0]["scale"] == [1.0, T * PX_UM * 2 ** lv, T * PX_UM * 2 ** lv]
    assert [c["label"] for c in ome["omero"]["channels"]] == [a[1] for a in AREAS]
    p = root["0"][...]
    inside = ~np.isnan(p[0])
    assert np.allclose(p[:, inside].sum(0), 1, atol=1e-4)
    assert np.isnan(p[:, ~inside]).all() and (~inside).sum() > 100
    lab = root["labels/areas/0"][...]
    assert (lab[~inside] == 0).all() and set(np.unique(lab[inside])) <= {1, 2, 3, maps.UNCERTAIN_U8}
    ent = root["entropy/0"][...]
    assert np.nanmin(ent) >= 0 and np.nanmax(ent) <= 1 and np.isnan(ent[~inside]).all()
    png = np.asarray(Image.open(res.paths["areas_png"]))
    assert Image.open(res.paths["areas_png"]).mode == "P" and np.array_equal(png, lab)
    ov = Image.open(res.paths["overlay_png"])
    h, w = 448, 1536
    k = max(1, T // 4)
    assert ov.size == (-(-w // k), -(-h // k))
    info = json.loads(res.paths["manifest"].read_text())
    assert info["ngff_version"] == "0.5" and info["grid_shape"] == list(lab.shape)
    assert not list(res.out_dir.glob(".*tmp*"))


def test_uncertain_label(tmp_path, section, model):
    """uncertain_below above every max probability -> all tissue cells are 'uncertain'; 0 -> none."""
    import zarr

    res = _run(tmp_path / "a", section, model, uncertain_below=1.01, tile_px=512)
    lab = zarr.open_group(str(res.paths["zarr"]), mode="r")["labels/areas/0"][...]
    inside = lab > 0
    assert (lab[inside] == maps.UNCERTAIN_U8).all()
    res = _run(tmp_path / "b", section, model, uncertain_below=0.0, tile_px=512)
    lab = zarr.open_group(str(res.paths["zarr"]), mode="r")["labels/areas/0"][...]
    assert not (lab == maps.UNCERTAIN_U8).any()


def test_tile_size_invariance(tmp_path, section, model, dense_naive):
    """(d) dense results identical (to float rounding) for two tile sizes; same labels."""
    import zarr

    other = _run(tmp_path, section, model, mode="dense", tile_px=160)
    a, b = _probs(dense_naive[0]), _probs(other)
    np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)
    la = zarr.open_group(str(dense_naive[0].paths["zarr"]), mode="r")["labels/areas/0"][...]
    lb = zarr.open_group(str(other.paths["zarr"]), mode="r")["labels/areas/0"][...]
    assert np.array_equal(la, lb)


def test_halo_zero_trades_tile_independence_for_speed(tmp_path, section, model, dense_naive):
    """halo_px=0: less trunk work; tile edges see zero padding like naive windows, so the maps stay within the
    dense-naive agreement of the full halo (argmax >= 99 % against both), and a wrong halo is refused."""
    full, naive = dense_naive
    cut = _run(tmp_path / "cut", section, model, mode="dense", tile_px=96, halo_px=0)
    same_tiles = _run(tmp_path / "full", section, model, mode="dense", tile_px=96)
    info, info_full = (json.loads(r.paths["manifest"].read_text()) for r in (cut, same_tiles))
    assert info["rf_margin_px"] == 0 and info_full["rf_margin_px"] > 0
    assert info["trunk_px"] < 0.8 * info_full["trunk_px"]
    pc, pf, pn = _probs(cut), _probs(full), _probs(naive)
    inside = ~np.isnan(pf[0])
    for other in (pf, pn):
        assert (pc.argmax(0) == other.argmax(0))[inside].mean() >= 0.99
        assert np.abs(pc - other)[:, inside].mean() < 0.05
    assert not np.allclose(pc[:, inside], pf[:, inside], atol=1e-4)  # tile edges did lose context
    with pytest.raises(infer.InferenceError, match="halo_px"):
        _run(tmp_path / "bad", section, model, mode="dense", halo_px=-1)


def test_snapping_when_stride_not_multiple(tmp_path, section, model):
    """T=8 < net stride 16: pooled boxes snap (±4 px) to feature cells; agreement >= 99 %, max |Δp| < 0.75."""
    d = _run(tmp_path / "d", section, model, mode="dense", output_um=8 * PX_UM, tile_px=512)
    pd_ = _probs(d)
    n = _run(tmp_path / "n", section, model, mode="naive", output_um=8 * PX_UM, tile_px=512)
    pn = _probs(n)
    inside = ~np.isnan(pn[0])
    assert (pd_.argmax(0) == pn.argmax(0))[inside].mean() >= 0.99
    diff = np.abs(pd_ - pn)[:, inside]
    print(f"T=8: agreement {(pd_.argmax(0) == pn.argmax(0))[inside].mean():.4f}, max |dp| {diff.max():.4f}, "
          f"mean {diff.mean():.5f}")
    assert diff.max() < 0.75 and diff.mean() < 0.05


def _write_inputs(tmp: Path, section, model) -> dict[str, Path]:
    from PIL import Image

    image, _, mask = section
    paths = {"image": tmp / "sec.png", "mask": tmp / "sec_mask.png", "areas": tmp / "areas.csv",
             "ckpt": tmp / "clf.pt"}
    Image.fromarray(image).save(paths["image"])
    Image.fromarray((mask * 255).astype(np.uint8)).save(paths["mask"])
    paths["areas"].write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in AREAS))
    torch.save(model, paths["ckpt"])
    return paths


def test_cli_end_to_end(tmp_path, section, model):
    """The CLI with files: image PNG + --pixel-size, mask PNG, a torch-saved DenseModel, areas CSV."""
    p = _write_inputs(tmp_path, section, model)
    parser = __import__("argparse").ArgumentParser()
    infer.configure_parser(parser)
    common = ["--image", str(p["image"]), "--mask", str(p["mask"]), "--areas", str(p["areas"]), "--pixel-size",
              str(PX_UM), "--output-um", str(T * PX_UM), "--tile-px", "512", "--threads", "1", "--no-progress"]
    # two models in one process (the workflow's infer job maps a section with every model of infer.models)
    args = parser.parse_args(common + ["--classifier", str(p["ckpt"]), "--out", str(tmp_path / "out"),
                                       "--classifier", str(p["ckpt"]), "--out", str(tmp_path / "out2")])
    assert infer.run(args) == 0
    for out in (tmp_path / "out", tmp_path / "out2"):
        for f in ("sec.ome.zarr", "sec_areas.png", "sec_entropy.tif", "sec_overlay.png", "sec_infer.json"):
            assert (out / f).exists(), f
    assert _probs_of(tmp_path / "out").tobytes() == _probs_of(tmp_path / "out2").tobytes()
    unpaired = parser.parse_args(common + ["--classifier", str(p["ckpt"]), "--classifier", str(p["ckpt"]),
                                           "--out", str(tmp_path / "out3")])
    assert infer.run(unpaired) == 2 and not (tmp_path / "out3").exists()


def _probs_of(out: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(str(out / "sec.ome.zarr"), mode="r")["0"][...]


def test_bad_inputs_name_the_file(tmp_path, section, model):
    """(e) missing mask, mask of another extent, classifier/areas mismatch: errors name the file."""
    from PIL import Image

    p = _write_inputs(tmp_path, section, model)
    image, _, mask = section
    kw = dict(pixel_size_um=PX_UM, output_um=T * PX_UM, progress=False)
    missing = tmp_path / "nope_mask.png"
    with pytest.raises(infer.InferenceError, match="nope_mask.png"):
        infer.infer_section(p["image"], missing, p["ckpt"], p["areas"], tmp_path / "o", **kw)
    wrong = tmp_path / "wrong_mask.png"
    Image.fromarray(np.zeros((100, 40), np.uint8)).save(wrong)
    with pytest.raises(infer.InferenceError, match="wrong_mask.png"):
        infer.infer_section(p["image"], wrong, p["ckpt"], p["areas"], tmp_path / "o", **kw)
    other_areas = tmp_path / "other_areas.csv"
    other_areas.write_text("area_id,name,color\n1,FA,#e6194b\n2,FB,#3cb44b\n4,FD,#000000\n")
    with pytest.raises(infer.InferenceError, match=r"clf\.pt.*other_areas\.csv"):
        infer.infer_section(p["image"], p["mask"], p["ckpt"], other_areas, tmp_path / "o", **kw)
    with pytest.raises(infer.InferenceError, match="missing.pt"):
        infer.infer_section(p["image"], p["mask"], tmp_path / "missing.pt", p["areas"], tmp_path / "o", **kw)
    assert not (tmp_path / "o" / "sec_infer.json").exists()


def test_finetune_checkpoint(tmp_path, section):
    """A finetune classifier.pt (format cytonet-classifier/1) loads as a DenseModel and matches its forward."""
    from cytonet.nn.checkpoints import Classifier
    from cytonet.nn.models import build_encoder, normalize_uint8

    torch.manual_seed(0)
    enc = build_encoder("small", 16)
    clf = Classifier(enc, len(AREAS)).eval()
    ck = {"format": "cytonet-classifier/1", "spec": enc.spec(), "encoder": enc.state_dict(),
          "head": clf.head.state_dict(), "area_ids": [a[0] for a in AREAS], "area_names": [a[1] for a in AREAS],
          "input_px": S, "patch_px": S, "pixel_size_um": PX_UM}
    path = tmp_path / "classifier.pt"
    torch.save(ck, path)
    dm = infer.load_classifier(path)
    assert dm.window_px == S and dm.pixel_size_um == PX_UM and dm.area_ids == [1, 2, 3]
    x = torch.randint(0, 256, (2, S, S), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(dm.classify(dm.preprocess(x)), clf(normalize_uint8(x)), atol=1e-5)
    del ck["pixel_size_um"]
    torch.save(ck, tmp_path / "nores.pt")
    with pytest.raises(infer.InferenceError, match="nores.pt"):
        infer.load_classifier(tmp_path / "nores.pt")
    assert infer.load_classifier(tmp_path / "nores.pt", pixel_size_um=4.0).pixel_size_um == 4.0


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_options_keep_the_dense_maps(tmp_path, section, model, dense_naive):
    """Prefetching changes nothing (bit for bit); tile batches (tiles zero-padded to a few shapes at their far
    edges, so padding never reaches a used feature) and NCHW vs NHWC change the maps by float rounding only."""
    base = dense_naive[0]
    serial = _run(tmp_path / "serial", section, model, mode="dense", tile_px=256,
                  pipeline=infer.PipelineOptions(prefetch=0))
    assert _probs(serial).tobytes() == _probs(base).tobytes()
    batched = _run(tmp_path / "batched", section, model, mode="dense", tile_px=256,
                   pipeline=infer.PipelineOptions(tile_batch=3))
    np.testing.assert_allclose(_probs(batched), _probs(base), atol=1e-6, equal_nan=True)
    info, info_base = (json.loads(r.paths["manifest"].read_text()) for r in (batched, base))
    assert info["tile_batch"] == 3 and info["trunk_px"] > info_base["trunk_px"]  # edge tiles were padded
    assert set(info["timings"]) == {"read_s", "compute_s", "write_s", "map_s"}
    assert info_base["channels_last"] is True  # auto: NHWC on the CPU
    nchw = _run(tmp_path / "nchw", section, model, mode="dense", tile_px=256,
                pipeline=infer.PipelineOptions(channels_last=False))
    assert json.loads(nchw.paths["manifest"].read_text())["channels_last"] is False
    np.testing.assert_allclose(_probs(nchw), _probs(base), atol=1e-5, equal_nan=True)
    again = _run(tmp_path / "again", section, model, mode="dense", tile_px=256)  # the trunk is NHWC again
    assert _probs(again).tobytes() == _probs(base).tobytes()
    with pytest.raises(infer.InferenceError, match="tile_batch"):
        _run(tmp_path / "bad", section, model, pipeline=infer.PipelineOptions(tile_batch=0))


def test_prefetcher_overlaps_and_raises_the_readers_error():
    """Reads run ahead in a thread (5 x 0.1 s reads beside 5 x 0.1 s of work take ~0.6 s, not 1 s); a read error
    reaches the consumer, with and without the thread; leaving early stops the reader."""
    import time

    from cytonet.mapping.pipeline import Prefetcher

    def slow(x: int) -> int:
        time.sleep(0.1)
        return x * 2

    t0 = time.perf_counter()
    got = []
    with Prefetcher(range(5), slow, depth=2) as items:
        for v in items:
            time.sleep(0.1)
            got.append(v)
    assert got == [0, 2, 4, 6, 8] and time.perf_counter() - t0 < 0.85 and items.busy_s >= 0.5

    def broken(x: int) -> int:
        if x == 2:
            raise ValueError("tile 2 unreadable")
        return x

    for depth in (0, 3):
        with pytest.raises(ValueError, match="tile 2"), Prefetcher(range(5), broken, depth) as items:
            list(items)
    with Prefetcher(range(100), slow, depth=2) as items:
        next(iter(items))
    assert not items._thread.is_alive() and items.busy_s < 1.0  # stopped after a few reads, not 100
