"""Recovery: SIGKILL snakemake and its jobs mid-stage, run again, get a complete valid result; bad input fails loudly.

The local profile sets --rerun-incomplete, so the second run redoes the killed jobs; a SIGKILLed snakemake leaves
its directory lock, so recovery is `snakemake --unlock` and then the same command again.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from workflow_helpers import kill_group, make_workdir, run_snakemake, start_snakemake, tiny_config, wait_for

pytestmark = pytest.mark.slow

STORES = ["results/patches/demo1/manifest.json", "results/patches/demo2/manifest.json"]


def test_kill_during_patch_extraction_then_rerun(tmp_path):
    from cytonet.preprocess.patches import validate_store

    work = make_workdir(tmp_path / "work", tiny_config(patches={"count": 400}))
    proc = start_snakemake(work, *STORES)
    patches = work / "results" / "patches"
    started = wait_for(lambda: any(patches.glob("*/.staging-*")) or any(patches.glob("*/*.zarr")), 300, proc)
    kill_group(proc)
    assert started, (work / "snakemake.out").read_text()[-3000:]
    assert not all((work / s).exists() for s in STORES), "killed too late: extraction had finished"

    run_snakemake(work, "--unlock")  # a SIGKILLed snakemake leaves its lock behind
    run_snakemake(work, *STORES)
    for store in STORES:
        validate_store((work / store).parent)  # raises on a partial or inconsistent store
        table = pd.read_parquet((work / store).parent / "patches.parquet")
        assert len(table) > 0
    assert not list(patches.glob("*/.staging-*"))


def test_kill_during_pretraining_resumes_from_checkpoint(tmp_path):
    cfg = tiny_config(pretrain={"steps": 30, "checkpoint_every": 3}, launch={"nproc": 1})
    work = make_workdir(tmp_path / "work", cfg)
    target = "results/pretrain/encoder.pt"
    run_snakemake(work, *STORES)  # inputs first, so the kill lands in pretraining
    proc = start_snakemake(work, target)
    ckpts = work / "results" / "pretrain" / "checkpoints"
    reached = wait_for(lambda: len(list(ckpts.glob("step_*.pt"))) >= 1 and not (work / target).exists(), 300, proc)
    kill_group(proc)
    assert reached and not (work / target).exists(), (work / "snakemake.out").read_text()[-3000:]
    last = max(int(p.stem.split("_")[1]) for p in ckpts.glob("step_*.pt"))
    assert 0 < last < 30

    run_snakemake(work, "--unlock")
    run_snakemake(work, target)
    summary = json.loads((work / "results" / "pretrain" / "summary.json").read_text())
    assert summary.get("resumed_from", 0) >= last, summary
    steps = pd.read_csv(work / "results" / "pretrain" / "metrics.csv")["step"]
    assert steps.max() == 30
    assert steps.is_unique or steps.duplicated().sum() <= last  # resumed, not started over from step 1


def test_truncated_image_fails_naming_the_file(tmp_path):
    work = make_workdir(tmp_path / "work")
    image = work / "resources" / "demo" / "demo1" / "images" / "demo1_s001.ome.tif"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    mask = work / "results" / "masks" / "demo1" / "demo1_s001.png"
    proc = run_snakemake(work, str(mask.relative_to(work)), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "demo1_s001.ome.tif" in text, text[-3000:]
    assert not mask.exists()  # no output that looks valid
