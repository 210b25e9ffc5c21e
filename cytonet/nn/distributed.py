"""Process-group setup for DDP: rank / world size / master address from torchrun or SLURM, else single process.

Also what every training stage needs across ranks: threads per rank, synchronised BatchNorm (torch's on CUDA, a
small autograd-correct one for gloo/CPU ranks, which torch's refuses) and gathering rows from all ranks. Kept free
of model and data code so the launch logic can be unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"  # "torchrun" | "slurm" | "none"

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes checkpoints, logs and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list; uses scontrol, which expands ranges like node[01-04]."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # scontrol missing (e.g. inside a container): a plain list "a,b" or a single host still works.
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: scontrol show hostnames failed")


def slurm_port(env: dict[str, str]) -> int:
    """MASTER_PORT from the environment, else derived from the job id so concurrent jobs on a node differ."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID", "0")
    return 15000 + int(hashlib.sha1(job.encode()).hexdigest(), 16) % 20000


def local_world_size(env: dict[str, str] | None = None, default: int = 1) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun) or SLURM_NTASKS_PER_NODE ("4" or "4(x2)"), else default."""
    env = dict(os.environ if env is None else env)
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    digits = raw.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else default


def detect_env(env: dict[str, str] | None = None) -> DistEnv:
    """Read rank/world size from torchrun (RANK, WORLD_SIZE...) or srun (SLURM_PROCID...); default: 1 process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or our own local spawner
        return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                       world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)), launcher="torchrun")
    # Under srun every task has SLURM_PROCID; a plain sbatch script (1 task) also has it but NTASKS == 1.
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
                       world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=slurm_port(env),
                       launcher="slurm")
    return DistEnv()


