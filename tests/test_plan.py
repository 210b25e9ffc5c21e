"""The plan fits the data: which stages run and why (cytonet.io.plan), what `cytonet validate` prints and refuses,
and the jobs the workflow plans with a model bundle and without any label."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cytonet.cli import main as cytonet_main
from cytonet.io.config import validate_config
from cytonet.io.plan import STAGES, PlanError, check_plan, plan_stages
from workflow_helpers import (
    BIN,
    DEMO_PARAMS,
    dry_run_jobs,
    make_workdir,
    reference_run,
    run_snakemake,
    tiny_config,
    workflow_env,
    write_config,
)

AREAS = [(1, "FA", "#e6194b"), (2, "FB", "#3cb44b")]
TRANSFORM = "0.01 0 0 0 0 0.01 0 0 0 0 0 0"


def _sections(*rows: tuple[str, str, str | None]) -> pd.DataFrame:
    """Sections of (brain_id, role, annotation) rows."""
    return pd.DataFrame([{"brain_id": b, "section_id": f"{b}_s{i}", "role": r, "annotation": a}
                         for i, (b, r, a) in enumerate(rows)])


LABELLED = _sections(("k1", "known", "a.png"), ("k1", "known", None), ("u1", "unknown", None))
UNLABELLED = _sections(("k1", "known", None), ("u1", "unknown", "labels_of_an_unknown_brain.png"))


def _card(folder: Path, areas=AREAS, pixel_size_um: float = 32.0) -> Path:
    """A bundle folder as far as planning reads it: the model card (validation never loads the weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_card.json").write_text(json.dumps({
        "format": "cytonet-bundle/1", "areas": [{"area_id": i, "name": n, "color": c} for i, n, c in areas],
        "pixel_size_um": pixel_size_um, "patch_px": 32, "input_px": 32, "window_px": 32,
        "normalisation": {"mean": 0.5, "std": 0.25}, "encoder": {"encoder": "small", "embedding_dim": 128},
        "weights": {"file": "weights.safetensors"}}))
    (folder / "weights.safetensors").write_bytes(b"")
    return folder


# ------------------------------------------------------------------------------------------- plan_stages
def test_annotated_known_brains_train_everything():
    plan = plan_stages(validate_config({"smooth3d": {"enabled": False}}), LABELLED)
    assert plan.mode == "train" and plan.stages == tuple(s for s in STAGES if s != "smooth3d")
    assert plan.train_models == ("cytonet", "random_init", "ablation")
    assert plan.map_models == ("cytonet", "random_init") and plan.bundle is None
    assert plan.reason == ("1 annotated section(s) in 1 known brain(s): pretrain, finetune 3 models x 3 seed(s), "
                           "evaluate, embed, and map 3 section(s) with cytonet, random_init")
    assert plan_stages(validate_config({}), LABELLED).runs("smooth3d")


def test_no_annotated_section_pretrains_and_embeds_only():
    # an annotation in an unknown brain's table does not count: unknown brains never give labels to training
    for sections in (UNLABELLED, UNLABELLED.drop(columns="annotation")):
        plan = plan_stages(validate_config({}), sections)
        assert plan.mode == "pretrain" and plan.stages == ("mask", "patches", "pretrain", "embed")
        assert plan.train_models == () and plan.map_models == ()
        assert plan.reason.startswith("no section of a known brain has an annotation (sections table column "
                                      "'annotation'), so there is nothing to finetune")
        assert not plan.runs("finetune") and not plan.runs("infer")


