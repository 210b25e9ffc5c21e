"""SpatialNCE self-supervised pretraining: contrastive learning where patches close in 3D are positives.

Runs single-process, under ``torchrun --standalone --nproc-per-node N -m cytonet.learn.pretrain ...``, under ``srun``
(rank from SLURM_PROCID etc., see cytonet/nn/distributed.py), or ``cytonet pretrain --nproc N`` (local spawn).
Negatives are gathered from all ranks; keys closer than ``radius_mm`` to the query are not negatives. BatchNorm
is synchronised over the ranks (config key ``sync_batchnorm``, on by default whenever there is more than one).
Rank 0 writes atomic checkpoints; a restarted run resumes from the newest one in its output folder.

Outputs in ``--out``: ``encoder.pt`` (weights + spec, written last), ``metrics.csv``, ``summary.json``,
``config.json``, ``checkpoints/step_XXXXXXXX.pt``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cytonet.io.logs import format_duration
from cytonet.io.params import add_params_arguments, parse_params, with_defaults
from cytonet.nn import distributed as cdist
from cytonet.nn.checkpoints import ENCODER_FORMAT, atomic_save, list_checkpoints, load_latest_checkpoint
from cytonet.nn.models import autocast, build_encoder, prepare_model, to_input

log = logging.getLogger(__name__)

# Defaults (documented in the report / docs): every key here may be set with --param key=value or a YAML/JSON file.
DEFAULTS: dict[str, Any] = {
    "encoder": "small",        # small | resnet50 | resnet101
    "embedding_dim": 128,      # projection-head output size
    "proj_hidden": None,       # projection-head hidden size (None: the backbone's feature size)
    "samples": 200_000,        # total anchor draws over the run (poster: 200k / 1M / 10M)
    "epochs": 1,               # the draws are split into this many epochs (each a fresh seeded permutation)
    "steps": None,             # if set, total optimizer steps (overrides samples)
    "batch_size": 64,          # anchors per rank per step (each gives 2 views)
    "lr": 1e-3,                # AdamW peak learning rate
    "warmup_steps": None,      # linear warmup; None: 5 % of the steps (at most 2000)
    "min_lr_ratio": 0.0,       # cosine decays to lr * min_lr_ratio
    "weight_decay": 1e-4,
    "temperature": 0.1,
    "radius_mm": 1.0,          # partner radius, and keys nearer than this are not negatives
    "loss": "hard",            # hard: mask keys < radius_mm | weighted: negative weight 1-exp(-d²/2σ²)
    "sigma_mm": None,          # σ of the weighted variant (None: radius_mm)
    "within_brain": True,      # partners come from the anchor's own brain
    "positives": "other_section",  # other_section: partners never share the anchor's section (no pixel overlap)
                                   # | ball: any patch within radius_mm (the anchor's section included)
    "input_px": None,          # network input size (None: the store's patch size)
    "augment_on": "loader",    # loader: augment in DataLoader workers | device: ship uint8, augment on the
                               # training device (for 2048 px patches on GPU, where CPU workers cannot keep up)
    "num_workers": 2,          # DataLoader workers per rank
    "checkpoint_every": 500,   # steps between checkpoints (rank 0)
    "keep_checkpoints": 2,
    "seed": 0,
    "precision": "auto",       # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    "sync_batchnorm": "auto",  # BatchNorm statistics over all ranks' samples; auto: when world size > 1
    "threads": None,           # torch intra-op threads (None: CPU count / local ranks)
    "log_every": 1,            # steps between metrics rows
    "tensorboard": False,      # also log to TensorBoard when installed
}
LOSSES = ("hard", "weighted")


def validate_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Merge with DEFAULTS; raise ValueError naming any unknown key or bad value."""
    out = with_defaults(DEFAULTS, cfg, "pretrain")
    from cytonet.nn.data import POSITIVES
    from cytonet.nn.models import ENCODERS

    if out["encoder"] not in ENCODERS:
        raise ValueError(f"config key 'encoder': {out['encoder']!r} is not one of {ENCODERS}")
    if out["precision"] not in ("auto", "bf16", "fp32"):
        raise ValueError(f"config key 'precision': {out['precision']!r} is not auto, bf16 or fp32")
    if out["augment_on"] not in ("loader", "device"):
        raise ValueError(f"config key 'augment_on': {out['augment_on']!r} is not 'loader' or 'device'")
    if out["loss"] not in LOSSES:
        raise ValueError(f"config key 'loss': {out['loss']!r} is not one of {LOSSES}")
    if out["positives"] not in POSITIVES:
        raise ValueError(f"config key 'positives': {out['positives']!r} is not one of {POSITIVES}")
    cdist.use_sync_batchnorm(out["sync_batchnorm"], 1)  # raises for anything but auto/true/false
    for key in ("samples", "epochs", "batch_size", "checkpoint_every", "embedding_dim", "log_every"):
        if int(out[key]) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {out[key]!r}")
    if out["steps"] is not None and int(out["steps"]) < 1:
        raise ValueError(f"config key 'steps' must be >= 1, got {out['steps']!r}")
    if float(out["radius_mm"]) <= 0 or float(out["temperature"]) <= 0:
        raise ValueError("config keys 'radius_mm' and 'temperature' must be > 0")
    return out


