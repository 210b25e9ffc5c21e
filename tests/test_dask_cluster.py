"""cytonet.preprocess.dask_cluster: a LocalCluster sized from threads, and the SLURMCluster a `cluster: slurm` config
asks for.

Without Slurm the SLURMCluster is only constructed and its job script rendered (its scheduler starts in-process).
The tests marked ``slurm`` submit it for real to the one-node Slurm of scripts/local_slurm.sh (the ``local_slurm``
fixture of tests/test_slurm.py): worker jobs start, the client sees them, a brain's patch store is built through
them and equals the LocalCluster store, closing cancels them, and a start without workers fails clearly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytonet.preprocess import dask_cluster as DC
from test_slurm import local_slurm, scontrol_job  # noqa: F401  (session fixture: the one-node Slurm)


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

    # Defaults: partition dc-cpu, the account from $CYTONET_SLURM_ACCOUNT (none at all without it), the workers'
    # scratch folder expanded by the worker job's own shell, the default route's interface.
    default = DC.slurm_cluster_kwargs({"cluster": "slurm"})
    assert default["queue"] == "dc-cpu" and default["account"] is None and default["interface"] is None
    assert default["local_directory"] == "${TMPDIR:-/tmp}"
    cluster = dask_jobqueue.SLURMCluster(**DC.slurm_cluster_kwargs({"cluster": "slurm", "interface": "lo",
                                                                    "local_dir": "/scratch/my dir"}))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -A" not in script and "--interface lo" in script and "tcp://127.0.0.1:" in script
    assert "--local-directory '/scratch/my dir'" in script
    monkeypatch.setenv("CYTONET_SLURM_ACCOUNT", "fromenv")
    assert DC.slurm_cluster_kwargs({"cluster": "slurm"})["account"] == "fromenv"
    for bad in (0, -5, "soon", True):
        with pytest.raises(ValueError, match="dask.start_timeout"):
            DC.parse_dask_config({"start_timeout": bad})


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
    assert list(tmp_path.iterdir()) == []  # the config folder goes when the job script ends


# ---------------------------------------------------------------------------------------------------------------
# A real SLURMCluster on the one-node Slurm (partition debug, no accounting).

WORKER_CFG = {"cluster": "slurm", "jobs": 2, "cores": 1, "processes": 1, "memory": "1GB", "walltime": "00:10:00",
              "partition": "debug", "start_timeout": 120}


def jobs_named(name: str) -> dict[str, str]:
    """{Slurm job id: state} of the jobs called ``name`` (finished ones stay listed for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split() for line in out.splitlines())


def wait_until_ended(name: str, timeout: float = 60) -> dict[str, str]:
    """The jobs called ``name`` once none is pending, running or completing any more."""
    end = time.monotonic() + timeout
    while True:
        jobs = jobs_named(name)
        if all(state in DC.ENDED_STATES for state in jobs.values()) or time.monotonic() > end:
            return jobs
        time.sleep(0.5)


def demo_brain(root: Path) -> list[str]:
    """One generated demo brain of 2 sections with masks; the `cytonet patches` arguments without --out."""
    from synth_fixtures import masked_demo_brain

    masks = masked_demo_brain(root)
    params = {"patch_px": 16, "pixel_size_um": 32.0, "count": 150, "count_per": "section", "shard_patches": 32}
    return ["patches", "--brain", "demo1", "--brains-table", str(root / "brains.csv"), "--areas",
            str(root / "areas.csv"), "--masks-dir", str(masks), "--no-progress", "--params", json.dumps(params)]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
