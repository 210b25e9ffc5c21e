"""Finetuning: area classification from a pretrained (or randomly initialised) encoder.

Modes: ``linear`` (frozen encoder, linear head; features computed once when augmentation is off) and ``full``
(encoder and head trained). Trains only on rows with ``labelled`` and ``area_id > 0`` of *known* brains' stores;
validation holds out whole sections. Outputs in ``--out``: ``classifier.pt`` (encoder spec + weights + head +
area list, written atomically; see ``cytonet.nn.checkpoints``), ``finetune_log.csv``, ``split.json``.

Runs on every rank of the job (DDP), launched like pretraining: ``cytonet finetune --nproc N`` spawns local
ranks; under ``srun`` or ``torchrun`` each task is a rank. ``batch_size`` is the global batch: each global batch
of the epoch's draws is split over the ranks, gradients are all-reduced, BatchNorm is synchronised, and
augmentation is keyed by the draw, so N ranks train the classifier one process would (up to float rounding).
Validation is shared out and all-reduced; rank 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
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
from cytonet.nn import distributed as cdist
from cytonet.nn.checkpoints import CLASSIFIER_FORMAT, Classifier, atomic_save, load_encoder
from cytonet.nn.data import DEFAULT_VAL_FRACTION, LabelledPatchDataset, split_by_section
from cytonet.nn.models import autocast, build_encoder, prepare_model, to_input

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "mode": "linear",          # linear (frozen encoder) | full
    "encoder": "small",        # used for random init; ignored when --encoder-checkpoint gives the spec
    "embedding_dim": 128,      # random init only
    "epochs": 30,              # poster: E30 / E500
    "batch_size": 64,          # global: split over the ranks
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
    "sync_batchnorm": "auto",  # BatchNorm statistics over all ranks' samples; auto: when world size > 1
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
    for key in ("epochs", "batch_size"):
        if int(out[key]) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {out[key]!r}")
    cdist.use_sync_batchnorm(out["sync_batchnorm"], 1)  # raises for anything but auto/true/false
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


class EpochDraws(torch.utils.data.Sampler):
    """The training rows of every epoch, split over the ranks one global batch at a time (a batch sampler).

    Epoch e draws ``n`` rows (class-balanced with replacement, else seeded permutations), a pure function of
    (seed, e), so every rank draws the same. Global batch k holds the draws [k*B, (k+1)*B); rank r takes its
    contiguous share. Items are (row, draw key = e*n + position): augmentation keyed by the draw looks the same
    whatever the number of ranks or loader workers. A last batch with fewer draws than ranks is dropped.
    """

    def __init__(self, labels: np.ndarray, n: int, batch_size: int, balanced: bool, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        self.labels, self.n, self.batch_size, self.balanced = np.asarray(labels), int(n), int(batch_size), balanced
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        sizes = [min(self.batch_size, self.n - k) for k in range(0, self.n, self.batch_size)]
        self.global_sizes = [m for m in sizes if m >= world]  # draws per global batch, the same on every rank

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws."""
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """The rows drawn in ``epoch``, in draw order (the same on every rank)."""
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0] % (2**63 - 1))
        if self.balanced:
            return np.fromiter(balanced_sampler(self.labels, self.n, seed), dtype=np.int64, count=self.n)
        g = torch.Generator().manual_seed(seed)
        reps = -(-self.n // len(self.labels))
        return torch.cat([torch.randperm(len(self.labels), generator=g) for _ in range(reps)])[:self.n].numpy()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rows, base = self.order(self.epoch), self.epoch * self.n
        for k, size in enumerate(self.global_sizes):
            share = cdist.rank_slice(size, self.rank, self.world)
            positions = range(k * self.batch_size + share.start, k * self.batch_size + share.stop)
            yield [(int(rows[p]), base + p) for p in positions]

    def __len__(self) -> int:
        return len(self.global_sizes)


def read_areas(path: str | Path) -> tuple[list[int], list[str]]:
    """area ids and names from an areas table (CSV/TSV with area_id, name)."""
    t = pd.read_csv(path, sep="\t" if str(path).endswith(".tsv") else ",")
    return [int(a) for a in t["area_id"]], [str(n) for n in t["name"]]


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class _Job:
    """Where this finetune runs: the validated config, the output folder, this rank and its device."""

    cfg: dict[str, Any]
    out: Path
    env: cdist.DistEnv
    dev: torch.device
    sync_bn: bool = False  # BatchNorm synchronised over the ranks (config key sync_batchnorm)

    def info(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """Log on rank 0 only (every rank computes the same figures)."""
        if self.env.is_main:
            log.log(level, msg, *args)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks (x on this rank's device: NCCL reduces GPU tensors only)."""
        if self.env.distributed:
            torch.distributed.all_reduce(x)
        return x


def _encoder(cfg: dict[str, Any], checkpoint: str | Path | None) -> nn.Module:
    if checkpoint:
        return load_encoder(checkpoint)
    torch.manual_seed(cfg["seed"])
    return build_encoder(cfg["encoder"], cfg["embedding_dim"])


@torch.no_grad()
def _features(encoder: nn.Module, loader, dev: torch.device, precision: str) -> torch.Tensor:
    encoder.eval()
    feats = [torch.empty(0, encoder.feature_dim)]  # a rank may hold no rows
    for x, _ in loader:
        with autocast(dev, precision):
            feats.append(encoder.features(to_input(x, dev)).float().cpu())
    return torch.cat(feats)


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
    draws: EpochDraws
    train_loader: Any = None
    val_loader: Any = None  # this rank's share of the validation rows
    tr_x: torch.Tensor | None = None
    tr_y: torch.Tensor | None = None
    va_x: torch.Tensor | None = None
    va_y: torch.Tensor | None = None

    def train_batches(self, epoch: int) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], int]]:
        """This rank's share of each global batch of the epoch, with the global batch's size."""
        self.draws.set_epoch(epoch)
        if self.cached:
            shares = ((self.tr_x[rows], self.tr_y[rows])
                      for rows in (torch.as_tensor([r for r, _ in b], dtype=torch.long) for b in self.draws))
        else:
            shares = iter(self.train_loader)
        return zip(shares, self.draws.global_sizes, strict=True)


