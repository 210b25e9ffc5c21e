"""SpatialNCE self-supervised pretraining: contrastive learning where patches close in 3D are positives.

Runs single-process, under ``torchrun --standalone --nproc-per-node N -m cytonet.learn.pretrain ...``, under ``srun``
(rank from SLURM_PROCID etc., see cytonet/nn/distributed.py), or ``cytonet pretrain --nproc N`` (local spawn).
Negatives are gathered from all ranks; keys closer than ``radius_mm`` to the query are not negatives.
Rank 0 writes atomic checkpoints; a restarted run resumes from the newest one in its output folder.

Outputs in ``--out``: ``encoder.pt`` (weights + spec, written last), ``metrics.csv``, ``summary.json``,
``config.json``, ``checkpoints/step_XXXXXXXX.pt``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cytonet.nn import distributed as cdist
from cytonet.io.params import add_params_arguments, parse_params, with_defaults
from cytonet.nn.checkpoints import ENCODER_FORMAT, atomic_save, list_checkpoints, load_latest_checkpoint
from cytonet.nn.models import autocast, build_encoder, prepare_model, to_input

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
    "input_px": None,          # network input size (None: the store's patch size)
    "augment_on": "loader",    # loader: augment in DataLoader workers | device: ship uint8, augment on the
                               # training device (for 2048 px patches on GPU, where CPU workers cannot keep up)
    "num_workers": 2,          # DataLoader workers per rank
    "checkpoint_every": 500,   # steps between checkpoints (rank 0)
    "keep_checkpoints": 2,
    "seed": 0,
    "precision": "auto",       # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    "threads": None,           # torch intra-op threads (None: CPU count / local ranks)
    "log_every": 1,            # steps between metrics rows
    "tensorboard": False,      # also log to TensorBoard when installed
}
LOSSES = ("hard", "weighted")


def validate_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Merge with DEFAULTS; raise ValueError naming any unknown key or bad value."""
    out = with_defaults(DEFAULTS, cfg, "pretrain")
    from cytonet.nn.models import ENCODERS

    if out["encoder"] not in ENCODERS:
        raise ValueError(f"config key 'encoder': {out['encoder']!r} is not one of {ENCODERS}")
    if out["precision"] not in ("auto", "bf16", "fp32"):
        raise ValueError(f"config key 'precision': {out['precision']!r} is not auto, bf16 or fp32")
    if out["augment_on"] not in ("loader", "device"):
        raise ValueError(f"config key 'augment_on': {out['augment_on']!r} is not 'loader' or 'device'")
    if out["loss"] not in LOSSES:
        raise ValueError(f"config key 'loss': {out['loss']!r} is not one of {LOSSES}")
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


def _threads(cfg: dict[str, Any], local_world: int) -> int:
    # Snakemake exports OMP_NUM_THREADS = rule threads; without an explicit value, split the CPUs over local ranks.
    if cfg.get("threads"):
        return int(cfg["threads"])
    if os.environ.get("CYTONET_THREADS"):
        return int(os.environ["CYTONET_THREADS"])
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


