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

# The helpers (PATCH_DATA_CODE, training_code, training_stores, training_spec) are in common.smk. What each
# training spec fingerprints: the patch-data code plus the import closure of the stage's own command.
TRAINING_CODE = {
    "pretrain": training_code("pretrain"),
    "finetune": training_code("finetune"),
    "evaluate": training_code("evaluate"),
}


localrules:
    training_spec,


rule training_spec:
    output:
        spec=f"{R}/training/{{stage}}.json",
    log:
        f"{R}/logs/training/{{stage}}.log",
    wildcard_constraints:
        stage="pretrain|evaluate|finetune_[a-z_]+",
    conda:
        # printf needs no package; the workflow's one environment keeps every rule's software declared
        "../../envs/cytonet.yaml"
    params:
        spec=lambda wc: as_json(training_spec(wc.stage)),
    shell:
        "printf '%s\\n' {params.spec} > {output.spec:q} 2> {log:q}"
