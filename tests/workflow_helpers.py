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
    # The demo brains are generated once per session (demo_data) and copied in as ordinary input data, so the
    # workflow runs in the "your own brains" mode and tests can edit the sections tables.
    "demo": {"enabled": False},
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
    "launch": {"nproc": 2},  # 2 DDP ranks (gloo): spawned locally, started by srun under Slurm
}

COPIED = ["Snakefile", "workflow", "profiles", "config", "cytonet", "docs", "envs",
          "benchmarks/out/infer/bench_infer.json", "pyproject.toml"]


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY_CONFIG with some sections updated (shallow per section)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


DEMO_PARAMS: dict[str, Any] = {"n_brains": 2, "n_unknown": 1, "sections_per_brain": 2, "annotate_every": 1,
                               "pixel_size_um": 16, "size_mm": 8, "seed": 0, "tile_px": 128}
_DEMO: dict[str, Path] = {}


def demo_data() -> Path:
    """The tiny demo brains (2 brains x 2 sections), generated once per session."""
    if "dir" not in _DEMO:
        import json
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="cytonet-demo-")) / "demo"
        subprocess.run([str(BIN / "cytonet"), "make-demo", "--params", json.dumps(DEMO_PARAMS), "--out", str(out),
                        "--no-progress"], check=True, capture_output=True, env=workflow_env(REPO))
        _DEMO["dir"] = out
    return _DEMO["dir"]


def make_workdir(dest: Path, config: dict[str, Any] | None = None) -> Path:
    """Copy the workflow, the package and the tiny demo brains into ``dest``; write ``config`` as config.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_data(), dest / "resources" / "demo", copy_function=shutil.copy2, dirs_exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results", "resources")
    for name in COPIED:
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
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


# ---------------------------------------------------------------------------------------------------------------
# One complete local run of the tiny workflow per test session, shared by the modules that need it (they copy it).
_REFERENCE: dict[str, Path] = {}


def reference_run(tmp_path_factory) -> Path:
    """Work directory of a complete local run of TINY_CONFIG (made once per session; do not modify it)."""
    if "dir" not in _REFERENCE:
        work = make_workdir(tmp_path_factory.mktemp("reference") / "work")
        run_snakemake(work, "--cores", "2")
        _REFERENCE["dir"] = work
    return _REFERENCE["dir"]


def copy_run(src: Path, dest: Path) -> Path:
    """A copy of a finished run (outputs, .snakemake metadata, timestamps) that a test may change."""
    shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy2)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# "Equal outputs" of two runs, per kind of output:
#   masks (PNG), demo images: identical pixels;
#   patch stores: identical Parquet tables (all columns) and identical uint8 patch arrays;
#   pretrained encoder and classifiers: same step, same tensor names/shapes, values within 1e-5 (DDP all-reduce
#   sums in float32; both runs use 2 gloo ranks with the same seeds and one thread each);
#   area maps: identical label images (PNG) for identical classifiers; section metrics within 1e-4.
def _tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor inside a checkpoint (nested dicts), by dotted key."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("optimizer", "scheduler", "rng"):
                continue
            out.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compare_runs(a: Path, b: Path) -> list[str]:
    """Differences between the outputs of two runs (an empty list when they are equal in the sense above)."""
    import json

    import numpy as np
    import pandas as pd
    import torch
    import zarr
    from PIL import Image

    problems: list[str] = []
    ra, rb = a / "results", b / "results"

    def files(root: Path, pattern: str) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.glob(pattern))

    for pattern in ("masks/*/*.png", "maps/*/*/*_areas.png"):
        fa, fb = files(ra, pattern), files(rb, pattern)
        if fa != fb:
            problems.append(f"{pattern}: different files {fa} vs {fb}")
            continue
        for rel in fa:
            if not np.array_equal(np.asarray(Image.open(ra / rel)), np.asarray(Image.open(rb / rel))):
                problems.append(f"{rel}: pixels differ")
    for man in files(ra, "patches/*/manifest.json"):
        da, db = (ra / man).parent, (rb / man).parent
        ta, tb = pd.read_parquet(da / "patches.parquet"), pd.read_parquet(db / "patches.parquet")
        if not ta.equals(tb):
            problems.append(f"{man.parent}: patch tables differ")
        pa = zarr.open_group(str(da / "patches.zarr"), mode="r")["patches"][:]
        pb = zarr.open_group(str(db / "patches.zarr"), mode="r")["patches"][:]
        if not np.array_equal(pa, pb):
            problems.append(f"{man.parent}: patch arrays differ")
    for pattern in ("pretrain/encoder.pt", "finetune/*/*/classifier.pt"):
        for rel in files(ra, pattern):
            ca = torch.load(ra / rel, map_location="cpu", weights_only=False)
            cb = torch.load(rb / rel, map_location="cpu", weights_only=False)
            sa, sb = _tensors(ca), _tensors(cb)
            if ca.get("step") != cb.get("step"):
                problems.append(f"{rel}: step {ca.get('step')} vs {cb.get('step')}")
            if sa.keys() != sb.keys():
                problems.append(f"{rel}: different tensors")
                continue
            worst = max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel()), default=0)
            if worst > 1e-5:
                problems.append(f"{rel}: weights differ by up to {worst:.3g}")
    for rel in files(ra, "metrics/*/*/*.json"):
        ja, jb = json.loads((ra / rel).read_text()), json.loads((rb / rel).read_text())
        for key, va in ja.items():
            vb = jb.get(key)
            if isinstance(va, float) and isinstance(vb, float):
                if not (abs(va - vb) <= 1e-4 or (va != va and vb != vb)):
                    problems.append(f"{rel}: {key} {va} vs {vb}")
    return problems
