"""Any path works: table, image and results paths with spaces, quotes, brackets, non-ASCII letters or shell syntax
reach the `cytonet` commands as single arguments, because every rule shell-quotes what it passes on.

One brain of two tiny PNG sections on a "lab share": the real workflow runs in a temporary copy up to the masks
and the patch store, and a dry run shows the shell command of every other rule.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from workflow_helpers import make_workdir, run_snakemake, tiny_config

pytestmark = pytest.mark.slow

LAB = "Lab Data/Brain 7 [Zürich]"
# One name with quotes of both kinds; one whose shell syntax would create PWNED if a shell ever parsed it.
IMAGES = {"s000": "sec 'one' \"a\".png", "s001": "sec; $(touch PWNED) `touch PWNED`.png"}
RESULTS = "results [run 1]"
BRAINS_TABLE = "Lab Data/brains \"7\".csv"
AREAS_TABLE = "Lab Data/areas (v2).csv"
ABLATION = "it's \"E5\""  # ends up inside a JSON param (training spec) and a --model option
PX_UM = 16.0  # PNG sections carry no pixel size: the sections table gives it (the rules' --pixel-size option)
ANNOTATION = "annot [s000] 'ä'.png"  # labels of s000, so the plan trains (and maps) and every rule is planned


def write_png_section(path: Path, seed: int, shape: tuple[int, int] = (256, 320)) -> None:
    """Bright glass around a dark, textured ellipse of tissue."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    tissue = ((y - shape[0] / 2) / (0.4 * shape[0])) ** 2 + ((x - shape[1] / 2) / (0.4 * shape[1])) ** 2 <= 1
    img = np.where(tissue, 90 + (x * 7 + y * 13) % 60, 235).astype(np.float64) + rng.normal(0, 2, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def write_lab_share(work: Path) -> None:
    """Brains, sections and areas tables plus the section images, all under names that need quoting."""
    lab = work / LAB
    rows = []
    for i, (sid, name) in enumerate(IMAGES.items()):
        write_png_section(lab / name, seed=i)
        affine = [PX_UM / 1000, 0, 0, 0, 0, PX_UM / 1000, 0, 0, 0, 0, 0, 0.02 * i]
        rows.append({"section_id": sid, "image": name, "pixel_size_um": PX_UM, "z_um": 20.0 * i,
                     "transform": " ".join(map(str, affine)), "annotation": ANNOTATION if i == 0 else ""})
    labels = np.zeros((256, 320), np.uint8)
    labels[60:200, 60:160], labels[60:200, 160:260] = 1, 2  # FA | PB inside the tissue ellipse
    Image.fromarray(labels).save(lab / ANNOTATION)
    pd.DataFrame(rows).to_csv(lab / "sections 'b7'.csv", index=False)
    pd.DataFrame({"brain_id": ["b7"], "sections": [f"{Path(LAB).name}/sections 'b7'.csv"], "role": ["known"]}).to_csv(
        work / BRAINS_TABLE, index=False)
    pd.DataFrame({"area_id": [1, 2], "name": ["FA", "PB"], "color": ["#ff0000", "#0000ff"]}).to_csv(
        work / AREAS_TABLE, index=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    cfg = tiny_config(brains=BRAINS_TABLE, areas=AREAS_TABLE, results=RESULTS,
                      evaluate={"ablation_name": ABLATION})
    work = make_workdir(tmp_path_factory.mktemp("paths") / "work dir", cfg)
    write_lab_share(work)
    return work


@pytest.fixture(scope="module")
def run(work: Path) -> Path:
    """Masks of both sections and the brain's patch store, made by the real workflow."""
    targets = [f"{RESULTS}/masks/b7/{sid}.png" for sid in IMAGES] + [f"{RESULTS}/patches/b7/manifest.json"]
    run_snakemake(work, "--cores", "2", *targets)
    return work


@pytest.fixture(scope="module")
def commands(work: Path) -> dict[str, list[list[str]]]:
    """{rule: [argv of each job]} of a dry run of every job, split as a POSIX shell would split them."""
    proc = run_snakemake(work, "-n", "-p", "--forceall", "--cores", "1")
    commands: dict[str, list[list[str]]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif line.startswith("Shell command: ") and rule and line != "Shell command: None":  # None: rule all
            commands.setdefault(rule, []).append(shlex.split(line[len("Shell command: "):]))
    return commands


def test_masks_and_patch_store_are_written(run: Path):
    for sid in IMAGES:
        mask = np.asarray(Image.open(run / RESULTS / "masks" / "b7" / f"{sid}.png"))
        assert mask.shape == (128, 160)  # 256 x 320 px at 16 µm, masked at 32 µm
        assert 0.2 < (mask > 0).mean() < 0.7, f"{sid}: the tissue ellipse covers about half of the section"
    store = run / RESULTS / "patches" / "b7"
    assert json.loads((store / "manifest.json").read_text())
    table = pd.read_parquet(store / "patches.parquet")
    assert set(table["section"]) == set(IMAGES) and set(table["brain"]) == {"b7"}


def test_shell_syntax_in_a_file_name_runs_nothing(run: Path):
    assert (run / LAB / IMAGES["s001"]).is_file()  # the name reached cytonet as a name...
    assert not [p for p in run.parent.rglob("PWNED")], "a file name was run as a shell command"
    log = (run / RESULTS / "logs" / "mask" / "b7" / "s001.log").read_text()
    assert "Traceback" not in log


def redirects(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, token in enumerate(argv[:-1]) if token in (">", "2>")]


def test_every_rule_passes_each_path_as_one_argument(work: Path, commands: dict[str, list[list[str]]]):
    mask = {argv[argv.index("--section-id") + 1]: argv for argv in commands["mask"]}
    for sid, name in IMAGES.items():
        argv = mask[sid]
        assert argv[:3] == ["cytonet", "mask", str(work / LAB / name)]
        assert argv[argv.index("-o") + 1] == f"{RESULTS}/masks/b7/{sid}.png"
        assert argv[argv.index("--pixel-size") + 1] == str(PX_UM)
        infer = next(a for a in commands["infer"] if a[a.index("--name") + 1] == sid)
        assert infer[infer.index("--image") + 1] == str(work / LAB / name)
    (patches,) = commands["patches"]
    assert patches[patches.index("--brains-table") + 1] == BRAINS_TABLE
    assert patches[patches.index("--areas") + 1] == AREAS_TABLE
    assert patches[patches.index("--masks-dir") + 1] == f"{RESULTS}/masks/b7"
    (pretrain,) = commands["pretrain"]
    assert pretrain[pretrain.index("--store") + 1] == f"{RESULTS}/patches/b7"
    (evaluate,) = commands["evaluate"]
    assert f"{ABLATION}={RESULTS}/finetune/ablation/seed0/classifier.pt" in evaluate
    for rule, jobs in commands.items():
        for argv in jobs:
            assert any(r.startswith(f"{RESULTS}/logs/") for r in redirects(argv)), f"{rule}: {argv}"


def test_json_params_with_quotes_stay_one_argument(commands: dict[str, list[list[str]]]):
    specs = {redirects(argv)[0]: argv for argv in commands["training_spec"]}
    argv = specs[f"{RESULTS}/training/evaluate.json"]
    assert argv[:2] == ["printf", "%s\\n"]
    assert json.loads(argv[2])["evaluate"]["ablation_name"] == ABLATION