def test_slurm_cluster_workers_are_slurm_jobs_and_build_the_patch_store(tmp_path, monkeypatch):
    """Worker jobs start on partition debug (no account), the client's workers are those jobs, closing cancels
    them; `cytonet patches` with `cluster: slurm` gives the LocalCluster's store."""
    import dask

    pytest.importorskip("dask_jobqueue")  # before dask.config.set: its defaults load on import
    from cytonet.cli import main
    from cytonet.preprocess import patches as P

    monkeypatch.chdir(tmp_path)  # the worker jobs' slurm-<id>.out land here
    monkeypatch.delenv("CYTONET_SLURM_ACCOUNT", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "jobtmp"))  # exported to the worker jobs: their local_dir default
    (tmp_path / "jobtmp").mkdir()
    name = f"cytonet-dask-test-{os.getpid()}"

    # 1. A client on the cluster: its workers run inside the Slurm jobs named `name`.
    with dask.config.set({"jobqueue.slurm.name": name}):
        with DC.dask_client(WORKER_CFG) as client:
            client.wait_for_workers(2, timeout=120)
            job_of_worker = client.run(lambda: os.environ["SLURM_JOB_ID"])
            local_dirs = client.run(lambda dask_worker: dask_worker.local_directory)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            running = jobs_named(name)
            assert sorted(job_of_worker.values()) == sorted(running) and len(running) == 2, (job_of_worker, running)
            assert set(running.values()) == {"RUNNING"}, running
            for job_id in running:
                info = scontrol_job(job_id)
                assert info["Partition"] == "debug" and info["NumCPUs"] == "1", info
                assert info["Account"] == "(null)", info  # no account set: no -A
    assert all(d.startswith(str(tmp_path / "jobtmp")) for d in local_dirs.values()), local_dirs
    ended = wait_until_ended(name)
    assert set(ended) == set(running) and set(ended.values()) == {"CANCELLED"}, ended

    # 2. The patch store through Slurm workers (scheduler and workers on the loopback interface) equals the
    #    LocalCluster store: same patch table, same pixels.
    args = demo_brain(tmp_path / "demo")
    assert main(args + ["--out", str(tmp_path / "local"), "--threads", "2", "--dask", '{"cluster": "local"}']) == 0
    t0 = time.monotonic()
    with dask.config.set({"jobqueue.slurm.name": name + "-patches"}):
        assert main(args + ["--out", str(tmp_path / "slurm"), "--dask",
                            json.dumps({**WORKER_CFG, "interface": "lo"})]) == 0
    slurm_s = time.monotonic() - t0
    jobs = wait_until_ended(name + "-patches")
    assert len(jobs) == 2 and set(jobs.values()) == {"CANCELLED"}, jobs
    for job_id in jobs:
        log = (tmp_path / f"slurm-{job_id}.out").read_text()
        assert re.search(r"Registered to:\s+tcp://127\.0\.0\.1:", log), log
    for out in ("local", "slurm"):
        P.validate_store(tmp_path / out)
    local_t, slurm_t = (pd.read_parquet(tmp_path / o / "patches.parquet") for o in ("local", "slurm"))
    assert len(local_t) == 300
    pd.testing.assert_frame_equal(local_t, slurm_t)
    import zarr

    np.testing.assert_array_equal(zarr.open(tmp_path / "local" / "patches.zarr", mode="r")["patches"][:],
                                  zarr.open(tmp_path / "slurm" / "patches.zarr", mode="r")["patches"][:])
    assert slurm_s < 120, slurm_s


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
def test_slurm_cluster_without_workers_fails_clearly(tmp_path, monkeypatch):
    """No worker within start_timeout: the error names the partition, the jobs' states and the job script, and
    the held jobs are cancelled; a partition Slurm rejects fails at once, before any job is submitted."""
    import dask

    pytest.importorskip("dask_jobqueue")  # before dask.config.set: its defaults load on import
    monkeypatch.chdir(tmp_path)
    name = f"cytonet-dask-held-{os.getpid()}"
    held = {"jobqueue.slurm.name": name, "jobqueue.slurm.job-extra-directives": ["--hold"]}
    t0 = time.monotonic()
    with dask.config.set(held), pytest.raises(RuntimeError) as err:
        DC.open_client({**WORKER_CFG, "start_timeout": 4})
    assert time.monotonic() - t0 < 30
    text = str(err.value)
    assert "no worker connected within 4 s (dask.start_timeout)" in text and "partition 'debug'" in text, text
    assert text.count("PENDING (JobHeldUser)") == 2 and "#SBATCH -p debug" in text and "slurm-" in text, text
    jobs = wait_until_ended(name)
    assert len(jobs) == 2 and set(jobs.values()) == {"CANCELLED"}, jobs

    # BackgroundClient.close() while the start still waits: cancelled within a poll, jobs cancelled too.
    with dask.config.set({**held, "jobqueue.slurm.name": name + "-bg"}):
        starter = DC.BackgroundClient(WORKER_CFG)
        for _ in range(60):
            if len(jobs_named(name + "-bg")) == 2:
                break
            time.sleep(0.5)
        t0 = time.monotonic()
        starter.close()
    assert time.monotonic() - t0 < 3 * DC.POLL_S + 10
    with pytest.raises(RuntimeError, match="start cancelled"):
        starter.get()
    assert set(wait_until_ended(name + "-bg").values()) == {"CANCELLED"}

    # Worker jobs that fail at once: the start ends as soon as they have, with their output in the error.
    broken = {"jobqueue.slurm.name": name + "-broken", "jobqueue.slurm.python": str(tmp_path / "no-python")}
    t0 = time.monotonic()
    with dask.config.set(broken), pytest.raises(RuntimeError, match="every worker job ended") as err:
        DC.open_client(WORKER_CFG)
    assert time.monotonic() - t0 < 60
    assert str(err.value).count("FAILED") == 2 and "no-python: No such file or directory" in str(err.value), err.value

    rejected = r"sbatch rejects the Dask worker job script for partition 'nope'(.|\n)*invalid partition"
    with dask.config.set({"jobqueue.slurm.name": name + "-bad"}), pytest.raises(RuntimeError, match=rejected):
        DC.open_client({**WORKER_CFG, "partition": "nope"})
    assert jobs_named(name + "-bad") == {}
