"""Model bundles: export from a trained run folder, reload without unpickling, refusals, atomic writes, and
`cytonet infer --model` giving the same maps as `--classifier` (cytonet.nn.bundle, cytonet.learn.export)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.cli import main as cytonet_main
from cytonet.io.atomic import file_sha256
from cytonet.learn.export import export_model
from cytonet.mapping import infer
from cytonet.nn import bundle as bundle_mod
from cytonet.nn.bundle import BundleError, bundle_checkpoint, load_bundle
from cytonet.nn.checkpoints import Classifier, predict
from cytonet.nn.models import PIXEL_MEAN, PIXEL_STD
from learning_fixtures import make_store

AREAS = [(1, "FA", "#e6194b"), (2, "FB", "#3cb44b"), (3, "FC", "#4363d8")]


def _write_areas(path: Path, rows=AREAS) -> Path:
    path.write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in rows))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A results folder as the workflow leaves it: two patch stores, a finetuned classifier, evaluation figures."""
    from cytonet.learn.finetune import finetune

    torch.set_num_threads(1)
    results = tmp_path_factory.mktemp("run") / "results"
    known = make_store(results / "patches", "k1", n_sections=4, grid=6, labelled_sections=(0, 1, 3))
    make_store(results / "patches", "u1", n_sections=2, grid=6, labelled_sections=(), seed=3)
    (results / "pretrain").mkdir(parents=True)
    (results / "pretrain" / "config.json").write_text(json.dumps({
        "config": {"steps": 6}, "world_size": 2, "stores": [str(results / "patches" / b) for b in ("k1", "u1")]}))
    finetune([known], results / "finetune" / "cytonet" / "seed0",
             {"mode": "linear", "epochs": 3, "num_workers": 0, "threads": 1, "batch_size": 16},
             known_brains={"k1"}, areas=([a[0] for a in AREAS], [a[1] for a in AREAS]))
    (results / "evaluation").mkdir()
    (results / "evaluation" / "summary.csv").write_text("model,split,macro_f1\nCytoNet,known,0.8\nCytoNet,unknown,\n")
    _write_areas(results.parent / "areas.csv")
    return results


@pytest.fixture(scope="module")
def bundle(run_dir) -> Path:
    return export_model(run_dir, run_dir.parent / "bundle", areas=run_dir.parent / "areas.csv")


def test_card_describes_the_model_and_its_data(bundle, run_dir):
    assert sorted(p.name for p in bundle.iterdir()) == ["model_card.json", "weights.safetensors"]
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["format"] == "cytonet-bundle/1" and card["model"] == "cytonet" and card["seed"] == 0
    assert card["areas"] == [{"area_id": i, "name": n, "color": c} for i, n, c in AREAS]
    assert (card["pixel_size_um"], card["patch_px"], card["input_px"], card["window_px"]) == (2.0, 32, 32, 32)
    assert card["normalisation"]["mean"] == PIXEL_MEAN and card["normalisation"]["std"] == PIXEL_STD
    assert card["encoder"]["encoder"] == "small"
    brains = {b["brain_id"]: b for b in card["training"]["brains"]}
    assert brains["k1"]["role"] == "known" and brains["u1"]["role"] == "unknown"
    assert brains["k1"]["patches"] == 4 * 36 and brains["k1"]["labelled_patches"] == 3 * 36
    assert brains["k1"]["annotated_sections"] == ["k1_s000", "k1_s001", "k1_s003"]
    assert brains["u1"]["annotated_sections"] == [] and brains["u1"]["finetune_sections"] == []
    split = json.loads((run_dir / "finetune/cytonet/seed0/split.json").read_text())
    assert brains["k1"]["finetune_sections"] == sorted(split["train_sections"] + split["val_sections"])
    assert card["training"]["finetune"]["epochs"] == 3 and card["training"]["finetune"]["config"]["mode"] == "linear"
    assert card["evaluation"] == [{"model": "CytoNet", "split": "known", "macro_f1": 0.8},
                                  {"model": "CytoNet", "split": "unknown", "macro_f1": None}]
    assert card["code"]["cytonet"] and "git" in card["code"]
    assert card["weights"]["file"] == "weights.safetensors" and len(card["weights"]["sha256"]) == 64


