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
    batch=r"\d{4}",
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
# infer.sections_per_job > 1: one infer job per batch of that many sections of a brain (consecutive in its
# sections table). A job can declare only outputs named by its wildcards, so a batch job declares its batch
# manifest, and the local rule infer_section writes each section's <section>_infer.json from it. With 1 the job is
# the section and declares its manifests itself.
SECTIONS_PER_JOB = config["infer"]["sections_per_job"]
INFER_BATCHED = SECTIONS_PER_JOB > 1


def map_model_files() -> list[str]:
    """What an infer job reads besides the section: the bundle's two files, or each mapped model's classifier."""
    if BUNDLE:
        return [f"{BUNDLE}/model_card.json", f"{BUNDLE}/weights.safetensors"]
    return [f"{R}/finetune/{m}/seed{SEEDS[0]}/classifier.pt" for m in MAP_MODELS]


def infer_batches(brain: str) -> list[list[str]]:
    """The sections of ``brain`` in batches of infer.sections_per_job (the last one may be shorter)."""
    sections = sections_of(brain)
    return [sections[k : k + SECTIONS_PER_JOB] for k in range(0, len(sections), SECTIONS_PER_JOB)]


def infer_batch_file(wildcards) -> str:
    """The batch manifest of the batch that holds ``wildcards.section``."""
    section_row(wildcards)  # an unknown section stops here, named
    k = next(k for k, batch in enumerate(infer_batches(wildcards.brain)) if wildcards.section in batch)
    return f"{R}/infer_batches/{wildcards.brain}/{k:04d}.json"


def infer_sections(wildcards) -> list[str]:
    """The sections an infer job maps: its section, or its batch."""
    if not INFER_BATCHED:
        return [wildcards.section]
    batches = infer_batches(wildcards.brain)
    if int(wildcards.batch) >= len(batches):
        raise ValueError(f"brain '{wildcards.brain}' has {len(batches)} inference batches, not {wildcards.batch}")
    return batches[int(wildcards.batch)]


def infer_rows(wildcards) -> pd.DataFrame:
    """The sections-table rows of the sections an infer job maps, in order."""
    if not INFER_BATCHED:
        return section_row(wildcards).to_frame().T
    rows = SECTIONS[SECTIONS.brain_id == wildcards.brain].set_index("section_id", drop=False)
    return rows.loc[infer_sections(wildcards)]


def infer_images(wildcards) -> list[str]:
    return list(infer_rows(wildcards).image)


def infer_masks(wildcards) -> list[str]:
    return [f"{R}/masks/{wildcards.brain}/{s}.png" for s in infer_sections(wildcards)]


def infer_section_options(wildcards, input) -> str:
    """`--image I --mask M --name S` per section, plus `--pixel-size` per section when any needs one."""
    rows = infer_rows(wildcards)
    out = option_groups(["--image", "--mask", "--name"], input.images, input.masks, rows.section_id)
    if rows.pixel_size_um.isna().all():
        return out
    sizes = options("--pixel-size", ["auto" if pd.isna(v) else float(v) for v in rows.pixel_size_um])
    return f"{out} {sizes}"


def infer_model_options(wildcards, input) -> str:
    """`--model BUNDLE --out DIR`, or one `--classifier C --out DIR` pair per model (in MAP_MODELS order)."""
    outs = [f"{R}/maps/{m}/{wildcards.brain}" for m in MAP_MODELS]
    if BUNDLE:
        return option_groups(["--model", "--out"], [os.path.dirname(input.models[0])], outs)
    return option_groups(["--classifier", "--out"], input.models, outs)


def infer_pipeline_options() -> str:
    """Tile batches and NHWC (infer.tile_batch, infer.channels_last); prefetching keeps the CLI default."""
    nhwc = {"auto": "auto", True: "on", False: "off"}[config["infer"]["channels_last"]]
    return f"--tile-batch {config['infer']['tile_batch']} --channels-last {nhwc}"


# What an infer job declares: its section's manifests, or its batch manifest (then infer_section publishes them).
if INFER_BATCHED:
    INFER_OUTPUT = {"batch": f"{R}/infer_batches/{{brain}}/{{batch}}.json"}
    INFER_LOG = f"{R}/logs/infer/{{brain}}/batch{{batch}}.log"
else:
    INFER_OUTPUT = {"manifests": [f"{R}/maps/{m}/{{brain}}/{{section}}_infer.json" for m in MAP_MODELS]}
    INFER_LOG = f"{R}/logs/infer/{{brain}}/{{section}}.log"


def batch_manifest_option(wildcards, output) -> str:
    return option("--batch-manifest", output.batch) if INFER_BATCHED else ""


def publish_section_manifests(batch: str, section: str, manifests, log: str) -> None:
    """infer_section: the section's manifests from its batch manifest (cytonet.mapping.batch; no torch)."""
    from cytonet.mapping.batch import publish_section

    written = publish_section(batch, section, list(manifests))
    with open(log, "w") as fh:
        fh.writelines(f"{path}: from {batch}\n" for path in written)


def all_maps() -> list[str]:
    return [f"{R}/maps/{m}/{b}/{s}_infer.json" for m in MAP_MODELS for b in BRAINS for s in sections_of(b)]


def all_section_metrics() -> list[str]:
    return [f"{R}/metrics/{m}/{b}/{s}.json" for m in METRIC_MODELS for b in BRAINS for s in sections_of(b)]
