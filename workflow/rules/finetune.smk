# Finetuning: area classifiers trained on the annotated sections of the known brains, one job per compared model
# and seed. "cytonet" starts from the SpatialNCE encoder, "random_init" from scratch with the same recipe, and
# "ablation" is CytoNet with the finetune keys of evaluate.ablation_finetune changed.
# MODELS, SEEDS (and the model/seed wildcard constraints), known_brains(), finetune_params(): common.smk.
# A job trains on every rank it gets: srun tasks under Slurm (the profile's mpi resource), or launch.finetune_nproc
# local ranks; finetune.batch_size is the global batch, so the classifier does not depend on the rank count.


rule finetune:
    input:
        stores=lambda wc: training_stores(known_brains()),  # ancient unless retrain_on_new_sections (training.smk)
        spec=f"{R}/training/finetune_{{model}}.json",
        encoder=lambda wc: [] if wc.model == "random_init" else [f"{R}/pretrain/encoder.pt"],
        brains=brains_table(),
        areas=areas_table(),
    output:
        classifier=f"{R}/finetune/{{model}}/seed{{seed}}/classifier.pt",
    log:
        f"{R}/logs/finetune/{{model}}_seed{{seed}}.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["finetune"]
    resources:
        # Empty locally. The jureca profile sets it to the srun line that starts one rank per GPU of the job's
        # node (like pretrain's); each rank trains on its share of every global batch (DDP).
        mpi="",
    params:
        stores=lambda wc, input: options("--store", [os.path.dirname(m) for m in input.stores]),
        encoder=lambda wc, input: options("--encoder-checkpoint", input.encoder[:1]),
        finetune=finetune_params,
        out=lambda wc, output: os.path.dirname(output.classifier),
        nproc=config["launch"]["finetune_nproc"],
        code=fingerprint_stage("finetune"),
    shell:
        "{resources.mpi} cytonet finetune {params.stores} {params.encoder} --out {params.out:q}"
        " --areas {input.areas:q} --brains {input.brains:q} --params {params.finetune}"
        " --nproc {params.nproc} --threads {threads} > {log:q} 2>&1"
