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
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cytonet.io.logs import format_duration
from cytonet.io.params import add_params_arguments, parse_params, with_defaults
from cytonet.nn.checkpoints import CLASSIFIER_FORMAT, Classifier, atomic_save, load_encoder
from cytonet.nn.data import DEFAULT_VAL_FRACTION, split_by_section
from cytonet.nn.models import autocast, build_encoder, prepare_model, to_input

log = logging.getLogger(__name__)

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
        bad = [f"{p} (brain {b})" for p, b in zip(stores.paths, stores.brains, strict=True) if b not in known_brains]
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


@dataclass
class _Split:
    """The labelled rows, their class indices and the section-held-out train/validation masks."""

    rows: pd.DataFrame
    labels: np.ndarray  # class index per row (position in area_ids)
    train_m: np.ndarray
    val_m: np.ndarray
    area_ids: list[int]
    area_names: list[str]

    @property
    def gidx(self) -> np.ndarray:
        """Global row index in the PatchStores of each labelled row."""
        return self.rows["gidx"].to_numpy()


@dataclass
class _Feed:
    """Where the batches come from: features of the frozen encoder computed once (``cached``), or DataLoaders."""

    cached: bool
    n_val: int
    sampler: Any = None
    train_loader: Any = None
    val_loader: Any = None
    tr_x: torch.Tensor | None = None
    tr_y: torch.Tensor | None = None
    va_x: torch.Tensor | None = None
    va_y: torch.Tensor | None = None

    def train_batches(self, gen: torch.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches."""
        if not self.cached:
            return iter(self.train_loader)
        idx = (torch.as_tensor(list(iter(self.sampler))) if self.sampler is not None
               else torch.randperm(len(self.tr_y), generator=gen))
        return ((self.tr_x[b], self.tr_y[b]) for b in idx.split(batch_size))


def finetune(stores: Sequence[str | Path], out_dir: str | Path, config: dict[str, Any] | None = None,
             encoder_checkpoint: str | Path | None = None, known_brains: set[str] | None = None,
             areas: tuple[list[int], list[str]] | None = None, device: str = "auto") -> dict[str, Any]:
    """Train a classifier on known brains' labelled patches; write classifier.pt and finetune_log.csv.

    Logs a line per validated epoch (every ``val_every`` epochs and the last; the others at debug level).
    """
    from cytonet.nn.data import PatchStores

    cfg, out, dev = _plan(config, out_dir, device)
    data = PatchStores(stores)
    split = _split(data, known_brains, areas, cfg, out)
    train_ds, val_ds, sampler, n_per_epoch = _datasets(data, split, cfg)
    encoder, model, opt, sched = _build_model(cfg, encoder_checkpoint, len(split.area_ids), n_per_epoch, dev)
    log.info("%s finetuning of %s on %d train / %d val patches (%d areas), %d epoch(s) of %d samples on %s",
             cfg["mode"], encoder_checkpoint or f"a random {cfg['encoder']} encoder", len(train_ds), len(val_ds),
             len(split.area_ids), cfg["epochs"], n_per_epoch, dev)
    feed = _make_feed(cfg, encoder, train_ds, val_ds, sampler, dev)
    history = _train(cfg, model, encoder, feed, opt, sched, out / "finetune_log.csv", dev)
    _write_classifier(out / "classifier.pt", model, encoder, split, data, cfg, encoder_checkpoint, history)
    return {"history": history, "n_train": int(split.train_m.sum()), "n_val": int(split.val_m.sum()),
            "area_ids": split.area_ids}


def _plan(config: dict[str, Any] | None, out_dir: str | Path, device: str) -> tuple[dict, Path, torch.device]:
    """Validated config, the output folder (created) and the device; sets torch's thread count."""
    cfg = validate_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg["threads"] or os.environ.get("CYTONET_THREADS") or os.cpu_count() or 1))
    use_cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    dev = torch.device("cuda" if use_cuda else "cpu")
    return cfg, out, dev


