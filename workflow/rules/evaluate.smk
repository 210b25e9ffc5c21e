# The known-vs-unknown-brain comparison on patches: CytoNet (SpatialNCE + finetune), the same encoder from random
# init, the ablation and the laminar-profile baseline, each over evaluate.seeds.
MODEL_NAMES = {"cytonet": "CytoNet", "random_init": "random init", "ablation": config["evaluate"]["ablation_name"]}


def model_specs(wildcards, input) -> str:
    return " ".join(
        f"--model '{MODEL_NAMES[m]}={R}/finetune/{m}/seed{s}/classifier.pt'" for m in MODELS for s in SEEDS
    )


rule evaluate:
    input:
        classifiers=expand(f"{R}/finetune/{{model}}/seed{{seed}}/classifier.pt", model=MODELS, seed=SEEDS),
        stores=training_stores(BRAINS),  # ancient unless retrain_on_new_sections (training.smk)
        spec=f"{R}/training/evaluate.json",
        brains=brains_table(),
        areas=areas_table(),
    output:
        summary=f"{R}/evaluation/summary.md",
        table=report(f"{R}/evaluation/summary.csv", caption="../report/evaluation.rst", category="2. Evaluation"),
        metrics=f"{R}/evaluation/metrics.csv",
        plot=report(f"{R}/evaluation/macro_f1.png", caption="../report/evaluation_plot.rst", category="2. Evaluation"),
    params:
        models=model_specs,
        stores=lambda wc, input: " ".join(f"--store {os.path.dirname(m)}" for m in input.stores),
        seeds=" ".join(str(s) for s in SEEDS),
        val_fraction=config["finetune"]["val_fraction"],
        out=f"{R}/evaluation",
        code=fingerprint("evaluate", "baselines", "finetune", "models"),
    threads: config["threads"]["evaluate"]
    log:
        f"{R}/logs/evaluate.log",
    shell:
        "cytonet evaluate --brains {input.brains} --areas {input.areas} {params.stores} {params.models}"
        " --profile-baseline-seeds {params.seeds} --profile-baseline-val-fraction {params.val_fraction}"
        " --out {params.out} --threads {threads} --no-progress > {log} 2>&1"
