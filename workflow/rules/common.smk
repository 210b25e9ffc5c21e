# Shared planning: which brains and sections exist, where their images are, which models and seeds are compared,
# and every helper function the rules call. The rule files hold rules only (`snakemake --lint` asks for that), so
# each helper sits here under the heading of the rule file that uses it.
import json
import os
import shlex
import sys

import pandas as pd

from cytonet.io.fingerprint import fingerprint_modules, fingerprint_stage, import_closure, stage_module
from cytonet.io.plan import TRAINED_MODELS, check_plan, plan_stages
from cytonet.io.tables import load_all_sections

# The compared models (finetune.smk) and their seeds; the wildcard constraints below need them.
MODELS = list(TRAINED_MODELS)
SEEDS = config["evaluate"]["seeds"]


wildcard_constraints:
    brain="[A-Za-z0-9_-]+",
    section="[A-Za-z0-9_-]+",
    model="|".join(MODELS),
    seed=r"\d+",


# The generator's own parameters: the demo section without the workflow's `enabled` switch.
DEMO_PARAMS = {k: v for k, v in config["demo"].items() if k != "enabled"}


def _plan_sections() -> pd.DataFrame:
    """One row per section: brain_id, section_id, role, image, pixel_size_um (NaN when the metadata has it) and
    annotation (the labels' path; for the demo a marker of the sections that will ship labels)."""
    if config["demo"]["enabled"]:
        # The demo brains do not exist before their jobs run, so plan from the generator's layout.
        from cytonet.synth import DemoParams, layout
        from cytonet.synth.demo import annotated

        out = config["demo"]["out_dir"]
        params = DemoParams.from_cfg(DEMO_PARAMS)
        rows = [
            {
                "brain_id": b,
                "section_id": s,
                "role": params.role(b),
                "image": f"{out}/{b}/images/{s}.ome.tif",
                "pixel_size_um": float("nan"),
                "annotation": "(demo labels)" if annotated(params, b, i) else None,
            }
            for b, sections in layout(DEMO_PARAMS).items()
            for i, s in enumerate(sections)
        ]
        return pd.DataFrame(rows)
    # Real data: validate every table now, so a missing image or a duplicate id stops the run before any job.
    return load_all_sections(config["brains"], check_files=True, section_thickness_um=config["section_thickness_um"])


SECTIONS = _plan_sections()
BRAINS = sorted(SECTIONS.brain_id.unique())


def sections_of(brain: str) -> list[str]:
    return SECTIONS.loc[SECTIONS.brain_id == brain, "section_id"].tolist()


def section_row(wildcards):
    row = SECTIONS[(SECTIONS.brain_id == wildcards.brain) & (SECTIONS.section_id == wildcards.section)]
    if row.empty:
        raise ValueError(f"unknown section '{wildcards.section}' of brain '{wildcards.brain}'")
    return row.iloc[0]


def section_image(wildcards) -> str:
    return section_row(wildcards).image


# Shell quoting. Paths come from the user's tables (spaces, quotes, `;`, `$(...)` are all legal in a file name).
# Shell commands therefore take every path as `{input.x:q}` (`:q` quotes each element of a list), and a param
# that holds whole options is built by these helpers, every value shell-quoted (shlex.quote leaves a plain value
# such as results/patches/b1 as it is, so the usual commands read as before).
def option(flag: str, value) -> str:
    """`flag VALUE` with the value shell-quoted."""
    return f"{flag} {shlex.quote(str(value))}"


def options(flag: str, values) -> str:
    """`flag V1 flag V2 ...`: the option once per value, every value shell-quoted."""
    return " ".join(option(flag, v) for v in values)


def option_groups(flags, *columns) -> str:
    """One group of options per row of ``columns``, e.g. option_groups(["--classifier", "--out"], cs, outs) gives
    `--classifier C1 --out O1 --classifier C2 --out O2`, every value shell-quoted."""
    return " ".join(
        option(flag, value) for row in zip(*columns, strict=True) for flag, value in zip(flags, row, strict=True)
    )


def pixel_size_option(wildcards) -> str:
    """`--pixel-size UM` from the sections table, or nothing when the image metadata carries it."""
    value = section_row(wildcards).pixel_size_um
    return "" if pd.isna(value) else option("--pixel-size", float(value))


def as_json(section: dict) -> str:
    """A config section as one shell-quoted JSON argument (params: so that changes trigger reruns)."""
    return shlex.quote(json.dumps(section, sort_keys=True))


def brains_table() -> str:
    return f"{config['demo']['out_dir']}/brains.csv" if config["demo"]["enabled"] else config["brains"]


def areas_table() -> str:
    return f"{config['demo']['out_dir']}/areas.csv" if config["demo"]["enabled"] else config["areas"]


# --- the plan: which stages run, and why (cytonet/io/plan.py; `cytonet validate` prints the same) ---------------
# USER_CONFIG (the Snakefile) is the config as written, before defaults: infer.models set by the user while no
# section is annotated is refused, the default is not. An impossible plan stops here, before any job.
PLAN = plan_stages(config, SECTIONS)
check_plan(PLAN, config, areas=areas_table(), user_config=USER_CONFIG, sections=SECTIONS)
BUNDLE = PLAN.bundle.rstrip("/") if PLAN.bundle else None
print(f"CytoNet {PLAN.line()}", file=sys.stderr)