def local_gpu(local_rank: int) -> torch.device:
    """GPU LOCAL_RANK (modulo the visible GPUs), made this process's current CUDA device."""
    torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str = "auto", env: DistEnv | None = None,
                     timeout_s: float = 600.0) -> tuple[DistEnv, torch.device]:
    """Join the process group (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    import datetime

    env = env or detect_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = local_gpu(env.local_rank) if use_cuda else torch.device("cpu")
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return env, dev


def cleanup(synchronise: bool = True) -> None:
    """Leave the process group if one was joined.

    ``synchronise``: wait for every rank first, so that no rank tears the group down while a peer's last collective
    is still in flight (with gloo that aborted a rank at exit now and then). A rank that leaves after an error
    skips the wait (its peers may never arrive); on gloo the wait gives up after 60 s instead of hanging.
    """
    import datetime

    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronise:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError as exc:  # a peer failed or left: leave anyway
            log.warning("leaving the process group without all ranks: %s", exc)
    dist.destroy_process_group()


def free_port() -> int:
    """An unused TCP port on localhost (for local multi-process runs and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(nproc: int, fn, *args) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes with torchrun-style env vars (gloo/NCCL as available)."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_local_entry, args=(nproc, port, fn, args), nprocs=nproc, join=True)


def _local_entry(rank: int, nproc: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    fn(*args)


def run_ranks(nproc: int, fn, args: tuple, verbosity: int = 0) -> None:
    """A CLI stage's ``fn(*args)`` on every rank: spawned here as ``nproc`` local ranks when ``nproc`` > 1 and no
    launcher (torchrun, srun) started ranks already, else in this process. Each rank leaves the group after it.
    """
    if nproc > 1 and detect_env().world_size == 1:
        launch_local(nproc, _logged_rank, fn, args, verbosity)
    else:
        _ranked(fn, args)


def _logged_rank(fn, args: tuple, verbosity: int) -> None:
    from cytonet.io.logs import setup_logging

    setup_logging(verbosity)  # a spawned rank is a fresh interpreter: set up its logging as `cytonet` did
    _ranked(fn, args)


def _ranked(fn, args: tuple) -> None:
    try:
        fn(*args)
    except BaseException:
        cleanup(synchronise=False)
        raise
    cleanup()


def threads_per_rank(requested: int | None, local_world: int) -> int:
    """Torch threads of one rank: the requested number, else CYTONET_THREADS, else the CPUs split over local ranks.

    Snakemake exports OMP_NUM_THREADS = the rule's threads, so without an explicit value the CPU count is split.
    """
    if requested:
        return int(requested)
    if os.environ.get("CYTONET_THREADS"):
        return int(os.environ["CYTONET_THREADS"])
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def world_size() -> int:
    """Ranks in the joined process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_slice(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of n items: sizes differ by at most one, lower ranks take the extra ones."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_counts(n: int, world: int) -> list[int]:
    """Items of each rank's share of n (rank_slice)."""
    return [len(range(n)[rank_slice(n, r, world)]) for r in range(world)]


def all_gather_rows(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; rank r holds counts[r] rows (zero-padded for the collective)."""
    if world_size() == 1:
        return x
    if x.shape[0] != counts[dist.get_rank()]:
        raise ValueError(f"this rank holds {x.shape[0]} rows, counts say {counts[dist.get_rank()]}")
    width = max(counts)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


# --------------------------------------------------------------------------------------------- synchronised BN
def use_sync_batchnorm(setting: str | bool, world: int) -> bool:
    """Config key sync_batchnorm: ``auto`` = on when more than one rank trains; true/false force it."""
    if setting == "auto":
        return world > 1
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"config key 'sync_batchnorm': {setting!r} is not auto, true or false")


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm synchronised over gloo ranks on CPU, where torch's SyncBatchNorm refuses to run (and DDP refuses
    to wrap it). Same parameters and buffers as BatchNorm1d/2d/3d, so state_dicts are interchangeable.

    Training with more than one rank: mean and biased variance over all ranks' samples, from the all-reduced
    count, sum and sum of squares (float64). The all-reduce is differentiable (its backward all-reduces the
    gradients), so input and weight gradients are those of BatchNorm over the concatenated batch. Running
    statistics are updated like BatchNorm's, with the unbiased global variance. Eval mode or one process:
    plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch statistics over all ranks when training with more than one, else BatchNorm's forward."""
        if not (self.training and world_size() > 1):
            return super().forward(input)
        if input.device.type != "cpu":
            raise ValueError(f"CpuSyncBatchNorm got a {input.device.type} tensor; convert_sync_batchnorm(model, "
                             "device) gives GPU models torch's SyncBatchNorm")
        self._check_input_dim(input)
        from torch.distributed.nn.functional import all_reduce

        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.double()
        count = x.new_full((1,), input.numel() // c)
        stats = all_reduce(torch.cat([x.sum(dims), x.square().sum(dims), count]), group=dist.group.WORLD)
        n = stats[2 * c]
        if n.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n.item())} over "
                             "all ranks")
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        shape = [1, c] + [1] * (input.dim() - 2)
        y = ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(input.dtype)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative average, as BatchNorm does
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1 - f).add_(unbiased_var.to(self.running_var.dtype), alpha=f)


def _cpu_sync(module: nn.Module) -> nn.Module:
    """torch's convert_sync_batchnorm, with CpuSyncBatchNorm: the same parameter and buffer objects, moved over."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _cpu_sync(child))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of model synchronised over the ranks: torch's SyncBatchNorm on CUDA, CpuSyncBatchNorm on CPU.

    state_dict keys stay those of plain BatchNorm, so checkpoints load either way. Returns the converted model
    (the same object unless model itself is a BatchNorm).
    """
    if device.type == "cpu":
        return _cpu_sync(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def buffer_spread(model: nn.Module) -> float:
    """Largest difference between ranks of any floating-point buffer (BatchNorm running stats); 0 with one rank.

    0 (up to rounding) with synchronised BatchNorm; without it each rank's statistics follow its own samples.
    """
    bufs = [b.detach().flatten().float() for b in model.buffers() if b.is_floating_point()]
    if world_size() == 1 or not bufs:
        return 0.0
    flat = torch.cat(bufs)
    hi, neg_lo = flat.clone(), -flat
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(neg_lo, op=dist.ReduceOp.MAX)
    return float((hi + neg_lo).max())
