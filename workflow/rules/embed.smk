# Embedding analysis: UMAP of the SpatialNCE features on a stratified sample of patches of every brain.


rule embed:
    input:
        encoder=f"{R}/pretrain/encoder.pt",
        stores=expand(f"{R}/patches/{{brain}}/manifest.json", brain=BRAINS),
        brains=brains_table(),
        areas=areas_table(),
    output:
        by_area=f"{R}/embedding/umap_by_area.png",
        by_brain=f"{R}/embedding/umap_by_brain.png",
        by_position=f"{R}/embedding/umap_by_position.png",
        fa_pb=f"{R}/embedding/umap_fa_pb.png",
        separation=f"{R}/embedding/separation.md",
    params:
        stores=lambda wc, input: " ".join(f"--store {os.path.dirname(m)}" for m in input.stores),
        per_area=config["embed"]["per_area"],
        seed=config["embed"]["seed"],
        features=config["embed"]["features"],
        out=f"{R}/embedding",
        code=fingerprint("embed", "pretrain", "models"),
    threads: config["threads"]["embed"]
    log:
        f"{R}/logs/embed.log",
    shell:
        "cytonet embed --encoder {input.encoder} {params.stores} --areas {input.areas} --brains {input.brains}"
        " --out {params.out} --per-area {params.per_area} --seed {params.seed} --features {params.features}"
        " --threads {threads} --quiet > {log} 2>&1"
