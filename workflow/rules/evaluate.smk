# The known-vs-unknown-brain comparison on patches: CytoNet (SpatialNCE + finetune), the same encoder from random
# init, the ablation and the laminar-profile baseline, each over evaluate.seeds.
# MODEL_NAMES and model_specs(): common.smk.


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
    log:
        f"{R}/logs/evaluate.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["evaluate"]
    params:
        models=model_specs,
        stores=lambda wc, input: options("--store", [os.path.dirname(m) for m in input.stores]),
        seeds=" ".join(str(s) for s in SEEDS),
        val_fraction=config["finetune"]["val_fraction"],
        out=lambda wc, output: os.path.dirname(output.summary),
        code=fingerprint_stage("evaluate"),
    shell:
        "cytonet evaluate --brains {input.brains:q} --areas {input.areas:q} {params.stores} {params.models}"
        " --profile-baseline-seeds {params.seeds} --profile-baseline-val-fraction {params.val_fraction}"
        " --out {params.out:q} --threads {threads} > {log:q} 2>&1"
