# Patch extraction: one sharded Zarr v3 store + Parquet table per brain. manifest.json is written last and
# marks the store complete, so it is the declared output. all_patch_stores(): common.smk.


rule patches:
    input:
        masks=lambda wc: [f"{R}/masks/{wc.brain}/{s}.png" for s in sections_of(wc.brain)],
        images=lambda wc: SECTIONS.loc[SECTIONS.brain_id == wc.brain, "image"].tolist(),
        brains=brains_table(),
        areas=areas_table(),
    output:
        manifest=f"{R}/patches/{{brain}}/manifest.json",
    log:
        f"{R}/logs/patches/{{brain}}.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["patches"]
    params:
        patches=as_json(config["patches"]),
        dask=as_json(config["dask"]),  # where the Dask workers run (LocalCluster of {threads}, or Slurm jobs)
        out=lambda wc, output: os.path.dirname(output.manifest),
        masks=lambda wc, input: os.path.dirname(input.masks[0]),
        code=fingerprint_stage("patches"),
    shell:
        "cytonet patches --brain {wildcards.brain:q} --brains-table {input.brains:q} --areas {input.areas:q}"
        " --masks-dir {params.masks:q} --out {params.out:q} --threads {threads} --dask {params.dask}"
        " --params {params.patches} > {log:q} 2>&1"