def test_a_bundle_maps_and_trains_nothing():
    unknown_only = _sections(("new1", "unknown", None), ("new1", "unknown", None))
    for sections in (unknown_only, LABELLED):  # with a bundle even annotated brains are only mapped
        plan = plan_stages(validate_config({"model": "bundles/cytonet", "smooth3d": {"enabled": False}}), sections)
        assert plan.mode == "map" and plan.stages == ("mask", "infer", "section_metrics", "aggregate")
        assert plan.map_models == ("cytonet",) and plan.train_models == () and plan.bundle == "bundles/cytonet"
    assert plan.line() == ("plan: mask -> infer -> section_metrics -> aggregate (model: bundles/cytonet is set, so "
                           "the 2 brain(s) and 3 section(s) of the brains table are mapped with the bundle; nothing "
                           "is trained)")
    plan = plan_stages(validate_config({"model": "b"}), unknown_only)
    assert plan.stages == ("mask", "infer", "smooth3d", "section_metrics", "aggregate")
    with pytest.raises(ValueError, match="unknown stage 'finetuning'"):
        plan.runs("finetuning")


# -------------------------------------------------------------------------------------------- check_plan
def test_impossible_combinations_are_refused_by_key_and_file(tmp_path):
    areas = tmp_path / "areas.csv"
    areas.write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in AREAS))
    missing = validate_config({"model": str(tmp_path / "no_bundle")})
    with pytest.raises(PlanError, match=r"config key 'model': model bundle .*no_bundle does not exist "
                                        r"\(write one with `cytonet export-model`\)"):
        check_plan(plan_stages(missing, LABELLED), missing, areas=areas)
    broken = _card(tmp_path / "broken")
    (broken / "model_card.json").write_text("{'not': json")
    cfg = validate_config({"model": str(broken)})
    with pytest.raises(PlanError, match=r"config key 'model': model card .*broken/model_card\.json: unreadable"):
        check_plan(plan_stages(cfg, LABELLED), cfg, areas=areas)
    other = _card(tmp_path / "other", areas=[(1, "FA", "#e6194b"), (3, "FC", "#4363d8")])
    cfg = validate_config({"model": str(other)})
    with pytest.raises(PlanError, match=r"config key 'model': model bundle .*other predicts the areas 1 FA, 3 FC but "
                                        r"the areas table .*areas\.csv has 1 FA, 2 FB"):
        check_plan(plan_stages(cfg, LABELLED), cfg, areas=areas)
    check_plan(plan_stages(cfg, LABELLED), cfg, areas=tmp_path / "not_yet_written.csv")  # the demo's, before its job
    fits = _card(tmp_path / "fits", pixel_size_um=8.0)
    cfg = validate_config({"model": str(fits)})
    scanned = LABELLED.assign(pixel_size_um=[4.0, float("nan"), 16.0])  # NaN: the image metadata will tell
    with pytest.raises(PlanError, match=r"config key 'model': model bundle .*fits reads sections at 8 µm/px, but the "
                                        r"sections tables give coarser images: u1/u1_s2 \(16 µm/px\) \(inference "
                                        r"cannot upsample"):
        check_plan(plan_stages(cfg, scanned), cfg, areas=areas, sections=scanned)
    check_plan(plan_stages(cfg, scanned), cfg, areas=areas, sections=scanned.iloc[:2])
    written = {"infer": {"models": ["cytonet"]}}
    cfg = validate_config(written)
    with pytest.raises(PlanError, match=r"config key 'infer\.models' asks for maps of cytonet, but no section of a "
                                        r"known brain is annotated .*so no classifier can be trained"):
        check_plan(plan_stages(cfg, UNLABELLED), cfg, user_config=written)
    check_plan(plan_stages(cfg, UNLABELLED), cfg, user_config={})  # the default list alone is no request
    check_plan(plan_stages(cfg, LABELLED), cfg, user_config=written)


# ------------------------------------------------------------------------------------------ cytonet validate
def _tables(root: Path, annotated: bool) -> Path:
    """brains/areas/sections tables of one known and one unknown brain; returns the config file."""
    for brain in ("k1", "u1"):
        (root / brain).mkdir(parents=True)
        labels = "labels.png" if annotated and brain == "k1" else ""
        (root / brain / "sections.csv").write_text("section_id,image,z_um,transform,annotation\n" + "".join(
            f"{brain}_s{i},s{i}.tif,{20 * i},{TRANSFORM},{labels}\n" for i in range(2)))
    (root / "brains.csv").write_text("brain_id,sections,role\nk1,k1/sections.csv,known\nu1,u1/sections.csv,unknown\n")
    (root / "areas.csv").write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in AREAS))
    return root / "config.yaml"


