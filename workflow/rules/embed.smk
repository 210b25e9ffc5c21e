# Embedding analysis: UMAP of the SpatialNCE features on a stratified sample of patches of every brain.


rule embed:
    input:
        encoder=f"{R}/pretrain/encoder.pt",
        stores=expand(f"{R}/patches/{{brain}}/manifest.json", brain=BRAINS),
        brains=brains_table(),
        areas=areas_table(),
    output:
        by_area=report(f"{R}/embedding/umap_by_area.png", caption="../report/umap.rst", category="4. Embedding"),
        by_brain=report(f"{R}/embedding/umap_by_brain.png", caption="../report/umap.rst", category="4. Embedding"),
        by_position=report(f"{R}/embedding/umap_by_position.png", caption="../report/umap.rst", category="4. Embedding"),
        fa_pb=report(f"{R}/embedding/umap_fa_pb.png", caption="../report/umap.rst", category="4. Embedding"),
        separation=f"{R}/embedding/separation.md",
        separation_json=report(
            f"{R}/embedding/separation.json", caption="../report/separation.rst", category="4. Embedding"
        ),
    log:
        f"{R}/logs/embed.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["embed"]
    params:
        stores=lambda wc, input: options("--store", [os.path.dirname(m) for m in input.stores]),
        per_area=config["embed"]["per_area"],
        seed=config["embed"]["seed"],
        features=config["embed"]["features"],
        out=lambda wc, output: os.path.dirname(output.separation),
        code=fingerprint_stage("embed"),
    shell:
        "cytonet embed --encoder {input.encoder:q} {params.stores} --areas {input.areas:q} --brains {input.brains:q}"
        " --out {params.out:q} --per-area {params.per_area} --seed {params.seed} --features {params.features:q}"
        " --threads {threads} > {log:q} 2>&1"