def planned(stage: str, targets) -> list:
    """``targets`` when the plan runs ``stage``, else nothing (rule all asks only for what the plan runs)."""
    return list(targets) if PLAN.runs(stage) else []


# --- demo.smk -----------------------------------------------------------------------------------------------------
DEMO = config["demo"]["out_dir"]


def demo_outputs() -> list[str]:
    if not config["demo"]["enabled"]:
        return []
    return [f"{DEMO}/brains.csv", *[f"{DEMO}/previews/{b}.png" for b in BRAINS]]


# --- mask.smk, patches.smk ----------------------------------------------------------------------------------------
def all_masks() -> list[str]:
    return [f"{R}/masks/{b}/{s}.png" for b in BRAINS for s in sections_of(b)]


def all_patch_stores() -> list[str]:
    return [f"{R}/patches/{b}/manifest.json" for b in BRAINS]


# --- training.smk (why the training stages read ancient stores and a training spec: see there) --------------------
# The code that decides what is in a patch store: the import closure of `cytonet patches`, less the Dask cluster
# module, which only decides where the store is computed (an edit there rebuilds stores but retrains nothing).
PATCH_DATA_CODE = import_closure(stage_module("patches")) - {"cytonet.preprocess.dask_cluster"}


def training_code(stage: str) -> str:
    """Fingerprint of what a trained model depends on: the patch-data code plus the stage's own import closure."""
    return fingerprint_modules(PATCH_DATA_CODE | import_closure(stage_module(stage)))


def training_stores(brains) -> list:
    """The patch-store manifests of ``brains`` as inputs of a training stage (ancient unless configured)."""
    stores = [f"{R}/patches/{b}/manifest.json" for b in brains]
    return stores if config["retrain_on_new_sections"] else [ancient(s) for s in stores]


def training_spec(stage: str) -> dict:
    """What retrains ``stage`` (pretrain, finetune_<model>, evaluate) besides its inputs.

    The code fingerprints come from TRAINING_CODE, defined in training.smk beside the rule that writes the specs.
    """
    spec = {"patches": config["patches"]}
    if stage == "pretrain":
        spec.update(pretrain=config["pretrain"], nproc=config["launch"]["nproc"], code=TRAINING_CODE["pretrain"])
    elif stage.startswith("finetune_"):
        model = stage[len("finetune_") :]
        spec.update(model=model, finetune=finetune_config(model), code=TRAINING_CODE["finetune"])
    elif stage == "evaluate":
        spec.update(
            evaluate=config["evaluate"],
            val_fraction=config["finetune"]["val_fraction"],
            code=TRAINING_CODE["evaluate"],
        )
    else:
        raise ValueError(f"no training spec for stage {stage!r}")
    return spec


# --- finetune.smk, evaluate.smk -----------------------------------------------------------------------------------
def known_brains() -> list[str]:
    return sorted(SECTIONS.loc[SECTIONS.role == "known", "brain_id"].unique())


def finetune_config(model: str) -> dict:
    """The finetune recipe of ``model``: the ablation changes the keys of evaluate.ablation_finetune."""
    recipe = dict(config["finetune"])
    if model == "ablation":
        recipe.update(config["evaluate"]["ablation_finetune"])
    return recipe


def finetune_params(wildcards) -> str:
    return as_json(dict(finetune_config(wildcards.model), seed=int(wildcards.seed)))


MODEL_NAMES = {"cytonet": "CytoNet", "random_init": "random init", "ablation": config["evaluate"]["ablation_name"]}


def model_specs(wildcards, input) -> str:
    """`--model 'NAME=CLASSIFIER'` per compared model and seed (names may hold spaces: shell-quoted)."""
    specs = [f"{MODEL_NAMES[m]}={R}/finetune/{m}/seed{s}/classifier.pt" for m in MODELS for s in SEEDS]
    return options("--model", specs)


# --- infer.smk, metrics.smk ---------------------------------------------------------------------------------------
# The trained models of infer.models, or with a bundle one model whose maps go where CytoNet's go (maps/cytonet).
MAP_MODELS = list(PLAN.map_models)
METRIC_MODELS = MAP_MODELS + (["cytonet_smooth3d"] if PLAN.runs("smooth3d") else [])


def map_model_files() -> list[str]:
    """What an infer job reads besides the section: the bundle's two files, or each mapped model's classifier."""
    if BUNDLE:
        return [f"{BUNDLE}/model_card.json", f"{BUNDLE}/weights.safetensors"]
    return [f"{R}/finetune/{m}/seed{SEEDS[0]}/classifier.pt" for m in MAP_MODELS]


def infer_model_options(wildcards, input, output) -> str:
    """`--model BUNDLE --out DIR`, or one `--classifier C --out DIR` pair per model (in MAP_MODELS order)."""
    outs = [os.path.dirname(m) for m in output.manifests]
    if BUNDLE:
        return option_groups(["--model", "--out"], [os.path.dirname(input.models[0])], outs)
    return option_groups(["--classifier", "--out"], input.models, outs)


def all_maps() -> list[str]:
    return [f"{R}/maps/{m}/{b}/{s}_infer.json" for m in MAP_MODELS for b in BRAINS for s in sections_of(b)]


def all_section_metrics() -> list[str]:
    return [f"{R}/metrics/{m}/{b}/{s}.json" for m in METRIC_MODELS for b in BRAINS for s in sections_of(b)]
