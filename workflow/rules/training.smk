# Trained models do not depend on later data additions (retrain_on_new_sections: false, the default).
#
# A section added to a brain rebuilds that brain's patch store. pretrain, finetune and evaluate read the stores as
# ancient() inputs, so a rebuilt store alone does not rerun them: the new section gets its mask, its brain's
# store, its maps and the aggregations, and the models stay as they are. What *should* retrain them reaches them
# through a small "training spec" per stage instead, written by the local rule training_spec below: the patch
# parameters and patch-extraction code (the data the models learn from) plus the stage's own parameters and code.
# The spec job has no inputs, so Snakemake always checks its params, and a changed spec reruns the stage through
# an ordinary (not ancient) input. The stage's own params are in its spec too because Snakemake does not check
# the params of a job downstream of a job that reruns: with ancient stores, a pretrain parameter changed in the
# same invocation that rebuilds a store would otherwise be missed until the next invocation.
# A new brain still retrains (its store does not exist yet, so the ancient input is not satisfied), and so does
# a changed brains or areas table (ordinary inputs of finetune and evaluate).
# retrain_on_new_sections: true makes the stores ordinary inputs again: every rebuilt store retrains everything.

# Modules whose code decides what is in a patch store (dask_cluster only decides where it is computed).
PATCH_DATA_CODE = ("patches", "readers", "tables", "transforms")


def training_stores(brains) -> list:
    """The patch-store manifests of ``brains`` as inputs of a training stage (ancient unless configured)."""
    stores = [f"{R}/patches/{b}/manifest.json" for b in brains]
    return stores if config["retrain_on_new_sections"] else [ancient(s) for s in stores]


def training_spec(stage: str) -> dict:
    """What retrains ``stage`` (pretrain, finetune_<model>, evaluate) besides its inputs."""
    spec = {"patches": config["patches"]}
    if stage == "pretrain":
        spec.update(pretrain=config["pretrain"], nproc=config["launch"]["nproc"],
                    code=fingerprint(*PATCH_DATA_CODE, "pretrain", "models", "patchdata", "distributed"))
    elif stage.startswith("finetune_"):
        model = stage[len("finetune_"):]
        finetune = dict(config["finetune"])
        if model == "ablation":
            finetune.update(config["evaluate"]["ablation_finetune"])
        spec.update(model=model, finetune=finetune,
                    code=fingerprint(*PATCH_DATA_CODE, "finetune", "models", "patchdata"))
    elif stage == "evaluate":
        spec.update(evaluate=config["evaluate"], val_fraction=config["finetune"]["val_fraction"],
                    code=fingerprint(*PATCH_DATA_CODE, "evaluate", "baselines", "finetune", "models"))
    else:
        raise ValueError(f"no training spec for stage {stage!r}")
    return spec


localrules:
    training_spec,


rule training_spec:
    output:
        spec=f"{R}/training/{{stage}}.json",
    wildcard_constraints:
        stage="pretrain|evaluate|finetune_[a-z_]+",
    params:
        spec=lambda wc: as_json(training_spec(wc.stage)),
    shell:
        "printf '%s\\n' {params.spec} > {output.spec}"
