"""One ``cytonet infer`` job over a batch of sections, one process (rank) per GPU, sections sharded over the ranks.

Rank r of W maps ``sections[r::W]`` with every model of the job (each model loaded once per rank). The ranks are
srun tasks under Slurm (the rule's ``{resources.mpi}`` launcher) or torchrun workers, or ``--nproc N`` local
processes spawned here (cytonet.nn.distributed.run_ranks). A rank runs on ``cuda:LOCAL_RANK`` when CUDA is
available (modulo the GPUs it sees), else on the CPU with ``--threads`` per rank (default: the cores split over
the ranks of the node; a spawning process splits its own ``--threads`` over the ranks it spawns). Mapping needs
no collectives: the ranks join a (gloo) process group only at the end of a job with ``--batch-manifest``, as a
barrier before rank 0 gathers the staged section manifests (cytonet.mapping.batch). A rank that fails ends
with a non-zero exit status, and so does the job: srun's --kill-on-bad-exit, or the spawning process, stops the
others. Maps do not depend on the number of ranks (tests/test_infer_ranks.py).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cytonet.mapping import batch as batch_manifest
from cytonet.mapping.infer import InferenceError, _resolve_model, infer_section
from cytonet.nn import distributed as cdist

log = logging.getLogger(__name__)

BARRIER_TIMEOUT_S = 24 * 3600.0  # ranks may finish hours apart; the job's walltime bounds the wait anyway


@dataclass(frozen=True)
class SectionSpec:
    """One section of the job: its image, tissue mask, output name and pixel size (None: from the metadata)."""

    image: str
    mask: str
    name: str
    pixel_size_um: float | None = None


@dataclass(frozen=True)
class InferJob:
    """Everything a rank needs (picklable: spawned ranks receive it)."""

    sections: tuple[SectionSpec, ...]
    models: tuple[str, ...]          # classifier.pt paths or model bundle folders, one per out
    outs: tuple[str, ...]
    areas: str
    bundles: bool = False            # models are --model bundles
    options: dict = field(default_factory=dict)  # infer_section keyword arguments shared by every section
    device: str | None = None
    threads: int | None = None       # torch threads per rank (None: the node's cores split over its ranks)
    batch: str | None = None         # --batch-manifest


def shard(items: tuple, rank: int, world: int) -> tuple:
    """This rank's share: every world-th item from position rank (sizes differ by at most one)."""
    return items[rank::world]


def rank_device(requested: str | None, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK (modulo the visible GPUs) when CUDA is there and wanted, else the CPU or the given device."""
    if requested in (None, "auto", "cuda"):
        if torch.cuda.is_available():
            return cdist.local_gpu(local_rank)
        if requested == "cuda":
            raise InferenceError("--device cuda, but torch sees no CUDA device")
        return torch.device("cpu")
    return torch.device(requested)


def map_share(job: InferJob) -> list[str]:
    """Map this rank's sections with every model; returns one summary line per (model, section)."""
    env = cdist.detect_env()
    dev = rank_device(job.device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # pinned buffers and streams belong to this rank's GPU
    local = cdist.local_world_size(default=env.world_size)
    torch.set_num_threads(cdist.threads_per_rank(job.threads, local))
    mine = shard(job.sections, env.rank, env.world_size)
    log.info("infer rank %d/%d on %s (%d torch threads): %d of %d sections", env.rank, env.world_size, dev,
             torch.get_num_threads(), len(mine), len(job.sections))
    lines = []
    for k, (spec, out) in enumerate(zip(job.models, job.outs)):
        if not mine:  # more ranks than sections: nothing to load
            break
        if job.bundles and not Path(spec).is_dir():
            raise InferenceError(f"--model {spec}: not a model bundle folder (cytonet export-model); "
                                 "a classifier.pt is mapped with --classifier")
        model, _ = _resolve_model(spec, job.areas, job.options.get("patch_um"), None)  # loaded once per rank
        for sec in mine:
            staged = batch_manifest.staged_manifest(job.batch, k, sec.name) if job.batch else None
            res = infer_section(sec.image, sec.mask, model, job.areas, out, name=sec.name,
                                pixel_size_um=sec.pixel_size_um, device=str(dev), manifest_path=staged,
                                **{k_: v for k_, v in job.options.items() if k_ != "patch_um"})
            lines.append(f"{res.paths['manifest']}: {res.n_locations} locations, grid {res.grid_shape[0]}x"
                         f"{res.grid_shape[1]} at {res.output_um:g} µm, {res.seconds:.1f} s")
            print(lines[-1], flush=True)
    if job.batch:
        _finish_batch(job, env)
    return lines


def _finish_batch(job: InferJob, env: cdist.DistEnv) -> None:
    """Barrier over the ranks (gloo), then rank 0 gathers every staged manifest into the batch manifest."""
    if env.world_size > 1:
        import torch.distributed as dist

        cdist.init_distributed("cpu", env, timeout_s=BARRIER_TIMEOUT_S)
        dist.barrier()
    if env.rank == 0:
        batch_manifest.write_batch_manifest(job.batch, job.outs, [s.name for s in job.sections],
                                            {"ranks": env.world_size})
        log.info("infer: batch manifest %s (%d sections x %d models)", job.batch, len(job.sections), len(job.outs))


def rank_main(job: InferJob) -> None:
    """One rank: bad input ends it with the CLI's message and exit status 2 (so does the job)."""
    try:
        map_share(job)
    except InferenceError as exc:
        env = cdist.detect_env()
        where = f" (rank {env.rank}/{env.world_size})" if env.world_size > 1 else ""
        print(f"cytonet infer: error{where}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc


def run_job(job: InferJob, nproc: int, verbosity: int = 0) -> int:
    """Run ``job`` on ``nproc`` local ranks (or the ranks a launcher started); the exit status of the job."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    spawning = nproc > 1 and cdist.detect_env().world_size == 1
    if spawning and job.threads:  # the ranks spawned here share this process's threads
        job = replace(job, threads=max(1, job.threads // nproc))
    try:
        cdist.run_ranks(nproc, rank_main, (job,), verbosity)
    except SystemExit as exc:  # this process was the (only) rank: its message is printed
        return int(exc.code or 1)
    except ProcessExitedException as exc:
        print(f"cytonet infer: error: rank {exc.error_index} of {nproc} exited with status {exc.exit_code}",
              file=sys.stderr)
        return int(exc.exit_code or 1)
    except ProcessRaisedException as exc:
        print(f"cytonet infer: error: rank {exc.error_index} of {nproc} failed:\n{exc}", file=sys.stderr)
        return 1
    return 0