def finetune(stores: Sequence[str | Path], out_dir: str | Path, config: dict[str, Any] | None = None,
             encoder_checkpoint: str | Path | None = None, known_brains: set[str] | None = None,
             areas: tuple[list[int], list[str]] | None = None, device: str = "auto",
             return_model: bool = False) -> dict[str, Any]:
    """Train a classifier on known brains' labelled patches; rank 0 writes classifier.pt and finetune_log.csv.

    Logs a line per validated epoch (every ``val_every`` epochs and the last; the others at debug level).
    """
    from cytonet.nn.data import PatchStores

    job = _plan(config, out_dir, device)
    cfg = job.cfg
    data = PatchStores(stores)
    split = _split(data, known_brains, areas, job)
    train_ds, val_ds, draws = _datasets(data, split, job)
    encoder, model, opt, sched = _build_model(job, encoder_checkpoint, len(split.area_ids), len(draws))
    job.info("%s finetuning of %s on %d train / %d val patches (%d areas), %d epoch(s) of %d samples on %d rank(s) "
             "(%s), SyncBatchNorm %s", cfg["mode"], encoder_checkpoint or f"a random {cfg['encoder']} encoder",
             len(train_ds), len(val_ds), len(split.area_ids), cfg["epochs"], sum(draws.global_sizes),
             job.env.world_size, job.dev, "on" if job.sync_bn else "off")
    feed = _make_feed(job, encoder, train_ds, val_ds, draws)
    history = _train(job, model, encoder, feed, opt, sched)
    if job.env.is_main:
        _write_classifier(job.out / "classifier.pt", model, encoder, split, data, cfg, encoder_checkpoint, history)
    if job.env.distributed:
        torch.distributed.barrier()  # nobody leaves before rank 0 has written classifier.pt
    result = {"history": history, "n_train": int(split.train_m.sum()), "n_val": int(split.val_m.sum()),
              "area_ids": split.area_ids, "rank": job.env.rank, "world_size": job.env.world_size,
              "sync_batchnorm": job.sync_bn}
    if return_model:
        result["model"] = model
    return result