def _split(data: Any, known_brains: set[str] | None, areas: tuple[list[int], list[str]] | None,
           cfg: dict[str, Any], out: Path) -> _Split:
    """Labelled rows of known brains, their class indices and the section split; writes split.json."""
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
    (out / "split.json").write_text(json.dumps({
        "train_sections": sorted(set(rows["section"][train_m])), "val_sections": sorted(set(rows["section"][val_m])),
        "n_train": int(train_m.sum()), "n_val": int(val_m.sum())}, indent=2))
    return _Split(rows, labels, train_m, val_m, area_ids, area_names)


def _datasets(data: Any, split: _Split, cfg: dict[str, Any]) -> tuple[Any, Any, Any, int]:
    """Train and validation datasets, the (balanced) train sampler and the samples per epoch."""
    from cytonet.nn.data import LabelledPatchDataset

    gidx, train_m, val_m = split.gidx, split.train_m, split.val_m
    tr_labels = split.labels[train_m]
    n_per_epoch = int(cfg["samples_per_epoch"] or len(tr_labels))
    sampler = balanced_sampler(tr_labels, n_per_epoch, cfg["seed"]) if cfg["balanced"] else None
    train_ds = LabelledPatchDataset(data, gidx[train_m], tr_labels, cfg["augment"], cfg["seed"], cfg["input_px"])
    val_ds = LabelledPatchDataset(data, gidx[val_m], split.labels[val_m], False, cfg["seed"], cfg["input_px"])
    return train_ds, val_ds, sampler, n_per_epoch


def _build_model(cfg: dict[str, Any], encoder_checkpoint: str | Path | None, n_classes: int, n_per_epoch: int,
                 dev: torch.device) -> tuple[nn.Module, Classifier, torch.optim.Optimizer, Any]:
    """Seeded encoder + head, the optimiser (head only when linear) and the cosine schedule over all steps."""
    # Seed before the model is built: the head's initial weights come from the global RNG, also when the encoder
    # is loaded from a checkpoint (unseeded, two runs of the same job gave different classifiers).
    torch.manual_seed(cfg["seed"])
    encoder = prepare_model(_encoder(cfg, encoder_checkpoint), dev)
    model = prepare_model(Classifier(encoder, n_classes), dev)
    if cfg["mode"] == "linear":
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
    return encoder, model, opt, sched


def _make_feed(cfg: dict[str, Any], encoder: nn.Module, train_ds: Any, val_ds: Any, sampler: Any,
               dev: torch.device) -> _Feed:
    """Frozen encoder without augmentation: compute features once (E500 then costs almost nothing); else loaders."""
    from torch.utils.data import DataLoader

    mk = dict(num_workers=cfg["num_workers"], pin_memory=dev.type == "cuda",
              persistent_workers=cfg["num_workers"] > 0)
    feed = _Feed(cached=cfg["mode"] == "linear" and not cfg["augment"], n_val=len(val_ds), sampler=sampler)
    if feed.cached:
        t0 = time.perf_counter()
        bs, prec = cfg["batch_size"], cfg["precision"]
        feed.tr_x, feed.tr_y = _features(encoder, DataLoader(train_ds, batch_size=bs, **mk), dev, prec)
        feed.va_x, feed.va_y = (_features(encoder, DataLoader(val_ds, batch_size=bs, **mk), dev, prec)
                                if len(val_ds) else (None, None))
        log.info("frozen encoder: features of %d patches computed once in %s", len(train_ds) + len(val_ds),
                 format_duration(time.perf_counter() - t0))
    else:
        feed.train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler,
                                       shuffle=sampler is None, drop_last=False, **mk)
        feed.val_loader = DataLoader(val_ds, batch_size=cfg["batch_size"], **mk) if len(val_ds) else None
    return feed


def _evaluate(model: Classifier, feed: _Feed, dev: torch.device, precision: str) -> tuple[float, float]:
    """Validation loss and accuracy (NaN without validation sections)."""
    if not feed.n_val:
        return float("nan"), float("nan")
    model.eval()
    tot_loss, correct = 0.0, 0
    with torch.no_grad():
        if feed.cached:
            logits = model.head(feed.va_x.to(dev))
            return (float(F.cross_entropy(logits, feed.va_y.to(dev))),
                    float((logits.argmax(1).cpu() == feed.va_y).float().mean()))
        for x, y in feed.val_loader:
            with autocast(dev, precision):
                logits = model(to_input(x, dev)).float()
            y = y.to(dev)
            tot_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return tot_loss / feed.n_val, correct / feed.n_val


