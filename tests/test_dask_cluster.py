"""cytonet.preprocess.dask_cluster: a LocalCluster sized from threads, and the SLURMCluster a `cluster: slurm` config
asks for.

The SLURMCluster is only constructed and its job script rendered (its scheduler starts in-process); nothing is
submitted, so these tests need no Slurm.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cytonet.preprocess import dask_cluster as DC


def _pre_spawn_env_in_worker() -> dict:
    from distributed.nanny import _get_env_variables

    return {"pre_spawn": _get_env_variables("distributed.nanny.pre-spawn-environ"),
            "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def test_local_client_has_the_requested_workers():
    with DC.dask_client({"cluster": "local"}, threads=2) as client:
        client.wait_for_workers(2, timeout=60)
        info = client.scheduler_info()
        assert len(info["workers"]) == 2
        assert all(w["nthreads"] == 1 for w in info["workers"].values())
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        # No dashboard (dashboard_address=None): a second cluster on the same node starts too. (The scheduler's
        # small HTTP server still tries :8787 first and moves to a free port when it is taken.)
        with DC.dask_client({"cluster": "local"}, threads=1) as second:
            assert second.submit(abs, -1).result(timeout=60) == 1
        # Workers start without Dask's MALLOC_TRIM_THRESHOLD_ (it made the patch store's shard writes 5-6x slower).
        envs = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(envs.values()) == {None}, envs


def test_background_client_and_scheduler_address():
    """BackgroundClient starts the cluster in a thread; scheduler=ADDRESS connects without starting one."""
    starter = DC.BackgroundClient({"cluster": "local"}, threads=1)
    try:
        client = starter.get()
        client.wait_for_workers(1, timeout=60)
        with DC.dask_client(scheduler=client.scheduler.address) as other:
            assert other.submit(abs, -4).result(timeout=60) == 4
        assert client.submit(abs, -5).result(timeout=60) == 5  # the other client did not close our cluster
    finally:
        starter.close()
        starter.close()  # idempotent


def test_config_errors_and_worker_counts():
    with pytest.raises(ValueError, match="unknown dask config key.*nodes"):
        DC.parse_dask_config({"nodes": 3})
    with pytest.raises(ValueError, match="'local' or 'slurm'"):
        DC.parse_dask_config({"cluster": "pbs"})
    with pytest.raises(ValueError, match="unknown dask config key"):
        DC.BackgroundClient({"typo": 1})  # fails in the caller, before any thread starts
    assert DC.worker_count({"cluster": "local"}, threads=6) == 6
    assert DC.worker_count({"cluster": "slurm", "jobs": 3, "processes": 16}, threads=1) == 48
    assert not DC.wants_cluster(None, threads=1)  # in-process
    assert DC.wants_cluster(None, threads=2) and DC.wants_cluster({"cluster": "slurm"}, threads=1)
    assert DC.wants_cluster(None, threads=1, scheduler="tcp://x:8786")


def test_slurm_cluster_renders_partition_account_walltime(monkeypatch):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    monkeypatch.delenv("CYTONET_SLURM_ACCOUNT", raising=False)
    cfg = {"cluster": "slurm", "jobs": 3, "cores": 16, "processes": 4, "memory": "60GB", "walltime": "01:30:00",
           "partition": "debug", "account": "proj42", "local_dir": "/scratch/w"}
    kwargs = DC.slurm_cluster_kwargs(cfg)
    assert kwargs["queue"] == "debug" and kwargs["account"] == "proj42" and kwargs["walltime"] == "01:30:00"
    assert kwargs["scheduler_options"]["dashboard_address"] is None
    cluster = dask_jobqueue.SLURMCluster(**kwargs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p debug", "#SBATCH -A proj42", "#SBATCH -t 01:30:00", "#SBATCH --cpus-per-task=16",
                 "--nworkers 4", "--nthreads 4", "--local-directory /scratch/w",
                 "unset SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK"):
        assert line in script, (line, script)

    # Defaults: partition dc-cpu, the account from $CYTONET_SLURM_ACCOUNT (none at all without it).
    assert DC.slurm_cluster_kwargs({"cluster": "slurm"})["queue"] == "dc-cpu"
    assert DC.slurm_cluster_kwargs({"cluster": "slurm"})["account"] is None
    monkeypatch.setenv("CYTONET_SLURM_ACCOUNT", "fromenv")
    assert DC.slurm_cluster_kwargs({"cluster": "slurm"})["account"] == "fromenv"


def test_slurm_worker_prologue_unsets_malloc_trim(tmp_path):
    """The worker job's prologue (run by bash) leaves the nannies a Dask config without MALLOC_TRIM_THRESHOLD_."""
    prologue = "\n".join(DC.slurm_cluster_kwargs({"cluster": "slurm"})["job_script_prologue"])
    check = ("from distributed.nanny import _get_env_variables as g; "
             "e = g('distributed.nanny.pre-spawn-environ'); "
             "assert 'MALLOC_TRIM_THRESHOLD_' not in e and e.get('OMP_NUM_THREADS') == '1', e")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(["bash", "-c", f"set -e\n{prologue}\n{sys.executable} -c \"{check}\""], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