def test_bundle_predicts_exactly_as_the_classifier(bundle, run_dir):
    model, card = load_bundle(bundle, pixel_size_um=2.0, areas=run_dir.parent / "areas.csv")
    assert isinstance(model, Classifier) and not model.training
    patches = np.random.default_rng(1).integers(0, 256, (9, 32, 32), dtype=np.uint8)
    from_pt = predict(run_dir / "finetune/cytonet/seed0/classifier.pt", patches)
    from_bundle = predict(bundle_checkpoint(model, card), patches)
    assert from_pt.shape == (9, 3) and np.array_equal(from_pt, from_bundle)


def test_pixel_size_and_areas_mismatch_are_refused_by_name(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"bundle .*bundle was trained on patches at 2 µm/px, not the 16 µm/px"):
        load_bundle(bundle, pixel_size_um=16)
    other = _write_areas(tmp_path / "other_areas.csv", [(1, "FA", "#000000"), (2, "FB", "#111111"),
                                                        (4, "FD", "#222222")])
    with pytest.raises(BundleError, match=r"predicts the areas 1 FA, 2 FB, 3 FC but the areas table .*other_areas"
                                          r"\.csv has 1 FA, 2 FB, 4 FD \(only in the bundle: 3 FC; only in the "
                                          r"table: 4 FD\)"):
        load_bundle(bundle, areas=other)
    renamed = [(1, "FA", ""), (2, "FB", ""), (3, "hOc1", "")]
    with pytest.raises(BundleError, match=r"only in the bundle: 3 FC; only in the table: 3 hOc1"):
        load_bundle(bundle, areas=renamed)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(bundle, tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    shutil.copytree(bundle, fake)
    marker = tmp_path / "code_ran"
    (fake / "weights.safetensors").write_bytes(pickle.dumps({"encoder": _Payload(marker)}))
    card = json.loads((fake / "model_card.json").read_text())
    with pytest.raises(BundleError, match=r"weights\.safetensors does not match the sha256"):
        load_bundle(fake)
    # Even with a card that vouches for the pickle, the safetensors parser refuses it and nothing is unpickled.
    card["weights"]["sha256"] = file_sha256(fake / "weights.safetensors")
    (fake / "model_card.json").write_text(json.dumps(card))

    def no_unpickling(*a, **k):
        raise AssertionError("a bundle must never be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(BundleError, match=r"fake: weights\.safetensors is not a safetensors file .*never load pickles"):
        load_bundle(fake)
    assert not marker.exists()
    load_bundle(bundle)  # the real bundle loads with torch.load and pickle out of reach


def test_card_problems_name_the_file(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"model bundle .*nowhere does not exist"):
        load_bundle(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model_card.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"model card .*broken/model_card\.json: unreadable"):
        load_bundle(broken)
    (broken / "model_card.json").write_text(json.dumps({"format": "cytonet-bundle/9"}))
    with pytest.raises(BundleError, match=r"format 'cytonet-bundle/9' is not 'cytonet-bundle/1'"):
        load_bundle(broken)


def test_write_is_atomic_and_refuses_to_overwrite(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    old_mask = os.umask(0o022)
    try:
        export_model(run_dir, out)
    finally:
        os.umask(old_mask)
    for name in ("weights.safetensors", "model_card.json"):  # other lab members can read a bundle
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    first = (out / "model_card.json").read_text()
    assert cytonet_main(["export-model", str(run_dir), "-o", str(out)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (out / "model_card.json").read_text() == first

    def killed(tmp, model, card):  # a writer that dies after the weights
        (tmp / "weights.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "_write_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model(run_dir, out, force=True)
    with pytest.raises(KeyboardInterrupt):
        export_model(run_dir, tmp_path / "new")
    assert (out / "model_card.json").read_text() == first and load_bundle(out)  # the old bundle is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no half bundle, no temp folder left
    monkeypatch.undo()
    assert cytonet_main(["export-model", str(run_dir), "-o", str(out), "--force"]) == 0
    assert json.loads((out / "model_card.json").read_text())["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_export_names_what_is_missing(run_dir, tmp_path, capsys):
    assert cytonet_main(["export-model", str(run_dir), "-o", str(tmp_path / "x"), "--model", "ablation"]) == 2
    err = capsys.readouterr().err
    assert "finetune/ablation/seed0/classifier.pt" in err and "finetune/cytonet/seed0/classifier.pt" in err
    bad = _write_areas(tmp_path / "areas.csv", [(1, "FA", "#000000"), (2, "FB", "#111111")])
    assert cytonet_main(["export-model", str(run_dir), "-o", str(tmp_path / "x"), "--areas", str(bad)]) == 2
    assert "has no row for the classifier's area id(s) [3]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _section(tmp: Path) -> dict[str, Path]:
    """A 2 µm/px section PNG (stripes of the three training textures) and its tissue mask."""
    from PIL import Image

    from learning_fixtures import _patch

    rng = np.random.default_rng(0)
    tiles = [[_patch(rng, 32, 1 + (gx * 3) // 8, gx * 0.5, gy * 0.5) for gx in range(8)] for gy in range(5)]
    image = np.block(tiles)
    mask = np.zeros((image.shape[0] // 4, image.shape[1] // 4), np.uint8)
    mask[4:-4, 4:-4] = 255
    paths = {"image": tmp / "sec.png", "mask": tmp / "sec_mask.png"}
    Image.fromarray(image).save(paths["image"])
    Image.fromarray(mask).save(paths["mask"])
    return paths


def test_infer_with_a_bundle_equals_infer_with_the_classifier(bundle, run_dir, tmp_path, capsys):
    import zarr
    from PIL import Image

    sec = _section(tmp_path)
    common = ["infer", "--image", str(sec["image"]), "--mask", str(sec["mask"]), "--areas",
              str(run_dir.parent / "areas.csv"), "--pixel-size", "2", "--output-um", "16", "--tile-px", "128",
              "--threads", "1", "--no-progress"]
    clf = run_dir / "finetune/cytonet/seed0/classifier.pt"
    assert cytonet_main(common + ["--classifier", str(clf), "--out", str(tmp_path / "by_pt")]) == 0
    assert cytonet_main(common + ["--model", str(bundle), "--out", str(tmp_path / "by_bundle")]) == 0
    probs = [zarr.open_group(str(tmp_path / d / "sec.ome.zarr"), mode="r")["0"][...] for d in ("by_pt", "by_bundle")]
    assert probs[0].shape[0] == 3 and np.isfinite(probs[0]).any()
    assert probs[0].tobytes() == probs[1].tobytes()
    labels = [np.asarray(Image.open(tmp_path / d / "sec_areas.png")) for d in ("by_pt", "by_bundle")]
    assert np.array_equal(labels[0], labels[1])
    manifest = json.loads((tmp_path / "by_bundle" / "sec_infer.json").read_text())
    assert json.dumps(manifest).count(str(bundle)) >= 1
    capsys.readouterr()
    # --model wants a bundle folder; a bundle for other areas is refused, naming both
    assert cytonet_main(common + ["--model", str(clf), "--out", str(tmp_path / "x")]) == 2
    assert "not a model bundle folder" in capsys.readouterr().err
    other = _write_areas(tmp_path / "other.csv", [(1, "FA", "#000000"), (2, "FB", "#111111"), (3, "FX", "#222222")])
    args = [a if a != str(run_dir.parent / "areas.csv") else str(other) for a in common]
    assert cytonet_main(args + ["--model", str(bundle), "--out", str(tmp_path / "x")]) == 2
    assert "only in the table: 3 FX" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_infer_pairs_models_with_outputs(bundle, tmp_path, capsys):
    parser = __import__("argparse").ArgumentParser()
    infer.configure_parser(parser)
    with pytest.raises(SystemExit):  # --classifier and --model are alternatives
        parser.parse_args(["--image", "i", "--mask", "m", "--areas", "a", "--out", "o", "--classifier", "c",
                           "--model", str(bundle)])
    capsys.readouterr()
    args = parser.parse_args(["--image", "i", "--mask", "m", "--areas", "a", "--model", str(bundle),
                              "--model", str(bundle), "--out", "o"])
    assert infer.run(args) == 2 and "2 --model but 1 --out" in capsys.readouterr().err
