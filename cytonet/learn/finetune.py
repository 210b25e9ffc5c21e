"""Finetuning: area classification from a pretrained (or randomly initialised) encoder.

Modes: ``linear`` (frozen encoder, linear head; features computed once when augmentation is off) and ``full``
(encoder and head trained). Trains only on rows with ``labelled`` and ``area_id > 0`` of *known* brains' stores;
validation holds out whole sections. Outputs in ``--out``: ``classifier.pt`` (encoder spec + weights + head +
area list, written atomically; see ``cytonet.nn.checkpoints``), ``finetune_log.csv``, ``split.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cytonet.io.params import add_params_arguments, parse_params, with_defaults
from cytonet.nn.checkpoints import CLASSIFIER_FORMAT, Classifier, atomic_save, load_encoder
from cytonet.nn.data import DEFAULT_VAL_FRACTION, split_by_section
from cytonet.nn.models import autocast, build_encoder, prepare_model, to_input

DEFAULTS: dict[str, Any] = {
    "mode": "linear",          # linear (frozen encoder) | full
    "encoder": "small",        # used for random init; ignored when --encoder-checkpoint gives the spec
    "embedding_dim": 128,      # random init only
    "epochs": 30,              # poster: E30 / E500
    "batch_size": 64,
    "lr": None,                # None: 1e-2 (linear) / 1e-3 (full)
    "encoder_lr_ratio": None,  # full mode: encoder lr = lr * ratio; None: 0.1 from a checkpoint, 1.0 random init
    "weight_decay": 1e-4,
    "val_fraction": DEFAULT_VAL_FRACTION,  # fraction of labelled sections held out for validation
    "balanced": True,          # class-balanced sampling (WeightedRandomSampler)
    "samples_per_epoch": None, # None: number of training rows
    "val_every": 1,            # validate every N epochs and after the last; the scores are only logged
    "augment": None,           # None: False for linear, True for full
    "input_px": None,
    "num_workers": 2,
    "seed": 0,
    "precision": "auto",
    "threads": None,
}


def validate_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Merge with DEFAULTS; raise ValueError naming unknown keys or bad values."""
    out = with_defaults(DEFAULTS, cfg, "finetune")
    if out["mode"] not in ("linear", "full"):
        raise ValueError(f"config key 'mode': {out['mode']!r} is not 'linear' or 'full'")
    if int(out["val_every"]) < 1:
        raise ValueError(f"config key 'val_every': must be >= 1, got {out['val_every']}")
    if not 0 <= float(out["val_fraction"]) < 1:
        raise ValueError("config key 'val_fraction' must be in [0, 1)")
    if out["lr"] is None:
        out["lr"] = 1e-2 if out["mode"] == "linear" else 1e-3
    if out["augment"] is None:
        out["augment"] = out["mode"] == "full"
    return out


# ----------------------------------------------------------------------------------------------- data choice
def training_rows(stores: Any, known_brains: set[str] | None = None) -> pd.DataFrame:
    """Rows usable for training: labelled, area_id > 0, from known brains; unknown brains raise ValueError."""
    if known_brains is not None:
        bad = [f"{p} (brain {b})" for p, b in zip(stores.paths, stores.brains) if b not in known_brains]
        if bad:
            raise ValueError(f"stores of brains not marked 'known' cannot be used for training: {', '.join(bad)}")
    t = stores.table
    keep = t["labelled"].astype(bool) & (t["area_id"] > 0)
    if not keep.any():
        raise ValueError(f"no labelled rows (labelled and area_id > 0) in {', '.join(map(str, stores.paths))}")
    return t[keep].assign(gidx=np.flatnonzero(keep.to_numpy()))


def balanced_sampler(labels: np.ndarray, num_samples: int, seed: int) -> torch.utils.data.WeightedRandomSampler:
    """Sampler drawing each class equally often (weights 1/count)."""
    counts = np.bincount(labels)
    w = 1.0 / counts[labels]
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples,
                                                  replacement=True, generator=g)


def read_areas(path: str | Path) -> tuple[list[int], list[str]]:
    """area ids and names from an areas table (CSV/TSV with area_id, name)."""
    t = pd.read_csv(path, sep="\t" if str(path).endswith(".tsv") else ",")
    return [int(a) for a in t["area_id"]], [str(n) for n in t["name"]]


