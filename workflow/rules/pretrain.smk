# SpatialNCE pretraining: one (distributed) job over the patch stores of every brain. It needs no labels, so the
# unknown brains take part. The job resumes from its newest checkpoint if it was killed.


rule pretrain:
    input:
        stores=expand(f"{R}/patches/{{brain}}/manifest.json", brain=BRAINS),
    output:
        encoder=f"{R}/pretrain/encoder.pt",
    params:
        stores=lambda wc, input: " ".join(f"--store {os.path.dirname(m)}" for m in input.stores),
        pretrain=as_json(config["pretrain"]),
        out=f"{R}/pretrain",
        nproc=config["launch"]["nproc"],
        code=fingerprint("pretrain", "models", "patchdata", "distributed"),
    threads: config["threads"]["pretrain"]
    log:
        f"{R}/logs/pretrain.log",
    shell:
        "cytonet pretrain {params.stores} --out {params.out} --params {params.pretrain}"
        " --nproc {params.nproc} --threads {threads} --no-progress > {log} 2>&1"
