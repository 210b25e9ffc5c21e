"""Helpers for tests that run the whole workflow: a private copy of the repository, a tiny config, snakemake.

Every run happens in a temporary copy (Snakefile, workflow/, profiles/, config/, cytonet/) with PYTHONPATH on
the copy's package, so a test may edit a module of the copy, and concurrent edits in the real tree cannot
change fingerprints between two runs of one test.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: snakemake and the `cytonet` command

# 2 brains x 2 sections at 16 µm/px (8 mm sections: 500 px), few small patches. Seeds fixed.
TINY_CONFIG: dict[str, Any] = {
    "brains": "resources/demo/brains.csv",
    "areas": "resources/demo/areas.csv",
    "results": "results",
    "threads": {"mask": 1, "patches": 1, "pretrain": 1, "finetune": 1, "infer": 1},
    "demo": {"enabled": True, "out_dir": "resources/demo", "n_brains": 2, "n_unknown": 1,
             "sections_per_brain": 2, "annotate_every": 1, "pixel_size_um": 16, "size_mm": 8, "seed": 0,
             "tile_px": 128},
    "mask": {"resolution_um": 32},
    "patches": {"patch_px": 32, "pixel_size_um": 32, "count": 48, "count_per": "brain", "sampling": "random",
                "min_tissue_fraction": 0.5, "shard_patches": 8, "seed": 0},
    "pretrain": {"encoder": "small", "steps": 6, "batch_size": 8, "num_workers": 0, "checkpoint_every": 2,
                 "log_every": 1, "seed": 0, "threads": 1},
    "finetune": {"mode": "linear", "epochs": 1, "batch_size": 8, "samples_per_epoch": 32, "num_workers": 0,
                 "threads": 1},
    "evaluate": {"seeds": [0], "ablation_finetune": {"lr": 0.005}},
    "infer": {"output_um": 64, "tile_px": 128, "models": ["cytonet"]},
    "smooth3d": {"enabled": False},
}

COPIED = ["Snakefile", "workflow", "profiles", "config", "cytonet", "pyproject.toml"]


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY_CONFIG with some sections updated (shallow per section)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def make_workdir(dest: Path, config: dict[str, Any] | None = None) -> Path:
    """Copy the workflow and package into ``dest`` and write ``config`` (default TINY_CONFIG) as config.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results", "resources")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, symlinks=True, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    write_config(dest, config or TINY_CONFIG)
    return dest


def write_config(workdir: Path, config: dict[str, Any]) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def workflow_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir)  # the copy's cytonet, not the real tree's
    env.pop("SNAKEMAKE_PROFILE", None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    env.update(extra or {})
    return env


def snakemake_cmd(*args: str, profile: str | Path | None = None) -> list[str]:
    prof = str(profile) if profile is not None else str(REPO / "profiles" / "local")
    return [str(BIN / "snakemake"), "--profile", prof, *args]


def run_snakemake(workdir: Path, *args: str, profile: str | Path | None = None, check: bool = True,
                  timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir``; on failure (when ``check``) raise with the tail of its output."""
    proc = subprocess.run(snakemake_cmd(*args, profile=profile), cwd=workdir, env=workflow_env(workdir, env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def dry_run_jobs(workdir: Path, *args: str, profile: str | Path | None = None) -> dict[str, int]:
    """{rule: number of jobs} that a dry run would execute (empty when there is nothing to do)."""
    proc = run_snakemake(workdir, "-n", "--quiet", "rules", *args, profile=profile)
    return parse_job_stats(proc.stdout + proc.stderr)


def parse_job_stats(text: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    jobs: dict[str, int] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("job") and "count" in line:
            for row in lines[i + 2:]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                if parts[0] != "total":
                    jobs[parts[0]] = int(parts[1])
            break
    return jobs


def start_snakemake(workdir: Path, *args: str, profile: str | Path | None = None,
                    log_path: Path | None = None) -> subprocess.Popen:
    """Start snakemake in its own process group (so a test can kill it and all its jobs at once)."""
    out = open(log_path or (workdir / "snakemake.out"), "w")
    return subprocess.Popen(snakemake_cmd(*args, profile=profile), cwd=workdir, env=workflow_env(workdir),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL snakemake and every process of its group (its jobs), like a node failure."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true; False on timeout or when ``proc`` ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False