def _validate(config_path: Path, capsys, **keys) -> tuple[int, list[str]]:
    import yaml

    config_path.write_text(yaml.safe_dump({"brains": str(config_path.parent / "brains.csv"),
                                           "areas": str(config_path.parent / "areas.csv"),
                                           "demo": {"enabled": False}, "smooth3d": {"enabled": False}, **keys}))
    code = cytonet_main(["validate", str(config_path), "--no-files"])
    return code, capsys.readouterr().out.splitlines()


def test_validate_prints_the_plan_of_each_situation(tmp_path, capsys):
    cfg = _tables(tmp_path / "labelled", annotated=True)
    code, lines = _validate(cfg, capsys)
    assert code == 0
    assert lines[:3] == [f"config {cfg} is valid: 2 areas, 2 brains, 4 sections",
                         "  k1 (known): 2 sections, 2 annotated", "  u1 (unknown): 2 sections, 0 annotated"]
    assert lines[3:] == [
        "plan (train): mask -> patches -> pretrain -> finetune -> evaluate -> embed -> infer -> section_metrics -> "
        "aggregate -> benchmarks_page",
        "  why: 2 annotated section(s) in 1 known brain(s): pretrain, finetune 3 models x 3 seed(s), evaluate, "
        "embed, and map 4 section(s) with cytonet, random_init",
        "  trains: cytonet, random_init, ablation", "  maps with: cytonet, random_init"]

    cfg = _tables(tmp_path / "unlabelled", annotated=False)
    code, lines = _validate(cfg, capsys)
    assert code == 0 and lines[1] == "  k1 (known): 2 sections, 0 annotated"
    assert lines[3] == "plan (pretrain): mask -> patches -> pretrain -> embed"
    assert lines[4].startswith("  why: no section of a known brain has an annotation") and len(lines) == 5

    bundle = _card(tmp_path / "bundle")
    code, lines = _validate(cfg, capsys, model=str(bundle))
    assert code == 0 and lines[3:] == [
        "plan (map): mask -> infer -> section_metrics -> aggregate",
        f"  why: model: {bundle} is set, so the 2 brain(s) and 4 section(s) of the brains table are mapped with the "
        "bundle; nothing is trained", f"  maps with: {bundle} (maps in <results>/maps/cytonet/)"]


def test_validate_refuses_what_cannot_run(tmp_path, capsys):
    cfg = _tables(tmp_path, annotated=False)
    code, lines = _validate(cfg, capsys, infer={"models": ["cytonet", "random_init"]})
    assert code == 1 and lines[0].startswith("error: config key 'infer.models' asks for maps of cytonet, "
                                             "random_init, but no section of a known brain is annotated")
    code, lines = _validate(cfg, capsys, model=str(tmp_path / "missing_bundle"))
    assert code == 1 and lines == [f"error: config key 'model': model bundle {tmp_path / 'missing_bundle'} does not "
                                   "exist (write one with `cytonet export-model`)"]
    other = _card(tmp_path / "b", areas=[(1, "FA", "#e6194b"), (2, "PB", "#3cb44b")])
    code, lines = _validate(cfg, capsys, model=str(other))
    assert code == 1 and "predicts the areas 1 FA, 2 PB but the areas table" in lines[0]
    assert "(only in the bundle: 2 PB; only in the table: 2 FB)" in lines[0]


