"""Dask beyond one node: a Client on a LocalCluster (inside one job) or on a dask-jobqueue SLURMCluster.

    from cytonet.preprocess.dask_cluster import dask_client
    with dask_client({"cluster": "local"}, threads=8) as client:
        ...

    starter = BackgroundClient(cfg, threads)   # starts the cluster in a thread while the caller works
    client = starter.get(); ...; starter.close()

Config (the ``dask`` section of the workflow config; defaults in DEFAULTS):

=============  =========  ===========================================================================================
key            default    meaning
=============  =========  ===========================================================================================
cluster        local      ``local``: LocalCluster of ``threads`` single-threaded worker processes inside the job;
                          ``slurm``: workers in separate Slurm jobs (dask-jobqueue SLURMCluster); the calling job
                          runs only the scheduler and the client
jobs           2          slurm: worker jobs to start
cores          128        slurm: cores per worker job
processes      64         slurm: worker processes per worker job (threads per worker = cores / processes)
memory         "480GB"    slurm: memory per worker job
walltime       "04:00:00" slurm: runtime of a worker job
partition      null       slurm: partition (null: dc-cpu)
account        null       slurm: account (null: $CYTONET_SLURM_ACCOUNT, else none: no ``#SBATCH -A`` line)
local_dir      null       slurm: workers' scratch folder (null: ``$TMPDIR`` of the worker's job, else /tmp, expanded
                          on the worker's node, not on the submitting one)
interface      null       slurm: network interface for scheduler and workers, e.g. ``ib0`` (InfiniBand on JURECA)
                          or ``lo`` (one-node Slurm); null: the address of the default route
start_timeout  3600       slurm: seconds to wait for the first worker to connect (queue time included)
=============  =========  ===========================================================================================

A SLURMCluster starts in three steps: ``sbatch --test-only`` checks the worker job script (a bad partition, account
or resource request fails at once, with sbatch's message and the script); ``jobs`` jobs are submitted; the start
waits until one worker has connected (work starts, the others join as they come). It fails with an error naming
the partition, the jobs' Slurm states and reasons (``squeue``), their output files and the job script when no
worker connects within ``start_timeout`` s, or as soon as every worker job has ended without one. Closing the
cluster (or a failed start) cancels the worker jobs (``scancel``).

The dashboard is off in both cases (``dashboard_address=None``), so two jobs on one node do not compete for port
8787 (the scheduler's small HTTP server moves to a free port when 8787 is taken).
Workers start without Dask's ``MALLOC_TRIM_THRESHOLD_`` (see ``NO_MALLOC_TRIM``). ``scheduler=ADDRESS``
connects to an existing scheduler instead and starts (and closes) no cluster. Never imports torch or snakemake.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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
    "interface": None,
    "start_timeout": 3600,
}

# Slurm job states after which a worker job will never connect.
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})
POLL_S = 2.0  # how often the start looks at the worker jobs' states (and at a cancel request)


def parse_dask_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in; an unknown key or cluster kind is an error that names it."""
    out = with_defaults(DEFAULTS, cfg, "dask")
    if out["cluster"] not in ("local", "slurm"):
        raise ValueError(f"dask.cluster must be 'local' or 'slurm', not {out['cluster']!r}")
    timeout = out["start_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"dask.start_timeout must be a positive number of seconds, not {out['start_timeout']!r}")
    return out


# Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers (distributed.nanny.pre-spawn-environ). That pins
# glibc's mmap threshold, so every MB-sized buffer (image tiles, Zarr shards, codec output) is mmapped and
# page-faulted afresh: patch extraction's shard writes ran 5-6x slower. A None value unsets a pre-spawn variable.
NO_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def slurm_cluster_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` from the dask config (testable without Slurm)."""
    cfg = parse_dask_config(cfg)
    account = cfg["account"] or os.environ.get("CYTONET_SLURM_ACCOUNT") or None
    # The job script runs this through bash on the worker's node: the default expands there (a per-job $TMPDIR of
    # the submitting job does not exist on other nodes).
    local_dir = shlex.quote(str(cfg["local_dir"])) if cfg["local_dir"] else "${TMPDIR:-/tmp}"
    return {
        "cores": int(cfg["cores"]),
        "processes": int(cfg["processes"]),
        "memory": str(cfg["memory"]),
        "walltime": str(cfg["walltime"]),
        "queue": cfg["partition"] or "dc-cpu",
        "account": account,
        "local_directory": local_dir,
        "interface": cfg["interface"] or None,
        "scheduler_options": {"dashboard_address": None},
        "job_script_prologue": [
            # Workers must not inherit the calling job's task geometry.
            "unset SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK",
            # The worker jobs' nannies read their own Dask config: the same unset as NO_MALLOC_TRIM, as a config
            # file (DASK_* variables cannot do it: Dask lower-cases their keys, and any value of the variable in
            # the environment would pin the threshold just the same). Removed when the job script ends.
            "export DASK_CONFIG=$(mktemp -d)",
            "trap 'rm -rf \"$DASK_CONFIG\"' EXIT",
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


# ----------------------------------------------------------------------------------------------------------------
# Slurm worker jobs: check, states, waiting


def check_job_script(script: str, partition: str) -> None:
    """``sbatch --test-only`` on the worker job script: a partition, account or resource request Slurm rejects
    fails here, at once, instead of as a worker that never comes."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="cytonet-dask-worker-") as f:
        f.write(script)
        f.flush()
        try:
            proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=120)
        except FileNotFoundError as err:
            raise RuntimeError("dask.cluster: slurm needs Slurm's sbatch on PATH (run it on a Slurm login or "
                               "compute node, or set dask.cluster: local)") from err
    if proc.returncode != 0:
        raise RuntimeError(f"dask.cluster: slurm: sbatch rejects the Dask worker job script for partition "
                           f"{partition!r} (dask.partition/account/cores/memory/walltime):\n"
                           f"{(proc.stderr or proc.stdout).strip()}\nJob script:\n{script}")


def slurm_job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from squeue, finished jobs included (they stay listed for MinJobAge)."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def worker_job_ids(cluster: Any) -> list[str]:
    """Slurm ids of the cluster's submitted worker jobs (a job not yet, or not, submitted has none)."""
    return [str(j.job_id) for j in list(cluster.workers.values()) if getattr(j, "job_id", None)]


def _job_outputs(cluster: Any, job_id: str) -> list[Path]:
    """Where a worker job's stdout/stderr go: dask-jobqueue's log_directory, else sbatch's default in the cwd."""
    job = cluster._dummy_job
    if job.log_directory:
        base = Path(job.log_directory) / f"{job.job_name or 'worker'}-{job_id}"
        return [base.with_suffix(".out"), base.with_suffix(".err")]
    return [Path.cwd() / f"slurm-{job_id}.out"]


def _no_workers_message(cluster: Any, cfg: dict[str, Any], states: dict[str, tuple[str, str]], ended: bool) -> str:
    kwargs = slurm_cluster_kwargs(cfg)
    why = ("every worker job ended before a worker connected" if ended else
           f"no worker connected within {float(cfg['start_timeout']):g} s (dask.start_timeout)")
    ids = worker_job_ids(cluster)
    jobs = ", ".join(f"{i} {states[i][0]} ({states[i][1]})" if i in states else f"{i} (not in squeue)"
                     for i in ids) or "none submitted (sbatch failed: see the log above)"
    lines = [f"dask.cluster: slurm: {why}. Scheduler {cluster.scheduler_address}; worker jobs on partition "
             f"{kwargs['queue']!r} (account {kwargs['account'] or 'none'}): {jobs}."]
    for i in ids:
        for path in _job_outputs(cluster, i):
            tail = path.read_text(errors="replace").splitlines()[-15:] if path.is_file() else None
            lines.append(f"Output of job {i}: {path}" + (":\n  " + "\n  ".join(tail) if tail else " (none yet)"))
    lines.append(f"Job script:\n{cluster.job_script()}")
    return "\n".join(lines)


def wait_for_slurm_workers(client: Any, cluster: Any, cfg: dict[str, Any],
                           stop: threading.Event | None = None) -> None:
    """Return once one worker of the SLURMCluster has connected; raise ``RuntimeError`` (see the module docstring)
    when none does within ``start_timeout`` s or every worker job has ended, or when ``stop`` is set."""
    cfg = parse_dask_config(cfg)
    deadline = time.monotonic() + float(cfg["start_timeout"])
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(POLL_S, deadline - time.monotonic())))
            return
        except TimeoutError:
            pass
        if stop is not None and stop.is_set():
            raise RuntimeError("dask.cluster: slurm: start cancelled before a worker connected")
        ids = worker_job_ids(cluster)
        states = slurm_job_states(ids)
        ended = bool(ids) and len(ids) == int(cfg["jobs"]) and all(
            states.get(i, ("", ""))[0] in ENDED_STATES for i in ids)
        if ended or time.monotonic() >= deadline:
            raise RuntimeError(_no_workers_message(cluster, cfg, states, ended))


def _slurm_client(cfg: dict[str, Any], stop: threading.Event | None) -> tuple[Any, Any]:
    """Check the job script, submit the worker jobs, wait for the first worker; a failure cancels the jobs."""
    from dask.distributed import Client

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise RuntimeError("dask.cluster: slurm needs the dask-jobqueue package") from err
    kwargs = slurm_cluster_kwargs(cfg)
    cluster = SLURMCluster(**kwargs)
    client = None
    try:
        check_job_script(cluster.job_script(), kwargs["queue"])
        cluster.scale(jobs=int(cfg["jobs"]))
        client = Client(cluster)
        wait_for_slurm_workers(client, cluster, cfg, stop)
        return client, cluster
    except BaseException:
        close_client(client, cluster)
        raise


def open_client(cfg: dict[str, Any] | None = None, threads: int = 1, scheduler: str | None = None,
                stop: threading.Event | None = None) -> tuple[Any, Any]:
    """``(client, cluster)``: connected to ``scheduler`` (cluster None) or to a new cluster as configured.

    A SLURMCluster is returned once a worker has connected (``stop``, when set, cancels that wait). Close both
    with ``close_client`` (or use ``dask_client``/``BackgroundClient``, which do).
    """
    import dask
    from dask.distributed import Client, LocalCluster

    cfg = parse_dask_config(cfg)
    if scheduler:
        return Client(scheduler), None
    if cfg["cluster"] == "slurm":
        return _slurm_client(cfg, stop)  # the worker jobs' prologue unsets MALLOC_TRIM_THRESHOLD_ itself
    with dask.config.set(NO_MALLOC_TRIM):
        # memory_limit=0: the job's own limit (Slurm, cgroup) bounds the workers; Dask's per-worker share of
        # the node's memory would pause or kill workers of a job that was given the whole node.
        cluster = LocalCluster(n_workers=max(1, int(threads)), threads_per_worker=1, processes=True,
                               dashboard_address=None, memory_limit=0)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def close_client(client: Any, cluster: Any) -> None:
    """Close a client (when there is one) and, when there is one, the cluster that ``open_client`` started
    (a SLURMCluster cancels its worker jobs)."""
    try:
        if client is not None:
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

    ``get`` waits for the client (and raises what the start raised); ``close`` (idempotent) closes client and cluster,
    and cancels a start still waiting for its Slurm workers.
    """

    def __init__(self, cfg: dict[str, Any] | None = None, threads: int = 1, scheduler: str | None = None):
        parse_dask_config(cfg)  # a bad config fails here, in the caller's thread
        self._result: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._start, args=(cfg, threads, scheduler), daemon=True)
        self._thread.start()

    def _start(self, cfg: dict[str, Any] | None, threads: int, scheduler: str | None) -> None:
        try:
            self._result = open_client(cfg, threads, scheduler, stop=self._stop)
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
        self._stop.set()
        self._thread.join()
        if self._result is not None:
            close_client(*self._result)
