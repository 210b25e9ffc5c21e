"""Finetuning: linear probe and full finetune, balanced sampling, section-held-out validation, predict()."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.learn.finetune import balanced_sampler, finetune, training_rows
from cytonet.nn.checkpoints import predict
from cytonet.nn.data import (
    PatchStores,  # noqa: E402
    split_by_section,  # noqa: E402
)
from learning_fixtures import make_store  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    return {"known": make_store(root, "k1", n_sections=5, grid=6, patch_px=32, labelled_sections=(0, 1, 2, 4)),
            "unknown": make_store(root, "u1", n_sections=2, grid=6, patch_px=32, seed=5)}


def test_linear_probe_and_predict(stores, tmp_path: Path) -> None:
    res = finetune([stores["known"]], tmp_path, {"mode": "linear", "epochs": 15, "num_workers": 0, "threads": 1,
                                                 "val_every": 4}, known_brains={"k1"})
    assert res["n_train"] + res["n_val"] == 4 * 36  # only labelled sections (section 3 has no labels)
    log = pd.read_csv(tmp_path / "finetune_log.csv")
    assert list(log.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"] and len(log) == 15
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    # validated every 4th epoch and after the last; the others leave the val columns empty
    assert list(log.dropna(subset=["val_acc"])["epoch"]) == [4, 8, 12, 15] and log["val_loss"].notna().sum() == 4
    patches = np.random.default_rng(0).integers(0, 255, (7, 32, 32), dtype=np.uint8)
    p = predict(tmp_path / "classifier.pt", patches)
    assert p.shape == (7, 3) and np.allclose(p.sum(1), 1, atol=1e-5) and (p >= 0).all()
    ck = torch.load(tmp_path / "classifier.pt", weights_only=False)
    assert ck["area_ids"] == [1, 2, 3] and ck["pixel_size_um"] == 2.0 and ck["patch_px"] == 32


def test_full_finetune_from_pretrained(stores, tmp_path: Path) -> None:
    from cytonet.learn.pretrain import pretrain

    pretrain([stores["known"], stores["unknown"]], tmp_path / "pt",  # pretraining may use unknown brains
             {"steps": 3, "batch_size": 8, "num_workers": 0, "radius_mm": 0.6}, progress=False)
    res = finetune([stores["known"]], tmp_path / "ft", {"mode": "full", "epochs": 2, "num_workers": 0, "threads": 1,
                                                       "batch_size": 16},
                   encoder_checkpoint=tmp_path / "pt" / "encoder.pt", known_brains={"k1"})
    assert len(res["history"]) == 2
    assert predict(tmp_path / "ft" / "classifier.pt", np.zeros((2, 32, 32), np.uint8)).shape == (2, 3)

    # Same seed, same encoder checkpoint: the same classifier (the head was once initialised unseeded).
    cfg = {"mode": "linear", "epochs": 1, "num_workers": 0, "threads": 1, "batch_size": 16, "samples_per_epoch": 32}
    heads = []
    for name in ("lin_a", "lin_b"):
        torch.manual_seed(len(name) + len(heads))  # a different global RNG state before each run
        finetune([stores["known"]], tmp_path / name, cfg, encoder_checkpoint=tmp_path / "pt" / "encoder.pt",
                 known_brains={"k1"})
        heads.append(torch.load(tmp_path / name / "classifier.pt", weights_only=False)["head"])
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_unknown_brain_refused(stores, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="u1"):
        finetune([stores["known"], stores["unknown"]], tmp_path, {"epochs": 1, "num_workers": 0},
                 known_brains={"k1"})


def test_validation_split_is_by_section(stores) -> None:
    rows = training_rows(PatchStores([stores["known"]]), {"k1"})
    tr, va = split_by_section(rows, 0.25, seed=0)
    assert va.any() and tr.any()
    assert not set(rows["section"][tr]) & set(rows["section"][va])
    assert (rows["labelled"] & (rows["area_id"] > 0)).all()


def test_balanced_sampler_balances_classes() -> None:
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    drawn = labels[list(balanced_sampler(labels, 3000, seed=0))]
    frac = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(frac, 1 / 3, atol=0.05)