# ------------------------------------------------------------------------------------------- the workflow
def _new_brain(work: Path) -> Path:
    """A brain that no model of the reference run saw (another demo seed), alone in a brains table."""
    out = work / "resources" / "new"
    params = dict(DEMO_PARAMS, seed=7)
    subprocess.run([str(BIN / "cytonet"), "make-demo", "--params", json.dumps(params), "--out", str(out),
                    "--no-progress"], check=True, capture_output=True, env=workflow_env(work))
    (out / "brains.csv").write_text("brain_id,sections,role\nnew1,demo2/sections.csv,unknown\n")
    return out / "brains.csv"


@pytest.mark.slow
def test_a_bundle_maps_a_new_brain_with_no_training_job(tmp_path_factory, tmp_path):
    ref = reference_run(tmp_path_factory)
    bundle = tmp_path / "bundle"
    demo = ref / "resources" / "demo"
    subprocess.run([str(BIN / "cytonet"), "export-model", str(ref / "results"), "-o", str(bundle), "--areas",
                    str(demo / "areas.csv"), "--brains", str(demo / "brains.csv")],
                   check=True, capture_output=True, env=workflow_env(ref))
    work = make_workdir(tmp_path / "fresh")
    brains = _new_brain(work)
    write_config(work, tiny_config(model=str(bundle), brains=str(brains.relative_to(work))))
    assert dry_run_jobs(work) == {"mask": 2, "infer": 2, "section_metrics": 2, "aggregate": 1, "all": 1}
    proc = run_snakemake(work, "--cores", "2")
    assert (proc.stdout + proc.stderr).count("CytoNet plan: mask -> infer -> section_metrics -> aggregate") == 1
    results = work / "results"
    assert sorted(p.name for p in results.iterdir()) == ["logs", "maps", "masks", "metrics", "summary"]
    manifest = json.loads((results / "maps/cytonet/new1/demo2_s000_infer.json").read_text())
    assert str(bundle) in json.dumps(manifest)
    assert dry_run_jobs(work) == {}
    # the brain's maps equal those of `cytonet infer --classifier` with the classifier the bundle came from
    section = pd.read_csv(brains.parent / "demo2" / "sections.csv").iloc[0]
    by_pt = tmp_path / "by_pt"
    subprocess.run([str(BIN / "cytonet"), "infer", "--image", str(brains.parent / "demo2" / section.image), "--mask",
                    str(results / "masks/new1/demo2_s000.png"), "--classifier",
                    str(ref / "results/finetune/cytonet/seed0/classifier.pt"), "--out", str(by_pt), "--areas",
                    str(work / "resources/demo/areas.csv"), "--name", "demo2_s000", "--pixel-size", "16",
                    "--output-um", "64", "--tile-px", "128", "--mode", "dense", "--threads", "1", "--no-progress"],
                   check=True, capture_output=True, env=workflow_env(work))
    assert (by_pt / "demo2_s000_areas.png").read_bytes() == (results / "maps/cytonet/new1/demo2_s000_areas.png"
                                                              ).read_bytes()


@pytest.mark.slow
def test_no_labels_plans_pretraining_and_the_embedding_only(tmp_path):
    config = tiny_config()
    del config["infer"]["models"]  # listing maps to make while nothing can be trained is refused (below)
    work = make_workdir(tmp_path / "w", config)
    for table in (work / "resources" / "demo").glob("*/sections.csv"):
        pd.read_csv(table).drop(columns="annotation").to_csv(table, index=False)
    assert dry_run_jobs(work) == {"mask": 4, "patches": 2, "training_spec": 1, "pretrain": 1, "embed": 1, "all": 1}
    proc = run_snakemake(work, "-n", "--quiet", "rules")
    out = proc.stdout + proc.stderr
    assert out.count("CytoNet plan: mask -> patches -> pretrain -> embed (no section of a known brain has an "
                     "annotation") == 1
    write_config(work, tiny_config(infer={"models": ["cytonet"]}))
    proc = run_snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert "config key 'infer.models' asks for maps of cytonet, but no section of a known brain is annotated" in (
        proc.stdout + proc.stderr)
