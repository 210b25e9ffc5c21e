# Shared planning: which brains and sections exist, where their images are, which models and seeds are compared,
# and every helper function the rules call. The rule files hold rules only (`snakemake --lint` asks for that), so
# each helper sits here under the heading of the rule file that uses it.
import json
import os

import pandas as pd

from cytonet.io.fingerprint import fingerprint_modules, fingerprint_stage, import_closure, stage_module
from cytonet.io.tables import load_all_sections

# The compared models (finetune.smk) and their seeds; the wildcard constraints below need them.
MODELS = ["cytonet", "random_init", "ablation"]
SEEDS = config["evaluate"]["seeds"]


wildcard_constraints:
    brain="[A-Za-z0-9_-]+",
    section="[A-Za-z0-9_-]+",
    model="|".join(MODELS),
    seed=r"\d+",


# The generator's own parameters: the demo section without the workflow's `enabled` switch.
DEMO_PARAMS = {k: v for k, v in config["demo"].items() if k != "enabled"}


def _plan_sections() -> pd.DataFrame:
    """One row per section: brain_id, section_id, role, image, pixel_size_um (NaN when the metadata has it)."""
    if config["demo"]["enabled"]:
        # The demo brains do not exist before their jobs run, so plan from the generator's layout.
        from cytonet.synth import DemoParams, layout

        out = config["demo"]["out_dir"]
        role = DemoParams.from_cfg(DEMO_PARAMS).role
        rows = [
            {
                "brain_id": b,
                "section_id": s,
                "role": role(b),
                "image": f"{out}/{b}/images/{s}.ome.tif",
                "pixel_size_um": float("nan"),
            }
            for b, sections in layout(DEMO_PARAMS).items()
            for s in sections
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


def pixel_size_option(wildcards) -> str:
    """`--pixel-size UM` from the sections table, or nothing when the image metadata carries it."""
    value = section_row(wildcards).pixel_size_um
    return "" if pd.isna(value) else f"--pixel-size {float(value)}"


def as_json(section: dict) -> str:
    """A config section as one shell-quoted JSON argument (params: so that changes trigger reruns)."""
    return f"'{json.dumps(section, sort_keys=True)}'"


def brains_table() -> str:
    return f"{config['demo']['out_dir']}/brains.csv" if config["demo"]["enabled"] else config["brains"]


def areas_table() -> str:
    return f"{config['demo']['out_dir']}/areas.csv" if config["demo"]["enabled"] else config["areas"]


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
        finetune = dict(config["finetune"])
        if model == "ablation":
            finetune.update(config["evaluate"]["ablation_finetune"])
        spec.update(model=model, finetune=finetune, code=TRAINING_CODE["finetune"])
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


def finetune_params(wildcards) -> str:
    params = dict(config["finetune"], seed=int(wildcards.seed))
    if wildcards.model == "ablation":
        params.update(config["evaluate"]["ablation_finetune"])
    return as_json(params)


MODEL_NAMES = {"cytonet": "CytoNet", "random_init": "random init", "ablation": config["evaluate"]["ablation_name"]}


def model_specs(wildcards, input) -> str:
    return " ".join(f"--model '{MODEL_NAMES[m]}={R}/finetune/{m}/seed{s}/classifier.pt'" for m in MODELS for s in SEEDS)


# --- infer.smk, metrics.smk ---------------------------------------------------------------------------------------
MAP_MODELS = config["infer"]["models"]
METRIC_MODELS = MAP_MODELS + (["cytonet_smooth3d"] if config["smooth3d"]["enabled"] else [])


def all_maps() -> list[str]:
    return [f"{R}/maps/{m}/{b}/{s}_infer.json" for m in MAP_MODELS for b in BRAINS for s in sections_of(b)]


def all_section_metrics() -> list[str]:
    return [f"{R}/metrics/{m}/{b}/{s}.json" for m in METRIC_MODELS for b in BRAINS for s in sections_of(b)]
