# CytoNet: map cytoarchitectonic areas in whole histological sections.
#
#   snakemake --profile profiles/local        one machine (make demo does this on the demo brains)
#
# The science lives in the `cytonet` package; each rule calls one `cytonet <stage>` command and passes its
# config section through `params:`, so a changed value reruns exactly the stages that use it.

from cytonet.io.config import validate_config


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


# Validate before any job starts: unknown keys and wrong types stop here, naming the key. Defaults are filled in.
# USER_CONFIG keeps the keys as written (the plan in common.smk tells a user's choice from a default).
USER_CONFIG = dict(config)
_validated = validate_config(config)
config.clear()
config.update(_validated)

R = config["results"].rstrip("/")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/report.smk"


# What the plan runs (common.smk, cytonet/io/plan.py): everything with annotated sections; mask, patches, pretrain
# and embed without any; mask, infer and the metrics with `model: BUNDLE`.
rule all:
    default_target: True
    input:
        demo_outputs(),
        planned("mask", all_masks()),
        planned("patches", all_patch_stores()),
        planned("pretrain", rules.pretrain.output),
        planned("finetune", expand(f"{R}/finetune/{{model}}/seed{{seed}}/classifier.pt", model=MODELS, seed=SEEDS)),
        planned("evaluate", rules.evaluate.output),
        planned("infer", all_maps()),
        planned("aggregate", rules.aggregate.output),
        planned("embed", rules.embed.output),
        planned("benchmarks_page", rules.benchmarks_page.output),