def _train_epoch(cfg: dict[str, Any], model: Classifier, encoder: nn.Module, feed: _Feed, opt: Any, sched: Any,
                 gen: torch.Generator, dev: torch.device) -> tuple[float, int, int]:
    """One epoch of training; returns (summed loss, correct, samples)."""
    model.train()
    if cfg["mode"] == "linear":
        encoder.eval()  # frozen: BatchNorm statistics stay those of pretraining
    tot, correct, n = 0.0, 0, 0
    for x, y in feed.train_batches(gen, cfg["batch_size"]):
        y = y.to(dev)
        if feed.cached:
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
    return tot, correct, n


def _train(cfg: dict[str, Any], model: Classifier, encoder: nn.Module, feed: _Feed, opt: Any, sched: Any,
           log_path: Path, dev: torch.device) -> list[dict[str, Any]]:
    """All epochs; a finetune_log.csv row per epoch (validation every val_every epochs and after the last)."""
    fields = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    history = []
    t0 = time.perf_counter()
    with open(log_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        gen = torch.Generator()
        gen.manual_seed(cfg["seed"])
        for epoch in range(1, cfg["epochs"] + 1):
            tot, correct, n = _train_epoch(cfg, model, encoder, feed, opt, sched, gen, dev)
            validate = epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]
            vl, va = _evaluate(model, feed, dev, cfg["precision"]) if validate else (None, None)
            row = {"epoch": epoch, "train_loss": round(tot / max(n, 1), 6), "train_acc": round(correct / max(n, 1), 4),
                   "val_loss": None if vl is None else round(vl, 6), "val_acc": None if va is None else round(va, 4),
                   "lr": f"{sched.get_last_lr()[-1]:.3e}"}
            writer.writerow(row)
            fh.flush()
            history.append(row)
            _log_epoch(row, cfg["epochs"], validate, time.perf_counter() - t0)
    return history


def _log_epoch(row: dict[str, Any], epochs: int, validated: bool, elapsed: float) -> None:
    """The progress line of an epoch: at INFO when it was validated, else at DEBUG."""
    val = f", val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}" if validated else ""
    eta = elapsed / row["epoch"] * (epochs - row["epoch"])
    log.log(logging.INFO if validated else logging.DEBUG, "epoch %d/%d: train loss %.4f acc %.3f%s, lr %s, "
            "elapsed %s, ETA %s", row["epoch"], epochs, row["train_loss"], row["train_acc"], val, row["lr"],
            format_duration(elapsed), format_duration(eta))


def _write_classifier(path: Path, model: Classifier, encoder: nn.Module, split: _Split, data: Any,
                      cfg: dict[str, Any], encoder_checkpoint: str | Path | None, history: list[dict]) -> None:
    """classifier.pt: encoder spec and weights, head, area list and the run's config and history (atomic)."""
    model = model.cpu()
    atomic_save({"format": CLASSIFIER_FORMAT, "spec": encoder.spec(), "encoder": model.encoder.state_dict(),
                 "head": model.head.state_dict(), "area_ids": split.area_ids, "area_names": split.area_names,
                 "input_px": cfg["input_px"] or data.patch_px, "patch_px": data.patch_px,
                 "pixel_size_um": data.pixel_size_um, "config": cfg,
                 "encoder_checkpoint": str(encoder_checkpoint) if encoder_checkpoint else None,
                 "history": history}, path)
    log.info("wrote %s", path)


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
        warnings.warn("no --brains/--known-brain given: assuming every --store is a known brain", stacklevel=2)
    areas = read_areas(args.areas) if args.areas else None
    res = finetune(args.store, args.out, cfg, args.encoder_checkpoint, known, areas, args.device)
    last = res["history"][-1]
    print(f"finetune: {res['n_train']} train / {res['n_val']} val patches; last epoch val_acc={last['val_acc']}")
    return 0