# ---------------------------------------------------------------------------------------------------- training
def _encoder(cfg: dict[str, Any], checkpoint: str | Path | None) -> nn.Module:
    if checkpoint:
        return load_encoder(checkpoint)
    torch.manual_seed(cfg["seed"])
    return build_encoder(cfg["encoder"], cfg["embedding_dim"])


@torch.no_grad()
def _features(encoder: nn.Module, loader, dev: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        with autocast(dev, precision):
            feats.append(encoder.features(to_input(x, dev)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def finetune(stores: Sequence[str | Path], out_dir: str | Path, config: dict[str, Any] | None = None,
             encoder_checkpoint: str | Path | None = None, known_brains: set[str] | None = None,
             areas: tuple[list[int], list[str]] | None = None, device: str = "auto") -> dict[str, Any]:
    """Train a classifier on known brains' labelled patches; write classifier.pt and finetune_log.csv."""
    from torch.utils.data import DataLoader

    from cytonet.nn.data import LabelledPatchDataset, PatchStores

    cfg = validate_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg["threads"] or os.environ.get("CYTONET_THREADS") or os.cpu_count() or 1))
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda") else "cpu")

    data = PatchStores(stores)
    rows = training_rows(data, known_brains)
    if areas is None:
        ids = sorted(int(a) for a in rows["area_id"].unique())
        areas = (ids, [str(a) for a in ids])
    area_ids, area_names = list(areas[0]), list(areas[1])
    lut = {a: i for i, a in enumerate(area_ids)}
    missing = sorted(set(rows["area_id"].astype(int)) - set(lut))
    if missing:
        raise ValueError(f"area ids {missing} occur in the stores but not in the areas table")
    labels = rows["area_id"].astype(int).map(lut).to_numpy()
    train_m, val_m = split_by_section(rows, cfg["val_fraction"], cfg["seed"])
    gidx = rows["gidx"].to_numpy()
    (out / "split.json").write_text(json.dumps({
        "train_sections": sorted(set(rows["section"][train_m])), "val_sections": sorted(set(rows["section"][val_m])),
        "n_train": int(train_m.sum()), "n_val": int(val_m.sum())}, indent=2))

    n_classes = len(area_ids)
    tr_labels = labels[train_m]
    n_per_epoch = int(cfg["samples_per_epoch"] or len(tr_labels))
    sampler = balanced_sampler(tr_labels, n_per_epoch, cfg["seed"]) if cfg["balanced"] else None
    mk = dict(num_workers=cfg["num_workers"], pin_memory=dev.type == "cuda",
              persistent_workers=cfg["num_workers"] > 0)
    train_ds = LabelledPatchDataset(data, gidx[train_m], tr_labels, cfg["augment"], cfg["seed"], cfg["input_px"])
    val_ds = LabelledPatchDataset(data, gidx[val_m], labels[val_m], False, cfg["seed"], cfg["input_px"])

    # Seed before the model is built: the head's initial weights come from the global RNG, also when the encoder
    # is loaded from a checkpoint (unseeded, two runs of the same job gave different classifiers).
    torch.manual_seed(cfg["seed"])
    encoder = prepare_model(_encoder(cfg, encoder_checkpoint), dev)
    model = prepare_model(Classifier(encoder, n_classes), dev)
    linear = cfg["mode"] == "linear"
    if linear:
        for p in encoder.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(model.head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        # A pretrained encoder gets a smaller lr so finetuning refines rather than overwrites its features.
        ratio = cfg["encoder_lr_ratio"] if cfg["encoder_lr_ratio"] is not None else (0.1 if encoder_checkpoint else 1.0)
        opt = torch.optim.AdamW([{"params": encoder.parameters(), "lr": cfg["lr"] * ratio},
                                 {"params": model.head.parameters(), "lr": cfg["lr"]}],
                                weight_decay=cfg["weight_decay"])
    steps_per_epoch = math.ceil(n_per_epoch / cfg["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg["epochs"] * steps_per_epoch))

    # Frozen encoder without augmentation: compute features once; E500 then costs almost nothing.
    cached = linear and not cfg["augment"]
    if cached:
        tr_x, tr_y = _features(encoder, DataLoader(train_ds, batch_size=cfg["batch_size"], **mk), dev, cfg["precision"])
        va_x, va_y = (_features(encoder, DataLoader(val_ds, batch_size=cfg["batch_size"], **mk), dev, cfg["precision"])
                      if len(val_ds) else (None, None))
    else:
        train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler, shuffle=sampler is None,
                                  drop_last=False, **mk)
        val_loader = DataLoader(val_ds, batch_size=cfg["batch_size"], **mk) if len(val_ds) else None

    def evaluate() -> tuple[float, float]:
        if not len(val_ds):
            return float("nan"), float("nan")
        model.eval()
        tot_loss, correct = 0.0, 0
        with torch.no_grad():
            if cached:
                logits = model.head(va_x.to(dev))
                return float(F.cross_entropy(logits, va_y.to(dev))), float((logits.argmax(1).cpu() == va_y).float().mean())
            for x, y in val_loader:
                with autocast(dev, cfg["precision"]):
                    logits = model(to_input(x, dev)).float()
                y = y.to(dev)
                tot_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        return tot_loss / len(val_ds), correct / len(val_ds)

    log_path = out / "finetune_log.csv"
    fields = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    history = []
    with open(log_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        gen = torch.Generator()
        gen.manual_seed(cfg["seed"])
        for epoch in range(1, cfg["epochs"] + 1):
            model.train()
            if linear:
                encoder.eval()  # frozen: BatchNorm statistics stay those of pretraining
            tot, correct, n = 0.0, 0, 0
            if cached:
                idx = (torch.as_tensor(list(iter(sampler))) if sampler is not None
                       else torch.randperm(len(tr_y), generator=gen))
                batches = ((tr_x[b], tr_y[b]) for b in idx.split(cfg["batch_size"]))
            else:
                batches = iter(train_loader)
            for x, y in batches:
                y = y.to(dev)
                if cached:
                    logits = model.head(x.to(dev))
                else:
                    with autocast(dev, cfg["precision"]):
                        logits = model(to_input(x, dev)).float()
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                n += len(y)
            validate = epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]
            vl, va = evaluate() if validate else (None, None)
            row = {"epoch": epoch, "train_loss": round(tot / max(n, 1), 6), "train_acc": round(correct / max(n, 1), 4),
                   "val_loss": None if vl is None else round(vl, 6), "val_acc": None if va is None else round(va, 4),
                   "lr": f"{sched.get_last_lr()[-1]:.3e}"}
            writer.writerow(row)
            fh.flush()
            history.append(row)

    model = model.cpu()
    atomic_save({"format": CLASSIFIER_FORMAT, "spec": encoder.spec(), "encoder": model.encoder.state_dict(),
                  "head": model.head.state_dict(), "area_ids": area_ids, "area_names": area_names,
                  "input_px": cfg["input_px"] or data.patch_px, "patch_px": data.patch_px,
                  "pixel_size_um": data.pixel_size_um, "config": cfg,
                  "encoder_checkpoint": str(encoder_checkpoint) if encoder_checkpoint else None,
                  "history": history}, out / "classifier.pt")
    return {"history": history, "n_train": int(train_m.sum()), "n_val": int(val_m.sum()), "area_ids": area_ids}


# ------------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet finetune``."""
    parser.add_argument("--store", action="append", required=True, help="patch store of a KNOWN brain (repeat)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--encoder-checkpoint", help="encoder.pt from pretraining (default: random init)")
    parser.add_argument("--areas", help="areas table (area_id, name) fixing the class list and order")
    parser.add_argument("--brains", help="brains table (brain_id, role): refuse stores of brains not 'known'")
    parser.add_argument("--known-brain", action="append", default=[], help="brain id allowed for training (repeat)")
    add_params_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet finetune``."""

    cfg = parse_params(args.params, args.param)
    if args.threads:
        cfg["threads"] = args.threads
    known: set[str] | None = set(args.known_brain) or None
    if args.brains:
        t = pd.read_csv(args.brains, sep="\t" if args.brains.endswith(".tsv") else ",")
        known = (known or set()) | set(t.loc[t["role"] == "known", "brain_id"].astype(str))
    if known is None:
        warnings.warn("no --brains/--known-brain given: assuming every --store is a known brain")
    areas = read_areas(args.areas) if args.areas else None
    res = finetune(args.store, args.out, cfg, args.encoder_checkpoint, known, areas, args.device)
    last = res["history"][-1]
    print(f"finetune: {res['n_train']} train / {res['n_val']} val patches; last epoch val_acc={last['val_acc']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cytonet.learn.finetune ...`` (the same as the ``cytonet`` sub-command)."""
    from cytonet.cli import stage_main

    return stage_main("cytonet.learn.finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