def _plan(config: dict[str, Any] | None, out_dir: str | Path, device: str) -> _Job:
    """Validated config, the process group and this rank's device, the output folder (rank 0 creates it); sets
    torch's thread count."""
    cfg = validate_config(config)
    env, dev = cdist.init_distributed(device)
    torch.set_num_threads(cdist.threads_per_rank(cfg["threads"], cdist.local_world_size(default=env.world_size)))
    out = Path(out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return _Job(cfg, out, env, dev, sync_bn=cdist.use_sync_batchnorm(cfg["sync_batchnorm"], env.world_size))


def _split(data: Any, known_brains: set[str] | None, areas: tuple[list[int], list[str]] | None, job: _Job) -> _Split:
    """Labelled rows of known brains, their class indices and the section split; rank 0 writes split.json."""
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
    train_m, val_m = split_by_section(rows, job.cfg["val_fraction"], job.cfg["seed"])
    if job.env.is_main:
        (job.out / "split.json").write_text(json.dumps({
            "train_sections": sorted(set(rows["section"][train_m])),
            "val_sections": sorted(set(rows["section"][val_m])),
            "n_train": int(train_m.sum()), "n_val": int(val_m.sum())}, indent=2))
    return _Split(rows, labels, train_m, val_m, area_ids, area_names)


def _datasets(data: Any, split: _Split, job: _Job) -> tuple[LabelledPatchDataset, LabelledPatchDataset, EpochDraws]:
    """Train and validation datasets and the epochs' draws (samples_per_epoch, class-balanced by default)."""
    cfg, env = job.cfg, job.env
    gidx, train_m, val_m = split.gidx, split.train_m, split.val_m
    tr_labels = split.labels[train_m]
    n_per_epoch = int(cfg["samples_per_epoch"] or len(tr_labels))
    draws = EpochDraws(tr_labels, n_per_epoch, cfg["batch_size"], cfg["balanced"], cfg["seed"], env.rank,
                       env.world_size)
    train_ds = LabelledPatchDataset(data, gidx[train_m], tr_labels, cfg["augment"], cfg["seed"], cfg["input_px"])
    val_ds = LabelledPatchDataset(data, gidx[val_m], split.labels[val_m], False, cfg["seed"], cfg["input_px"])
    return train_ds, val_ds, draws


def _build_model(job: _Job, encoder_checkpoint: str | Path | None, n_classes: int,
                 steps_per_epoch: int) -> tuple[nn.Module, Classifier, torch.optim.Optimizer, Any]:
    """Seeded encoder + head (SyncBatchNorm when on), the optimiser (head only when linear) and the cosine
    schedule over all steps."""
    cfg, dev = job.cfg, job.dev
    # Seed before the model is built: the head's initial weights come from the global RNG, also when the encoder
    # is loaded from a checkpoint (unseeded, two runs of the same job gave different classifiers).
    torch.manual_seed(cfg["seed"])
    encoder = prepare_model(_encoder(cfg, encoder_checkpoint), dev)
    model = prepare_model(Classifier(encoder, n_classes), dev)
    if job.sync_bn:  # converts in place (same parameters, same state_dict keys)
        model = cdist.convert_sync_batchnorm(model, dev)
    # The classifier uses features(): the projection head gets no gradient (and DDP needs every trained
    # parameter used in the forward pass).
    frozen = encoder.parameters() if cfg["mode"] == "linear" else encoder.head.parameters()
    for p in frozen:
        p.requires_grad_(False)
    if cfg["mode"] == "linear":
        opt = torch.optim.AdamW(model.head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        # A pretrained encoder gets a smaller lr so finetuning refines rather than overwrites its features.
        ratio = cfg["encoder_lr_ratio"] if cfg["encoder_lr_ratio"] is not None else (0.1 if encoder_checkpoint else 1.0)
        opt = torch.optim.AdamW([{"params": [p for p in encoder.parameters() if p.requires_grad],
                                  "lr": cfg["lr"] * ratio},
                                 {"params": model.head.parameters(), "lr": cfg["lr"]}],
                                weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg["epochs"] * steps_per_epoch))
    return encoder, model, opt, sched


def _make_feed(job: _Job, encoder: nn.Module, train_ds: Any, val_ds: Any, draws: EpochDraws) -> _Feed:
    """Frozen encoder without augmentation: compute features once (E500 then costs almost nothing), each rank a
    share, gathered on all; else loaders (the validation loader over this rank's share)."""
    from torch.utils.data import DataLoader, Subset

    cfg, dev, env = job.cfg, job.dev, job.env
    mk = dict(num_workers=cfg["num_workers"], pin_memory=dev.type == "cuda",
              persistent_workers=cfg["num_workers"] > 0)
    feed = _Feed(cached=cfg["mode"] == "linear" and not cfg["augment"], n_val=len(val_ds), draws=draws)

    def share(ds: Any) -> Subset:
        part = cdist.rank_slice(len(ds), env.rank, env.world_size)
        return Subset(ds, range(part.start, part.stop))

    if feed.cached:
        t0 = time.perf_counter()
        bs, prec = cfg["batch_size"], cfg["precision"]

        def features(ds: Any) -> torch.Tensor:
            counts = cdist.rank_counts(len(ds), env.world_size)
            local = _features(encoder, DataLoader(share(ds), batch_size=bs, **mk), dev, prec)
            return cdist.all_gather_rows(local.to(dev), counts).cpu()

        feed.tr_x, feed.tr_y = features(train_ds), torch.as_tensor(train_ds.labels, dtype=torch.long)
        if len(val_ds):
            feed.va_x, feed.va_y = features(val_ds), torch.as_tensor(val_ds.labels, dtype=torch.long)
        job.info("frozen encoder: features of %d patches computed once in %s", len(train_ds) + len(val_ds),
                 format_duration(time.perf_counter() - t0))
    else:
        feed.train_loader = DataLoader(train_ds, batch_sampler=draws, **mk)
        feed.val_loader = DataLoader(share(val_ds), batch_size=cfg["batch_size"], **mk) if len(val_ds) else None
    return feed


def _evaluate(job: _Job, model: Classifier, feed: _Feed) -> tuple[float, float]:
    """Validation loss and accuracy over all validation rows (NaN without validation sections)."""
    if not feed.n_val:
        return float("nan"), float("nan")
    dev = job.dev
    model.eval()
    with torch.no_grad():
        if feed.cached:  # every rank holds all features; the head over them costs nothing
            logits = model.head(feed.va_x.to(dev))
            return (float(F.cross_entropy(logits, feed.va_y.to(dev))),
                    float((logits.argmax(1).cpu() == feed.va_y).float().mean()))
        sums = torch.zeros(2, dtype=torch.float64, device=dev)  # summed loss, correct
        for x, y in feed.val_loader:
            with autocast(dev, job.cfg["precision"]):
                logits = model(to_input(x, dev)).float()
            y = y.to(dev)
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double()])
    loss, correct = job.all_sum(sums).tolist()
    return loss / feed.n_val, correct / feed.n_val