# ------------------------------------------------------------------------------------------------- training
def pretrain(stores: Sequence[str | Path], out_dir: str | Path, config: dict[str, Any] | None = None,
             device: str = "auto", return_model: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) SpatialNCE pretraining on the given patch stores; rank 0 writes outputs into out_dir."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader

    from cytonet.nn.data import AnchorSampler, PatchStores, SpatialPairDataset, augment_views, collate_pairs

    cfg = validate_config(config)
    out = Path(out_dir)
    env, dev = cdist.init_distributed(device)
    local_world = cdist.local_world_size(default=env.world_size)
    torch.set_num_threads(_threads(cfg, local_world))
    plan = run_plan(cfg, env.world_size)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    data = PatchStores(stores)
    ds = SpatialPairDataset(data, cfg["radius_mm"], seed=cfg["seed"], within_brain=cfg["within_brain"],
                            out_px=cfg["input_px"], raw=cfg["augment_on"] == "device")
    sampler = AnchorSampler(len(data), plan["draws_per_rank"], env.rank, env.world_size, cfg["seed"])
    loader = DataLoader(ds, batch_size=cfg["batch_size"], sampler=sampler, collate_fn=collate_pairs, drop_last=True,
                        num_workers=cfg["num_workers"], pin_memory=dev.type == "cuda",
                        persistent_workers=cfg["num_workers"] > 0,
                        prefetch_factor=4 if cfg["num_workers"] > 0 else None)

    seed_everything(cfg["seed"])  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = prepare_model(build_encoder(cfg["encoder"], cfg["embedding_dim"], cfg["proj_hidden"]), dev)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if env.distributed else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warmup = cfg["warmup_steps"] if cfg["warmup_steps"] is not None else min(2000, max(1, plan["total_steps"] // 20))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(plan["total_steps"], int(warmup), cfg["min_lr_ratio"]))

    step, fallbacks, drawn = 0, 0, 0
    ckpt = load_latest_checkpoint(out)
    if ckpt is not None:
        if ckpt["plan"] != plan:
            raise ValueError(f"{out}: checkpoint was made with plan {ckpt['plan']}, this run has {plan} "
                             "(batch_size, world size, steps or epochs changed); use a new output folder")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, fallbacks, drawn = ckpt["step"], ckpt["fallbacks"], ckpt["drawn"]
        if env.is_main:
            print(f"pretrain: resuming from checkpoint step {step} in {out}", file=sys.stderr, flush=True)
    resumed_from = step
    # RNG: derived from seed + rank + step (data randomness is keyed by draw, so it does not depend on it);
    # rank 0 additionally restores its saved states exactly.
    seed_everything(cfg["seed"] + 100_003 * env.rank + step)
    if ckpt is not None and env.is_main:
        set_rng_state(ckpt["rng"])

    log_path = out / "metrics.csv"
    fields = ["step", "epoch", "loss", "lr", "samples_per_s", "loader_wait_s", "step_s", "fallback_frac", "elapsed_s"]
    writer = fh = tb = bar = None
    if env.is_main:
        if log_path.exists():  # drop rows the killed run logged after its last checkpoint
            rows = [r for r in csv.DictReader(open(log_path)) if int(r["step"]) <= step]
        else:
            rows = []
        fh = open(log_path, "w", newline="")
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        (out / "config.json").write_text(json.dumps({"config": cfg, "plan": plan, "stores": [str(s) for s in stores],
                                                     "world_size": env.world_size}, indent=2))
        if cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to CSV only")
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=plan["total_steps"], initial=step, desc="pretrain", unit="step", mininterval=2)

    def save_checkpoint() -> None:
        path = out / "checkpoints" / f"step_{step:08d}.pt"
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step, "epoch": step // plan["steps_per_epoch"], "plan": plan, "config": cfg,
                     "fallbacks": fallbacks, "drawn": drawn, "rng": rng_state(), "spec": model.spec()}, path)
        for old in list_checkpoints(out)[:-cfg["keep_checkpoints"]]:
            old.unlink(missing_ok=True)

    t_start, last_logits_shape = time.perf_counter(), None
    waited = computed = 0.0
    ddp.train()
    while step < plan["total_steps"]:
        epoch, in_epoch = divmod(step, plan["steps_per_epoch"])
        sampler.set_epoch(epoch, start=in_epoch * cfg["batch_size"])
        it = iter(loader)
        t_wait = time.perf_counter()
        for batch in it:
            t_got = time.perf_counter()
            # Copy the pinned halves separately (a CPU-side cat would make a pageable copy and block).
            v1, v2 = batch["view1"].to(dev, non_blocking=True), batch["view2"].to(dev, non_blocking=True)
            if cfg["augment_on"] == "device":
                v1 = augment_views(v1, batch["key"], cfg["seed"], 2, out_px=cfg["input_px"])
                v2 = augment_views(v2, batch["key"], cfg["seed"], 3, out_px=cfg["input_px"])
            v = to_input(torch.cat([v1, v2]), dev)
            with autocast(dev, cfg["precision"]):
                z = ddp(v)
            z1, z2 = z.float().chunk(2)
            loss, parts = spatial_nce_loss(z1, z2, batch["xyz1"].to(dev), batch["xyz2"].to(dev),
                                           cfg["temperature"], cfg["radius_mm"], cfg["loss"], cfg["sigma_mm"])
            last_logits_shape = tuple(parts["logits"].shape)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            # On the device: NCCL reduces only GPU tensors. One small all-reduce gives global loss and fallbacks.
            stats = torch.stack([loss.detach().float(), batch["fallback"].to(dev).sum().float()])
            if env.distributed:
                dist.all_reduce(stats)
                stats[0] /= env.world_size
            stats = stats.cpu()
            fallbacks += int(stats[1])
            drawn += plan["global_batch"]
            t_done = time.perf_counter()
            wait, dt = t_got - t_wait, t_done - t_got
            if step > resumed_from + 1:  # the first step includes worker start-up
                waited += wait
                computed += dt
            if env.is_main and (step % cfg["log_every"] == 0 or step == plan["total_steps"]):
                row = {"step": step, "epoch": epoch, "loss": round(float(stats[0]), 6),
                       "lr": f"{sched.get_last_lr()[0]:.3e}",
                       "samples_per_s": round(plan["global_batch"] / max(wait + dt, 1e-9), 2),
                       "loader_wait_s": round(wait, 5), "step_s": round(dt, 5),
                       "fallback_frac": round(float(stats[1]) / plan["global_batch"], 4),
                       "elapsed_s": round(t_done - t_start, 3)}
                writer.writerow(row)
                fh.flush()
                if tb is not None:
                    for k in ("loss", "samples_per_s", "loader_wait_s", "fallback_frac"):
                        tb.add_scalar(k, float(row[k]), step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(stats[0]):.3f}", refresh=False)
            # The last step is checkpointed too, so rerunning a finished run only rewrites encoder.pt.
            if env.is_main and (step % cfg["checkpoint_every"] == 0 or step == plan["total_steps"]):
                save_checkpoint()
            if step >= plan["total_steps"]:
                break
            t_wait = time.perf_counter()
        del it

    if env.distributed:
        # BatchNorm running stats are per rank (DDP re-broadcasts them only at the next forward): make every
        # rank hold rank 0's model, the one that is saved.
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    result: dict[str, Any] = {"step": step, "resumed_from": resumed_from, "fallbacks": fallbacks, "drawn": drawn,
                              "fallback_frac": fallbacks / max(drawn, 1), "logits_shape": last_logits_shape,
                              "rank": env.rank, "world_size": env.world_size}
    if env.is_main:
        if bar is not None:
            bar.close()
        fh.close()
        if tb is not None:
            tb.close()
        atomic_save({"format": ENCODER_FORMAT, "spec": model.spec(), "state_dict": model.state_dict(),
                     "patch_px": data.patch_px, "input_px": cfg["input_px"] or data.patch_px,
                     "pixel_size_um": data.pixel_size_um, "config": cfg,
                     "step": step, "stores": [str(s) for s in stores]}, out / "encoder.pt")
        summary = {k: v for k, v in result.items() if k != "logits_shape"}
        # Which side bounds the run: the share of step time spent waiting for the loader.
        frac = waited / max(waited + computed, 1e-9)
        summary.update(plan=plan, wall_s=round(time.perf_counter() - t_start, 2), device=str(dev),
                       loader_wait_frac=round(frac, 4), bound="loader" if frac > 0.5 else "compute")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if env.distributed:
        dist.barrier()  # nobody leaves before rank 0 has written encoder.pt
    if return_model:
        result["model"] = model
    return result


