"""Dask beyond one node: a Client on a LocalCluster (inside one job) or on a dask-jobqueue SLURMCluster.

    from cytonet.dask_cluster import dask_client
    with dask_client({"cluster": "local"}, threads=8) as client:
        ...

Config (the ``dask`` section of the workflow config; defaults in DEFAULTS):

==========  =========  ==============================================================================================
key         default    meaning
==========  =========  ==============================================================================================
cluster     local      ``local``: LocalCluster of ``threads`` single-threaded worker processes inside the job;
                       ``slurm``: workers in separate Slurm jobs (dask-jobqueue SLURMCluster); the calling job
                       runs only the scheduler and the client
jobs        2          slurm: worker jobs to start
cores       128        slurm: cores per worker job
processes   64         slurm: worker processes per worker job (threads per worker = cores / processes)
memory      "480GB"    slurm: memory per worker job
walltime    "04:00:00" slurm: runtime of a worker job
partition   null       slurm: partition (null: dc-cpu)
account     null       slurm: account (null: $CYTONET_SLURM_ACCOUNT, else none)
local_dir   null       slurm: workers' scratch folder (null: $TMPDIR or /tmp of their node)
==========  =========  ==============================================================================================

The dashboard is off in both cases (``dashboard_address=None``), so two jobs on one node never collide on port 8787.
Never imports torch or snakemake.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

DEFAULTS: dict[str, Any] = {
    "cluster": "local",
    "jobs": 2,
    "cores": 128,
    "processes": 64,
    "memory": "480GB",
    "walltime": "04:00:00",
    "partition": None,
    "account": None,
    "local_dir": None,
}


def parse_dask_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in; an unknown key or cluster kind is an error that names it."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dask config key(s): {', '.join(unknown)} (allowed: {', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **cfg}
    if out["cluster"] not in ("local", "slurm"):
        raise ValueError(f"dask.cluster must be 'local' or 'slurm', not {out['cluster']!r}")
    return out


def slurm_cluster_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` from the dask config (testable without Slurm)."""
    account = cfg["account"] or os.environ.get("CYTONET_SLURM_ACCOUNT") or None
    return {
        "cores": int(cfg["cores"]),
        "processes": int(cfg["processes"]),
        "memory": str(cfg["memory"]),
        "walltime": str(cfg["walltime"]),
        "queue": cfg["partition"] or "dc-cpu",
        "account": account,
        "local_directory": cfg["local_dir"] or os.environ.get("TMPDIR", "/tmp"),
        "scheduler_options": {"dashboard_address": None},
        # Workers must not inherit the calling job's task geometry.
        "job_script_prologue": ["unset SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK"],
    }


@contextlib.contextmanager
def dask_client(cfg: dict[str, Any] | None = None, threads: int = 1) -> Iterator[Any]:
    """A dask.distributed Client for the configured cluster; closes client and cluster on exit."""
    from dask.distributed import Client, LocalCluster

    cfg = parse_dask_config(cfg)
    if cfg["cluster"] == "local":
        cluster = LocalCluster(n_workers=max(1, int(threads)), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    else:
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as err:  # pragma: no cover - dependency of the package
            raise RuntimeError("dask.cluster: slurm needs the dask-jobqueue package") from err
        cluster = SLURMCluster(**slurm_cluster_kwargs(cfg))
        cluster.scale(jobs=int(cfg["jobs"]))
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