# ------------------------------------------------------------------------------------------------------- loss
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (the standard SimCLR trick).

    Each rank's loss uses all ranks' embeddings, so the gradient of the local slice is the sum over ranks;
    DDP then averages parameter gradients, which matches a loss averaged over ranks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks (rank order, equal sizes); gradients flow back to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks without autograd (coordinates, flags)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def spatial_nce_logits(z1: torch.Tensor, z2: torch.Tensor, xyz1: torch.Tensor, xyz2: torch.Tensor,
                       temperature: float) -> dict[str, torch.Tensor]:
    """Logits of the 2B local queries (both views) against all 2G gathered keys, plus targets and distances.

    Keys are [view1 of all ranks, view2 of all ranks]; query i's positive is the other view of the same pair.
    Returns logits [2B, 2G], pos [2B], self_idx [2B], dist [2B, 2G] (3D mm between query and key centres).
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    b = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])
    kxyz = torch.cat([gather_nograd(xyz1.float()), gather_nograd(xyz2.float())])
    g = keys.shape[0] // 2
    queries, qxyz = torch.cat([z1, z2]), torch.cat([xyz1.float(), xyz2.float()])
    logits = queries @ keys.T / temperature
    idx = torch.arange(b, device=z1.device) + rank * b
    return {"logits": logits, "pos": torch.cat([idx + g, idx]), "self_idx": torch.cat([idx, idx + g]),
            "dist": torch.cdist(qxyz, kxyz)}


def negative_weights(d: torch.Tensor, variant: str, radius_mm: float, sigma_mm: float | None = None) -> torch.Tensor:
    """Weight of each key as a negative: hard = 0 inside the radius else 1; weighted = 1 - exp(-d²/2σ²)."""
    if variant == "hard":
        return (d >= radius_mm).float()
    if variant == "weighted":
        s = float(sigma_mm or radius_mm)
        return 1.0 - torch.exp(-d.square() / (2 * s * s))
    raise ValueError(f"unknown loss variant {variant!r}; choose one of {LOSSES}")


def weighted_info_nce(logits: torch.Tensor, pos: torch.Tensor, neg_weight: torch.Tensor) -> torch.Tensor:
    """-log(e^s+ / (e^s+ + Σ_k w_k e^s_k)): InfoNCE whose negatives count with weights w (0 removes a key)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    w = neg_weight.clone()
    w[rows, pos] = 1.0  # the positive always counts fully in the denominator
    logw = torch.where(w > 0, w.clamp_min(1e-30).log(), torch.full_like(w, -math.inf))
    denom = torch.logsumexp(logits + logw, dim=1)
    return (denom - logits[rows, pos]).mean()


