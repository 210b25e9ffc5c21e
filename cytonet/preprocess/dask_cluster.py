"""Dask beyond one node: a Client on a LocalCluster (inside one job) or on a dask-jobqueue SLURMCluster.

    from cytonet.preprocess.dask_cluster import dask_client
    with dask_client({"cluster": "local"}, threads=8) as client:
        ...

    starter = BackgroundClient(cfg, threads)   # starts the cluster in a thread while the caller works
    client = starter.get(); ...; starter.close()

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

The dashboard is off in both cases (``dashboard_address=None``), so two jobs on one node do not compete for port
8787 (the scheduler's small HTTP server moves to a free port when 8787 is taken).
Workers start without Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` (see ``NO_MALLOC_TRIM``). ``scheduler=ADDRESS``
connects to an existing scheduler instead and starts (and closes) no cluster. Never imports torch or snakemake.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from cytonet.io.params import with_defaults

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
    out = with_defaults(DEFAULTS, cfg, "dask")
    if out["cluster"] not in ("local", "slurm"):
        raise ValueError(f"dask.cluster must be 'local' or 'slurm', not {out['cluster']!r}")
    return out


# Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers (distributed.nanny.pre-spawn-environ). That pins
# glibc's mmap threshold, so every MB-sized buffer (image tiles, Zarr shards, codec output) is mmapped and
# page-faulted afresh: patch extraction's shard writes ran 5-6x slower. A None value unsets a pre-spawn variable.
NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def slurm_cluster_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` from the dask config (testable without Slurm)."""
    cfg = parse_dask_config(cfg)
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
        "job_script_prologue": [
            # Workers must not inherit the calling job's task geometry.
            "unset SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK",
            # The worker jobs' nannies read their own Dask config: the same unset as NO_MALLOC_TRIM, as a config
            # file (DASK_* variables cannot do it: Dask lower-cases their keys, and any value of the variable in
            # the environment would pin the threshold just the same).
            "export DASK_CONFIG=$(mktemp -d)",
            ("printf 'distributed:\\n  nanny:\\n    pre-spawn-environ:\\n      MALLOC_TRIM_THRESHOLD_: null\\n'"
             " > $DASK_CONFIG/cytonet-workers.yaml"),
        ],
    }


def worker_count(cfg: dict[str, Any] | None, threads: int = 1) -> int:
    """Worker processes the configured cluster will have (local: ``threads``; slurm: jobs x processes)."""
    cfg = parse_dask_config(cfg)
    if cfg["cluster"] == "slurm":
        return int(cfg["jobs"]) * int(cfg["processes"])
    return max(1, int(threads))


def wants_cluster(cfg: dict[str, Any] | None, threads: int = 1, scheduler: str | None = None) -> bool:
    """False when the work should run in-process: a local cluster of one worker and no scheduler to connect to."""
    return bool(scheduler) or parse_dask_config(cfg)["cluster"] != "local" or int(threads) > 1


def open_client(cfg: dict[str, Any] | None = None, threads: int = 1,
                scheduler: str | None = None) -> tuple[Any, Any]:
    """``(client, cluster)``: connected to ``scheduler`` (cluster None) or to a new cluster as configured.

    Close both with ``close_client`` (or use ``dask_client``/``BackgroundClient``, which do).
    """
    import dask
    from dask.distributed import Client, LocalCluster

    cfg = parse_dask_config(cfg)
    if scheduler:
        return Client(scheduler), None
    with dask.config.set(NO_MALLOC_TRIM):
        if cfg["cluster"] == "local":
            # memory_limit=0: the job's own limit (Slurm, cgroup) bounds the workers; Dask's per-worker share of
            # the node's memory would pause or kill workers of a job that was given the whole node.
            cluster = LocalCluster(n_workers=max(1, int(threads)), threads_per_worker=1, processes=True,
                                   dashboard_address=None, memory_limit=0)
        else:
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError as err:  # pragma: no cover - dependency of the package
                raise RuntimeError("dask.cluster: slurm needs the dask-jobqueue package") from err
            cluster = SLURMCluster(**slurm_cluster_kwargs(cfg))
            cluster.scale(jobs=int(cfg["jobs"]))
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def close_client(client: Any, cluster: Any) -> None:
    """Close a client and, when there is one, the cluster that ``open_client`` started."""
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def dask_client(cfg: dict[str, Any] | None = None, threads: int = 1,
                scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed Client for the configured cluster; closes client and cluster on exit."""
    client, cluster = open_client(cfg, threads, scheduler)
    try:
        yield client
    finally:
        close_client(client, cluster)


class BackgroundClient:
    """``open_client`` in a background thread, so the cluster starts while the caller works.

    ``get`` waits for the client (and raises what the start raised); ``close`` (idempotent) closes client and cluster.
    """

    def __init__(self, cfg: dict[str, Any] | None = None, threads: int = 1, scheduler: str | None = None):
        parse_dask_config(cfg)  # a bad config fails here, in the caller's thread
        self._result: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._start, args=(cfg, threads, scheduler), daemon=True)
        self._thread.start()

    def _start(self, cfg: dict[str, Any] | None, threads: int, scheduler: str | None) -> None:
        try:
            self._result = open_client(cfg, threads, scheduler)
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            self._error = exc

    def get(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._thread.join()
        if self._result is not None:
            close_client(*self._result)