# ------------------------------------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet pretrain``."""
    parser.add_argument("--store", action="append", required=True, help="patch store folder (repeat; any brain)")
    parser.add_argument("--out", required=True, help="output folder (resumes from its newest checkpoint)")
    add_params_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch threads per rank (overrides config key 'threads')")
    parser.add_argument("--nproc", type=int, default=1, help="spawn N local ranks (without torchrun/srun)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _spawned(stores: list[str], out: str, cfg: dict, device: str, progress: bool) -> None:
    try:
        pretrain(stores, out, cfg, device=device, progress=progress)
    finally:
        cdist.cleanup()


def run(args: argparse.Namespace) -> int:
    """Entry of ``cytonet pretrain``."""
    cfg = parse_params(args.params, args.param)
    if args.threads:
        cfg["threads"] = args.threads
    validate_config(cfg)  # fail before any process is spawned
    if args.nproc > 1 and cdist.detect_env().world_size == 1:
        cdist.launch_local(args.nproc, _spawned, list(args.store), args.out, cfg, args.device, not args.no_progress)
        return 0
    _spawned(list(args.store), args.out, cfg, args.device, not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cytonet.learn.pretrain ...`` (the same as the ``cytonet`` sub-command)."""
    from cytonet.cli import stage_main

    return stage_main("cytonet.learn.pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