def spatial_nce_loss(z1: torch.Tensor, z2: torch.Tensor, xyz1: torch.Tensor, xyz2: torch.Tensor,
                     temperature: float = 0.1, radius_mm: float = 1.0, variant: str = "hard",
                     sigma_mm: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SpatialNCE (NT-Xent over all ranks' keys, near keys masked or down-weighted); returns (loss, parts)."""
    parts = spatial_nce_logits(z1, z2, xyz1, xyz2, temperature)
    w = negative_weights(parts["dist"], variant, radius_mm, sigma_mm)
    rows = torch.arange(w.shape[0], device=w.device)
    w[rows, parts["self_idx"]] = 0.0  # a query is never its own negative
    return weighted_info_nce(parts["logits"], parts["pos"], w), parts


# ---------------------------------------------------------------------------------------------------- seeds
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to min_ratio, as a LambdaLR factor."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def run_plan(cfg: dict[str, Any], world_size: int) -> dict[str, int]:
    """Total steps, steps per epoch and draws per rank per epoch implied by the config."""
    global_batch = cfg["batch_size"] * world_size
    total = int(cfg["steps"]) if cfg["steps"] else math.ceil(cfg["samples"] / global_batch)
    per_epoch = math.ceil(total / cfg["epochs"])
    return {"total_steps": total, "steps_per_epoch": per_epoch, "global_batch": global_batch,
            "draws_per_rank": per_epoch * cfg["batch_size"]}


# ------------------------------------------------------------------------------------------------- training
@dataclass
class _Run:
    """One pretraining run: its setting, model and optimiser, and the counters its checkpoints carry over."""

    cfg: dict[str, Any]
    plan: dict[str, int]
    env: cdist.DistEnv
    dev: torch.device
    out: Path
    sync_bn: bool = False  # BatchNorm synchronised over the ranks (config key sync_batchnorm)
    model: Any = None  # the Encoder (what is saved)
    ddp: Any = None  # the model as trained: DDP-wrapped when distributed, else the model itself
    opt: Any = None
    sched: Any = None
    step: int = 0
    fallbacks: int = 0
    drawn: int = 0
    resumed_from: int = 0
    last_logits_shape: tuple | None = None
    waited: float = 0.0  # loader wait and compute time after the first step (which includes worker start-up)
    computed: float = 0.0
    t_start: float = 0.0


def pretrain(stores: Sequence[str | Path], out_dir: str | Path, config: dict[str, Any] | None = None,
             device: str = "auto", return_model: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) SpatialNCE pretraining on the given patch stores; rank 0 writes outputs into out_dir.

    Rank 0 logs a progress line (step, loss, samples/s, ETA) every ``log_every`` steps, at INFO; with
    ``progress=False`` at DEBUG (shown with ``cytonet -v``).
    """
    run = _plan_run(config, out_dir, device)
    data, sampler, loader = _build_data(stores, run)
    if run.env.is_main:
        _log_start(run, data)
    _build_model(run)
    _resume(run)
    metrics = _MetricsLog(run, stores, progress) if run.env.is_main else None
    _train_loop(run, loader, sampler, metrics)
    result = _finish(run, data, stores, metrics)
    if return_model:
        result["model"] = run.model
    return result


def _plan_run(config: dict[str, Any] | None, out_dir: str | Path, device: str) -> _Run:
    """Validate the config, join the process group, set threads and work out the steps."""
    cfg = validate_config(config)
    out = Path(out_dir)
    env, dev = cdist.init_distributed(device)
    local_world = cdist.local_world_size(default=env.world_size)
    torch.set_num_threads(cdist.threads_per_rank(cfg["threads"], local_world))
    plan = run_plan(cfg, env.world_size)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return _Run(cfg=cfg, plan=plan, env=env, dev=dev, out=out,
                sync_bn=cdist.use_sync_batchnorm(cfg["sync_batchnorm"], env.world_size))


def _build_data(stores: Sequence[str | Path], run: _Run) -> tuple[Any, Any, Any]:
    """The patch stores, this rank's anchor sampler and the pair DataLoader."""
    from torch.utils.data import DataLoader

    from cytonet.nn.data import AnchorSampler, PatchStores, SpatialPairDataset, collate_pairs

    cfg, env = run.cfg, run.env
    data = PatchStores(stores)
    ds = SpatialPairDataset(data, cfg["radius_mm"], seed=cfg["seed"], within_brain=cfg["within_brain"],
                            out_px=cfg["input_px"], raw=cfg["augment_on"] == "device", positives=cfg["positives"])
    sampler = AnchorSampler(len(data), run.plan["draws_per_rank"], env.rank, env.world_size, cfg["seed"])
    loader = DataLoader(ds, batch_size=cfg["batch_size"], sampler=sampler, collate_fn=collate_pairs, drop_last=True,
                        num_workers=cfg["num_workers"], pin_memory=run.dev.type == "cuda",
                        persistent_workers=cfg["num_workers"] > 0,
                        prefetch_factor=4 if cfg["num_workers"] > 0 else None)
    return data, sampler, loader


def _build_model(run: _Run) -> None:
    """Seeded encoder (DDP-wrapped when distributed), AdamW and the warmup + cosine schedule."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, plan, dev = run.cfg, run.plan, run.dev
    seed_everything(cfg["seed"])  # identical init on every rank (DDP also broadcasts rank 0's weights)
    run.model = prepare_model(build_encoder(cfg["encoder"], cfg["embedding_dim"], cfg["proj_hidden"]), dev)
    if run.sync_bn:  # same state_dict keys: checkpoints and encoder.pt do not depend on it
        run.model = cdist.convert_sync_batchnorm(run.model, dev)
    run.ddp = run.model
    if run.env.distributed:
        run.ddp = DDP(run.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warmup = cfg["warmup_steps"] if cfg["warmup_steps"] is not None else min(2000, max(1, plan["total_steps"] // 20))
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lr_lambda(plan["total_steps"], int(warmup),
                                                                     cfg["min_lr_ratio"]))


#: Config keys that do not change what is trained: a checkpoint made with other values of these is resumed.
RUNTIME_KEYS = frozenset({"num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "threads"})


def _stale_checkpoint(ckpt: dict, cfg: dict[str, Any], out: Path) -> bool:
    """Whether the checkpoint belongs to another training (changed config keys or defaults): if so, remove the
    run's checkpoints, so that a rerun with new settings trains from scratch instead of resuming the old run."""
    old = {k: v for k, v in (ckpt.get("config") or {}).items() if k not in RUNTIME_KEYS}
    new = {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if not changed:
        return False
    log.warning("%s: the checkpoints were made with other settings (%s); training from step 0", out,
                ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed))
    return True


def _resume(run: _Run) -> None:
    """Load the newest checkpoint of the output folder, if any, then seed this rank's RNGs for the steps to come."""
    cfg, env, out = run.cfg, run.env, run.out
    ckpt = load_latest_checkpoint(out)
    stale = ckpt is not None and _stale_checkpoint(ckpt, cfg, out)
    if env.distributed:
        dist.barrier()  # every rank has read its checkpoint before rank 0 may delete stale ones
    if stale:
        ckpt = None
        if env.is_main:
            for path in list_checkpoints(out):
                path.unlink(missing_ok=True)
    if ckpt is not None:
        if ckpt["plan"] != run.plan:
            raise ValueError(f"{out}: checkpoint was made with plan {ckpt['plan']}, this run has {run.plan} "
                             "(batch_size, world size, steps or epochs changed); use a new output folder")
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        run.step, run.fallbacks, run.drawn = ckpt["step"], ckpt["fallbacks"], ckpt["drawn"]
        if env.is_main:
            log.info("resuming from checkpoint step %d/%d in %s", run.step, run.plan["total_steps"], out)
    run.resumed_from = run.step
    # RNG: derived from seed + rank + step (data randomness is keyed by draw, so it does not depend on it);
    # rank 0 additionally restores its saved states exactly.
    seed_everything(cfg["seed"] + 100_003 * env.rank + run.step)
    if ckpt is not None and env.is_main:
        set_rng_state(ckpt["rng"])


def _log_start(run: _Run, data: Any) -> None:
    """What is trained on what, and for how long."""
    cfg, plan = run.cfg, run.plan
    log.info("%d patches from %d store(s) (brains %s), %d px; encoder %s, loss %s, radius %.3g mm",
             len(data), len(data.paths), ", ".join(data.brains), data.patch_px, cfg["encoder"], cfg["loss"],
             cfg["radius_mm"])
    log.info("%d steps of %d samples (%d rank(s) x %d) in %d epoch(s) on %s, SyncBatchNorm %s; metrics every %d "
             "steps, checkpoint every %d", plan["total_steps"], plan["global_batch"], run.env.world_size,
             cfg["batch_size"], cfg["epochs"], run.dev, "on" if run.sync_bn else "off", cfg["log_every"],
             cfg["checkpoint_every"])


class _MetricsLog:
    """Rank 0's record of training: metrics.csv rows, TensorBoard scalars and a progress line per row."""

    FIELDS = ["step", "epoch", "loss", "lr", "samples_per_s", "loader_wait_s", "step_s", "fallback_frac",
              "elapsed_s"]

    def __init__(self, run: _Run, stores: Sequence[str | Path], progress: bool) -> None:
        out, cfg = run.out, run.cfg
        log_path = out / "metrics.csv"
        rows = []
        if log_path.exists():  # drop rows the killed run logged after its last checkpoint
            with open(log_path, newline="") as old:
                rows = [r for r in csv.DictReader(old) if int(r["step"]) <= run.step]
        self.fh = open(log_path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fh.flush()
        (out / "config.json").write_text(json.dumps({"config": cfg, "plan": run.plan,
                                                     "stores": [str(s) for s in stores],
                                                     "world_size": run.env.world_size}, indent=2))
        self.tb = None
        if cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to CSV only", stacklevel=2)
        self.level = logging.INFO if progress else logging.DEBUG
        # Since the previous progress line: its step and time, and the loader wait and step time summed since.
        self.window_step, self.window_t, self.window_wait, self.window_busy = run.step, time.perf_counter(), 0.0, 0.0

    def tick(self, wait: float, dt: float) -> None:
        """Count one step's loader wait and compute time towards the next progress line."""
        self.window_wait += wait
        self.window_busy += wait + dt

    def write(self, run: _Run, epoch: int, stats: torch.Tensor, wait: float, dt: float, t_done: float) -> None:
        """One metrics row for the step just done, and its progress line."""
        gb = run.plan["global_batch"]
        row = {"step": run.step, "epoch": epoch, "loss": round(float(stats[0]), 6),
               "lr": f"{run.sched.get_last_lr()[0]:.3e}",
               "samples_per_s": round(gb / max(wait + dt, 1e-9), 2),
               "loader_wait_s": round(wait, 5), "step_s": round(dt, 5),
               "fallback_frac": round(float(stats[1]) / gb, 4),
               "elapsed_s": round(t_done - run.t_start, 3)}
        self.writer.writerow(row)
        self.fh.flush()
        if self.tb is not None:
            for k in ("loss", "samples_per_s", "loader_wait_s", "fallback_frac"):
                self.tb.add_scalar(k, float(row[k]), run.step)
        self._progress_line(run, epoch, row, t_done)

    def _progress_line(self, run: _Run, epoch: int, row: dict[str, Any], t_done: float) -> None:
        # Throughput over the steps since the previous line (checkpoint writes included: what the run achieves).
        window_s = t_done - max(self.window_t, run.t_start)
        rate = (run.step - self.window_step) * run.plan["global_batch"] / max(window_s, 1e-9)
        wait_frac = self.window_wait / max(self.window_busy, 1e-9)
        self.window_step, self.window_t, self.window_wait, self.window_busy = run.step, t_done, 0.0, 0.0
        total, elapsed = run.plan["total_steps"], t_done - run.t_start
        eta = elapsed / max(run.step - run.resumed_from, 1) * (total - run.step)
        log.log(self.level, "step %d/%d (%.0f%%) epoch %d: loss %.4f, lr %s, %.1f samples/s, loader wait %.0f%%, "
                "fallback %.1f%%, elapsed %s, ETA %s", run.step, total, 100 * run.step / total, epoch, row["loss"],
                row["lr"], rate, 100 * wait_frac, 100 * row["fallback_frac"], format_duration(elapsed),
                format_duration(eta))

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _train_step(run: _Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimiser step on a batch of pairs; returns [global mean loss, fallbacks in the global batch] on CPU."""
    from cytonet.nn.data import augment_views

    cfg, dev = run.cfg, run.dev
    # Copy the pinned halves separately (a CPU-side cat would make a pageable copy and block).
    v1, v2 = batch["view1"].to(dev, non_blocking=True), batch["view2"].to(dev, non_blocking=True)
    if cfg["augment_on"] == "device":
        v1 = augment_views(v1, batch["key"], cfg["seed"], 2, out_px=cfg["input_px"])
        v2 = augment_views(v2, batch["key"], cfg["seed"], 3, out_px=cfg["input_px"])
    v = to_input(torch.cat([v1, v2]), dev)
    with autocast(dev, cfg["precision"]):
        z = run.ddp(v)
    z1, z2 = z.float().chunk(2)
    loss, parts = spatial_nce_loss(z1, z2, batch["xyz1"].to(dev), batch["xyz2"].to(dev),
                                   cfg["temperature"], cfg["radius_mm"], cfg["loss"], cfg["sigma_mm"])
    run.last_logits_shape = tuple(parts["logits"].shape)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    run.step += 1
    # On the device: NCCL reduces only GPU tensors. One small all-reduce gives global loss and fallbacks.
    stats = torch.stack([loss.detach().float(), batch["fallback"].to(dev).sum().float()])
    if run.env.distributed:
        dist.all_reduce(stats)
        stats[0] /= run.env.world_size
    stats = stats.cpu()
    run.fallbacks += int(stats[1])
    run.drawn += run.plan["global_batch"]
    return stats


def _train_loop(run: _Run, loader: Any, sampler: Any, metrics: _MetricsLog | None) -> None:
    """Train until plan["total_steps"]: metrics rows every log_every steps, checkpoints every checkpoint_every."""
    cfg, plan = run.cfg, run.plan
    run.t_start = time.perf_counter()
    run.ddp.train()
    while run.step < plan["total_steps"]:
        epoch, in_epoch = divmod(run.step, plan["steps_per_epoch"])
        sampler.set_epoch(epoch, start=in_epoch * cfg["batch_size"])
        it = iter(loader)
        t_wait = time.perf_counter()
        for batch in it:
            t_got = time.perf_counter()
            stats = _train_step(run, batch)
            t_done = time.perf_counter()
            wait, dt = t_got - t_wait, t_done - t_got
            if run.step > run.resumed_from + 1:  # the first step includes worker start-up
                run.waited += wait
                run.computed += dt
            if metrics is not None:
                metrics.tick(wait, dt)
            last = run.step == plan["total_steps"]
            if metrics is not None and (run.step % cfg["log_every"] == 0 or last):
                metrics.write(run, epoch, stats, wait, dt, t_done)
            # The last step is checkpointed too, so rerunning a finished run only rewrites encoder.pt.
            if run.env.is_main and (run.step % cfg["checkpoint_every"] == 0 or last):
                _save_checkpoint(run)
            if run.step >= plan["total_steps"]:
                break
            t_wait = time.perf_counter()
        del it


def _save_checkpoint(run: _Run) -> None:
    """Write checkpoints/step_XXXXXXXX.pt atomically and keep only the newest keep_checkpoints."""
    path = run.out / "checkpoints" / f"step_{run.step:08d}.pt"
    atomic_save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                 "scheduler": run.sched.state_dict(), "step": run.step,
                 "epoch": run.step // run.plan["steps_per_epoch"], "plan": run.plan, "config": run.cfg,
                 "fallbacks": run.fallbacks, "drawn": run.drawn, "rng": rng_state(), "spec": run.model.spec()}, path)
    for old in list_checkpoints(run.out)[:-run.cfg["keep_checkpoints"]]:
        old.unlink(missing_ok=True)
    log.debug("checkpoint %s", path)


def _finish(run: _Run, data: Any, stores: Sequence[str | Path], metrics: _MetricsLog | None) -> dict[str, Any]:
    """Make every rank hold rank 0's model; rank 0 writes encoder.pt and summary.json. Returns the run's result."""
    env = run.env
    spread = 0.0
    if env.distributed:
        # Without SyncBatchNorm the running stats are per rank (DDP re-broadcasts them only at the next forward):
        # record how far they drifted apart, then make every rank hold rank 0's model, the one that is saved.
        spread = cdist.buffer_spread(run.model)
        for buf in run.model.buffers():
            dist.broadcast(buf, 0)
    result: dict[str, Any] = {"step": run.step, "resumed_from": run.resumed_from, "fallbacks": run.fallbacks,
                              "drawn": run.drawn, "fallback_frac": run.fallbacks / max(run.drawn, 1),
                              "logits_shape": run.last_logits_shape, "rank": env.rank, "world_size": env.world_size,
                              "sync_batchnorm": run.sync_bn, "bn_rank_spread": spread}
    if env.is_main:
        metrics.close()
        _write_outputs(run, data, stores, result)
    if env.distributed:
        dist.barrier()  # nobody leaves before rank 0 has written encoder.pt
    return result


def _write_outputs(run: _Run, data: Any, stores: Sequence[str | Path], result: dict[str, Any]) -> None:
    """encoder.pt (written last of the weights, atomically) and summary.json."""
    cfg, out = run.cfg, run.out
    atomic_save({"format": ENCODER_FORMAT, "spec": run.model.spec(), "state_dict": run.model.state_dict(),
                 "patch_px": data.patch_px, "input_px": cfg["input_px"] or data.patch_px,
                 "pixel_size_um": data.pixel_size_um, "config": cfg,
                 "step": run.step, "stores": [str(s) for s in stores]}, out / "encoder.pt")
    summary = {k: v for k, v in result.items() if k != "logits_shape"}
    # Which side bounds the run: the share of step time spent waiting for the loader.
    frac = run.waited / max(run.waited + run.computed, 1e-9)
    wall = time.perf_counter() - run.t_start
    summary.update(plan=run.plan, wall_s=round(wall, 2), device=str(run.dev),
                   loader_wait_frac=round(frac, 4), bound="loader" if frac > 0.5 else "compute")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps (%d this run) in %s, %s-bound (loader wait %.0f%%), fallback %.1f%%; wrote %s",
             run.step, run.step - run.resumed_from, format_duration(wall), summary["bound"], 100 * frac,
             100 * summary["fallback_frac"], out / "encoder.pt")


# ------------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet pretrain``."""
    parser.add_argument("--store", action="append", required=True, help="patch store folder (repeat; any brain)")
    parser.add_argument("--out", required=True, help="output folder (resumes from its newest checkpoint)")
    add_params_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch threads per rank (overrides config key 'threads')")
    parser.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (without torchrun/srun)")
    parser.add_argument("--no-progress", action="store_true",
                        help="log the per-step progress lines at debug level only (shown with cytonet -v)")


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet pretrain``."""
    cfg = parse_params(args.params, args.param)
    if args.threads:
        cfg["threads"] = args.threads
    validate_config(cfg)  # fail before any process is spawned
    verbosity = getattr(args, "log_verbose", 0) - getattr(args, "log_quiet", 0)
    cdist.run_ranks(args.nproc, pretrain, (list(args.store), args.out, cfg, args.device, False,
                                           not args.no_progress), verbosity)
    return 0
