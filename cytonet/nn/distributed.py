"""Process-group setup for DDP: rank / world size / master address from torchrun or SLURM, else single process.

Kept free of model and data code so the launch logic can be unit-tested on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import hashlib
import os
import subprocess
from dataclasses import dataclass

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


def init_distributed(device: str = "auto", env: DistEnv | None = None,
                     timeout_s: float = 600.0) -> tuple[DistEnv, torch.device]:
    """Join the process group (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    import datetime

    import torch
    import torch.distributed as dist

    env = env or detect_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return env, dev


def cleanup() -> None:
    """Leave the process group if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
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
