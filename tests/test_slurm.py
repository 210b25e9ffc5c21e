"""The jureca profile: what it asks Slurm for (dry run), and a real run through a local Slurm.

    pytest -m slurm          # only these (they start Slurm with scripts/local_slurm.sh: needs root)
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from workflow_helpers import (
    REPO,
    TINY_CONFIG,
    compare_runs,
    make_workdir,
    parse_job_stats,
    reference_run,
    run_snakemake,
)

JURECA = REPO / "profiles" / "jureca" / "config.yaml"
OVERRIDES = REPO / "tests" / "profiles" / "slurm-local" / "overrides.yaml"


def merge(base: Any, over: Any) -> Any:
    """Deep merge for profiles: mappings merge key by key, None removes a key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for key, value in over.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value)
        return out
    return copy.deepcopy(over)


def derive_profile(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """profiles/jureca/config.yaml with tests/profiles/slurm-local/overrides.yaml (and ``overrides``) merged in."""
    profile = merge(yaml.safe_load(JURECA.read_text()), yaml.safe_load(OVERRIDES.read_text()))
    profile = merge(profile, overrides or {})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def job_blocks(text: str) -> dict[str, list[str]]:
    """{rule: [the job blocks of a dry run for that rule]}."""
    blocks: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", text):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if m:
            blocks.setdefault(m.group(1), []).append(block)
    return blocks


def resources_of(block: str) -> dict[str, str]:
    m = re.search(r"^\s+resources: (.*)$", block, re.M)
    assert m, block
    # values may contain ", " only inside the mpi launcher, which has no "=" after a comma: split on ", key="
    return dict(re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", m.group(1)))


# ---------------------------------------------------------------------------------------------------------------
# Dry run of the profile as shipped (no Slurm needed).


@pytest.fixture(scope="module")
def jureca_dry_run(tmp_path_factory) -> str:
    work = make_workdir(tmp_path_factory.mktemp("jureca") / "work")
    (work / "jureca").symlink_to("profiles/jureca")  # as at the repository root
    shutil.copy2(REPO / "config.yaml", work / "config.yaml")  # the shipped default; the profile adds jureca.yaml
    proc = run_snakemake(work, "-n", "--printshellcmds", profile="jureca",
                         env={"CYTONET_SLURM_ACCOUNT": "dummyproject"})
    return proc.stdout + proc.stderr


def test_jureca_profile_link_resolves():
    """`snakemake --profile jureca` from the repository root finds ./jureca -> profiles/jureca."""
    link = REPO / "jureca"
    assert link.is_symlink() and link.resolve() == (REPO / "profiles" / "jureca").resolve()


def test_dry_run_pretrain_asks_for_nodes_and_gpus(jureca_dry_run):
    """The pretraining job: N nodes x 4 GPUs, 4 tasks per node, started with srun; the account from the env."""
    blocks = job_blocks(jureca_dry_run)
    assert "Using profile jureca" in jureca_dry_run
    assert len(blocks.get("pretrain", [])) == 1, jureca_dry_run[-3000:]
    res = resources_of(blocks["pretrain"][0])
    assert int(res["nodes"]) >= 2
    assert res["tasks_per_node"] == "4" and res["gres"] == "gpu:4"
    assert res["slurm_partition"] == "dc-gpu" and res["slurm_account"] == "dummyproject"
    assert res["mpi"].startswith("srun --ntasks-per-node=4")
    assert re.search(r"Shell command: srun --ntasks-per-node=4 .*cytonet pretrain", blocks["pretrain"][0])
    profile = yaml.safe_load(JURECA.read_text())
    assert int(res["nodes"]) == profile["set-resources"]["pretrain"]["nodes"]


def test_dry_run_partitions_and_runtime(jureca_dry_run):
    """GPU stages go to dc-gpu with 4 GPUs; every other job to dc-cpu; runtimes are minutes, 1st attempt."""
    blocks = job_blocks(jureca_dry_run)
    assert blocks, jureca_dry_run[-3000:]
    for rule, found in blocks.items():
        if rule == "all":
            continue
        res = resources_of(found[0])
        if rule in ("pretrain", "finetune", "infer"):
            assert res["slurm_partition"] == "dc-gpu" and res["gres"] == "gpu:4", rule
        else:
            assert res["slurm_partition"] == "dc-cpu" and "gres" not in res, rule
        assert int(res["runtime"]) >= 60, rule


def test_dry_run_every_gpu_rule_starts_one_process_per_gpu(jureca_dry_run):
    """A job that asks for gpu:N on a node starts N tasks per node, through srun, before the cytonet command."""
    blocks = job_blocks(jureca_dry_run)
    gpu_rules = []
    for rule, found in blocks.items():
        for block in found:
            res = resources_of(block)
            if "gres" not in res:
                continue
            gpus = int(re.fullmatch(r"gpu:(\d+)", res["gres"]).group(1))
            gpu_rules.append(rule)
            assert res.get("tasks_per_node") == str(gpus), (rule, res)
            assert res["mpi"].startswith(f"srun --ntasks-per-node={gpus} "), (rule, res)
            assert re.search(rf"Shell command: srun --ntasks-per-node={gpus} .*cytonet {rule}\b", block), block
    assert {"pretrain", "finetune", "infer"} <= set(gpu_rules), sorted(set(gpu_rules))


def test_dry_run_infer_maps_a_batch_of_sections_per_job(jureca_dry_run):
    """A brain needs ceil(sections / sections_per_job) inference jobs (4 GPUs x k sections per rank)."""
    from cytonet.io.config import validate_config

    cluster = validate_config(yaml.safe_load((REPO / "config" / "jureca.yaml").read_text()))
    per_job = cluster["infer"]["sections_per_job"]
    assert per_job >= 4 and per_job % 4 == 0
    infer = job_blocks(jureca_dry_run)["infer"]
    shell = [re.search(r"Shell command: (.*)$", b, re.M).group(1) for b in infer]
    images = [len(re.findall(r"--image ", s)) for s in shell]
    sections = yaml.safe_load((REPO / "config.yaml").read_text())["demo"]
    n_brains, per_brain = sections["n_brains"], sections["sections_per_brain"]
    assert len(infer) == n_brains * -(-per_brain // per_job), images
    assert sum(images) == n_brains * per_brain and max(images) <= per_job


def test_runtime_grows_with_attempt(tmp_path):
    """Retries get more time: the profile's runtime expressions are evaluated per attempt."""
    profile = yaml.safe_load(JURECA.read_text())
    for expr in [profile["default-resources"]["runtime"],
                 *(r["runtime"] for r in profile["set-resources"].values() if "runtime" in r)]:
        values = [eval(expr, {"attempt": a}) for a in (1, 2, 3)]
        assert values[0] < values[1] <= values[2] <= 1440, expr


def test_jureca_config_validates():
    from cytonet.io.config import validate_config

    cfg = validate_config(yaml.safe_load((REPO / "config" / "jureca.yaml").read_text()))
    assert cfg["patches"]["patch_px"] == 2048 and cfg["patches"]["pixel_size_um"] == 2
    assert cfg["pretrain"]["encoder"] == "resnet50" and cfg["pretrain"]["samples"] == 1_000_000


# ---------------------------------------------------------------------------------------------------------------
# A real Slurm on this machine.


@pytest.fixture(scope="session")
def local_slurm() -> None:
    """Start Slurm with scripts/local_slurm.sh (idempotent). Skips only where it cannot: not root, or no apt."""
    if os.geteuid() != 0:
        pytest.skip("local Slurm needs root (scripts/local_slurm.sh installs packages and starts daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"scripts/local_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


@pytest.mark.slow
@pytest.mark.slurm
def test_workflow_through_slurm_equals_local_run(local_slurm, tmp_path, tmp_path_factory):
    """The tiny workflow through sbatch (jureca profile, CPU test partition) gives the local run's outputs.

    Inference maps both sections of a brain in one job of 2 srun tasks (one section per rank), finetuning runs 2
    DDP ranks, so every multi-rank path of the GPU rules runs here on CPU (gloo)."""
    config = {**TINY_CONFIG, "infer": {**TINY_CONFIG["infer"], "sections_per_job": 2}}
    work = make_workdir(tmp_path / "work", config)
    profile = derive_profile(tmp_path / "profile", {"configfile": str(work / "config.yaml")})
    proc = run_snakemake(work, profile=profile, timeout=900)
    text = proc.stdout + proc.stderr

    # Every job except the local ones went through sbatch and finished there.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text))
    stats = parse_job_stats(text)
    local = set(re.findall(r"^localrule (\w+):", text, re.M))
    expected = sum(n for rule, n in stats.items() if rule not in local)
    assert expected > 10 and len(submitted) == expected, (stats, local, len(submitted), text[-3000:])
    rules: dict[str, list[dict[str, str]]] = {}
    for slurm_id in submitted.values():
        info = scontrol_job(slurm_id)  # MinJobAge keeps finished jobs listed
        assert info["JobState"] == "COMPLETED", info
        assert info["Partition"] == "debug"
        rule = re.search(r"rule_(\w+?)_wildcards|rule_(\w+)", info.get("Comment", ""))
        name = next(g for g in rule.groups() if g) if rule else "?"
        rules.setdefault(name, []).append(info)
    # Pretraining ran as one job with 2 tasks on one node (srun inside the batch script, gloo between ranks).
    pre = rules.get("pretrain")
    assert pre and len(pre) == 1, sorted(rules)
    assert pre[0]["NumTasks"] == "2" and pre[0]["NumNodes"] == "1"
    metrics = (work / "results" / "pretrain" / "metrics.csv").read_text().splitlines()
    assert len(metrics) - 1 == TINY_STEPS
    # Finetuning and inference: 2 ranks per job as well; one inference job per brain (2 sections each).
    for rule in ("finetune", "infer"):
        assert rules.get(rule) and all(j["NumTasks"] == "2" for j in rules[rule]), (rule, rules.get(rule))
    assert len(rules["infer"]) == len(list((work / "resources" / "demo").glob("*/sections.csv")))

    ref = reference_run(tmp_path_factory)
    assert compare_runs(ref, work) == []


TINY_STEPS = 6
