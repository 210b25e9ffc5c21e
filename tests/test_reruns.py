"""Reruns of only what changed: config values and module code reach the rules through params:.

All checks are dry runs on copies of one complete local run of the tiny workflow (workflow_helpers.reference_run).
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from workflow_helpers import TINY_CONFIG, dry_run_jobs, reference_run, tiny_config, write_config

pytestmark = pytest.mark.slow

UPSTREAM = {"mask", "patches", "pretrain"}
MODEL_CHAIN = {"finetune", "infer", "section_metrics", "aggregate"}


@pytest.fixture
def run(tmp_path_factory):
    """The finished reference run, restored after each test (config, sections tables, modules).

    Not a copy: sections tables resolve image paths to absolute paths, so a run moved to another folder has
    different inputs and would rerun everything. Every check here is a dry run, so restoring the files that a
    test edits (by content; fingerprints hash content) returns the run to "nothing to do".
    """
    work = reference_run(tmp_path_factory)
    saved = {p: p.read_bytes() for p in [work / "config.yaml", *work.glob("resources/demo/*/sections.csv"),
                                         *work.glob("cytonet/**/*.py")]}
    yield work
    for path, data in saved.items():
        if path.read_bytes() != data:
            path.write_bytes(data)


def test_complete_run_has_nothing_to_do(run):
    assert dry_run_jobs(run) == {}


def test_finetune_param_reruns_only_the_model_chain(run):
    write_config(run, tiny_config(finetune={"lr": 0.02}))
    jobs = dry_run_jobs(run)
    assert MODEL_CHAIN <= set(jobs), jobs
    assert not UPSTREAM & set(jobs), jobs  # masks, patch stores and the encoder stay
    assert jobs["infer"] == 4 and jobs["aggregate"] == 1


def test_patches_param_reruns_patches_not_masks(run):
    write_config(run, tiny_config(patches={"count": 40}))
    jobs = dry_run_jobs(run)
    assert jobs.get("patches") == 2 and "mask" not in jobs, jobs
    assert "pretrain" in jobs  # the encoder learns from the stores


def test_mask_param_reruns_masks(run):
    write_config(run, tiny_config(mask={"resolution_um": 48}))
    jobs = dry_run_jobs(run)
    assert jobs.get("mask") == 4, jobs


def _add_section(run) -> None:
    table = run / "resources" / "demo" / "demo1" / "sections.csv"
    sections = pd.read_csv(table)
    new = sections.iloc[-1].copy()
    new["section_id"] = "demo1_s900"
    new["z_um"] = float(new["z_um"]) + 400.0
    pd.concat([sections, new.to_frame().T]).to_csv(table, index=False)


def test_added_section_runs_its_own_jobs(run):
    """A new row in one brain's sections table: its mask; that brain's store; its maps; the aggregations.

    The trained models stay (retrain_on_new_sections: false; pretrain/finetune/evaluate read the stores as ancient
    inputs, workflow/rules/training.smk), so no other section is mapped again. With smooth3d enabled, the
    smoothed maps of the new section's brain would rerun too (its input is every map of the brain); the tiny
    config has it off. embed (a UMAP over the stores) counts as an aggregation of the stores.
    """
    _add_section(run)
    jobs = dry_run_jobs(run)
    assert jobs == {"mask": 1, "patches": 1, "infer": 1, "section_metrics": 1, "aggregate": 1, "embed": 1,
                    "all": 1}, jobs


def test_added_section_with_retraining_switched_on(run):
    """retrain_on_new_sections: true: a rebuilt store retrains every model and maps every section again."""
    write_config(run, {**TINY_CONFIG, "retrain_on_new_sections": True})
    assert dry_run_jobs(run) == {}  # the switch alone changes no job
    _add_section(run)
    jobs = dry_run_jobs(run)
    assert {"pretrain", "finetune", "evaluate"} <= set(jobs) and jobs["infer"] == 5, jobs


def test_added_section_and_changed_pretrain_param_in_one_run(run):
    """A retraining change made together with a new section still retrains (through the pretrain spec)."""
    _add_section(run)
    write_config(run, tiny_config(pretrain={"lr": 0.002}))
    jobs = dry_run_jobs(run)
    # finetune: cytonet and ablation start from the encoder; random_init does not
    assert jobs.get("pretrain") == 1 and jobs.get("finetune") == 2 and jobs.get("infer") == 5, jobs
    assert jobs.get("mask") == 1 and jobs.get("patches") == 1, jobs


def _edit(run, module: str) -> None:
    path = run / "cytonet" / module
    path.write_text(path.read_text() + "\n# edited by test_reruns\n")


def test_code_change_of_one_module_reruns_that_stage(run):
    """Editing a stage module (in the copy) reruns that stage and what reads its outputs, nothing upstream."""
    _edit(run, "analysis/section_metrics.py")
    jobs = dry_run_jobs(run)
    assert set(jobs) - {"all"} == {"section_metrics", "aggregate"}, jobs
    assert jobs["section_metrics"] == 4


def test_code_change_of_mask_module_reruns_masking(run):
    _edit(run, "preprocess/mask.py")
    jobs = dry_run_jobs(run)
    assert jobs.get("mask") == 4, jobs


def test_code_change_of_a_shared_module_reruns_every_stage_that_imports_it(run):
    """io/metrics.py is imported by section metrics, aggregation and evaluation (listed by no rule): exactly those
    rerun (evaluation through its training spec), nothing that does not import it."""
    _edit(run, "io/metrics.py")
    jobs = dry_run_jobs(run)
    assert set(jobs) - {"all"} == {"section_metrics", "aggregate", "evaluate", "training_spec"}, jobs
    assert jobs["training_spec"] == 1  # evaluate's spec only: pretraining and finetuning do not import it


def test_code_change_outside_the_closure_reruns_nothing_else(run):
    """The Dask cluster module decides where a store is computed, not what is in it: stores rebuild, no training."""
    _edit(run, "preprocess/dask_cluster.py")
    jobs = dry_run_jobs(run)
    assert jobs.get("patches") == 2, jobs
    assert not {"mask", "pretrain", "finetune", "evaluate"} & set(jobs), jobs


def test_every_config_section_reaches_a_rule(run):
    """Changing any value of the tiny config changes some job's params (nothing is read behind Snakemake's back)."""
    changes = {
        "mask": {"resolution_um": 40}, "patches": {"seed": 1}, "pretrain": {"lr": 0.002},
        "finetune": {"weight_decay": 0.001}, "infer": {"uncertain_below": 0.4}, "launch": {"nproc": 1},
    }
    for section, change in changes.items():
        write_config(run, tiny_config(**{section: change}))
        assert dry_run_jobs(run), f"changing {section}: {change} reran nothing"
    write_config(run, TINY_CONFIG)
    assert dry_run_jobs(run) == {}
    assert yaml.safe_load((run / "config.yaml").read_text()) == TINY_CONFIG