def _train_epoch(job: _Job, trained: nn.Module, model: Classifier, feed: _Feed, opt: Any, sched: Any,
                 epoch: int) -> tuple[float, int, int]:
    """One epoch of training; returns (summed loss, correct, samples) over all ranks."""
    cfg, dev, world = job.cfg, job.dev, job.env.world_size
    model.train()
    if cfg["mode"] == "linear":
        model.encoder.eval()  # frozen: BatchNorm statistics stay those of pretraining
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # summed loss, correct, samples (on the device: no sync)
    for (x, y), global_n in feed.train_batches(epoch):
        y = y.to(dev)
        if feed.cached:
            logits = trained(x.to(dev))
        else:
            with autocast(dev, cfg["precision"]):
                logits = trained(to_input(x, dev)).float()
        ce = F.cross_entropy(logits, y, reduction="sum")
        # DDP averages gradients over the ranks: world/global_n makes that the global batch's mean-loss gradient.
        loss = ce * (world / global_n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums += torch.stack([ce.detach().double(), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
    tot, correct, n = job.all_sum(sums).tolist()
    return tot, int(correct), int(n)


def _ddp(job: _Job, module: nn.Module) -> nn.Module:
    """module wrapped for DDP when more than one rank trains (gradients all-reduced in backward)."""
    if not job.env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[job.dev.index] if job.dev.type == "cuda" else None)


def _train(job: _Job, model: Classifier, encoder: nn.Module, feed: _Feed, opt: Any, sched: Any) -> list[dict]:
    """All epochs; rank 0 writes a finetune_log.csv row per epoch (validation every val_every epochs and last)."""
    cfg = job.cfg
    fields = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    trained = _ddp(job, model.head if feed.cached else model)
    history = []
    t0 = time.perf_counter()
    log_file = open(job.out / "finetune_log.csv", "w", newline="") if job.env.is_main else contextlib.nullcontext()
    with log_file as fh:
        writer = csv.DictWriter(fh, fieldnames=fields) if fh is not None else None
        if writer is not None:
            writer.writeheader()
        for epoch in range(1, cfg["epochs"] + 1):
            tot, correct, n = _train_epoch(job, trained, model, feed, opt, sched, epoch - 1)
            validate = epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]
            vl, va = _evaluate(job, model, feed) if validate else (None, None)
            row = {"epoch": epoch, "train_loss": round(tot / max(n, 1), 6), "train_acc": round(correct / max(n, 1), 4),
                   "val_loss": None if vl is None else round(vl, 6), "val_acc": None if va is None else round(va, 4),
                   "lr": f"{sched.get_last_lr()[-1]:.3e}"}
            if writer is not None:
                writer.writerow(row)
                fh.flush()
            history.append(row)
            if job.env.is_main:
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
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch threads per rank (overrides config key 'threads')")
    parser.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (without torchrun/srun)")


def _finetune_and_report(*args: Any) -> None:
    """finetune(*args) on one rank; rank 0 prints the one-line result."""
    res = finetune(*args)
    if res["rank"] == 0:
        last = res["history"][-1]
        print(f"finetune: {res['n_train']} train / {res['n_val']} val patches on {res['world_size']} rank(s); "
              f"last epoch val_acc={last['val_acc']}")


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet finetune``."""
    cfg = parse_params(args.params, args.param)
    if args.threads:
        cfg["threads"] = args.threads
    validate_config(cfg)  # fail before any process is spawned
    known: set[str] | None = set(args.known_brain) or None
    if args.brains:
        t = pd.read_csv(args.brains, sep="\t" if args.brains.endswith(".tsv") else ",")
        known = (known or set()) | set(t.loc[t["role"] == "known", "brain_id"].astype(str))
    if known is None:
        warnings.warn("no --brains/--known-brain given: assuming every --store is a known brain", stacklevel=2)
    areas = read_areas(args.areas) if args.areas else None
    verbosity = getattr(args, "log_verbose", 0) - getattr(args, "log_quiet", 0)
    cdist.run_ranks(args.nproc, _finetune_and_report, (list(args.store), args.out, cfg, args.encoder_checkpoint,
                                                       known, areas, args.device), verbosity)
    return 0
