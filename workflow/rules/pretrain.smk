# SpatialNCE pretraining: one (distributed) job over the patch stores of every brain. It needs no labels, so the
# unknown brains take part. The job resumes from its newest checkpoint if it was killed.


rule pretrain:
    input:
        stores=training_stores(BRAINS),  # ancient: a rebuilt store alone does not retrain (training.smk)
        spec=f"{R}/training/pretrain.json",
    output:
        encoder=f"{R}/pretrain/encoder.pt",
    log:
        f"{R}/logs/pretrain.log",
    priority: 10  # on the critical path: finetuning, inference and the embedding wait for it
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["pretrain"]
    resources:
        # Empty locally. The jureca profile sets it to the srun line that starts one rank per GPU on every node
        # of the job (a Slurm job with an `mpi` resource runs its command in the batch script, without srun -n1).
        mpi="",
    params:
        stores=lambda wc, input: options("--store", [os.path.dirname(m) for m in input.stores]),
        pretrain=as_json(config["pretrain"]),
        out=lambda wc, output: os.path.dirname(output.encoder),
        nproc=config["launch"]["nproc"],
        code=fingerprint_stage("pretrain"),
    shell:
        "{resources.mpi} cytonet pretrain {params.stores} --out {params.out:q} --params {params.pretrain}"
        " --nproc {params.nproc} --threads {threads} > {log:q} 2>&1"
