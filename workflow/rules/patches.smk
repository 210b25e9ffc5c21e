# Patch extraction: one sharded Zarr v3 store + Parquet table per brain. manifest.json is written last and
# marks the store complete, so it is the declared output.


def all_patch_stores() -> list[str]:
    return [f"{R}/patches/{b}/manifest.json" for b in BRAINS]


rule patches:
    input:
        masks=lambda wc: [f"{R}/masks/{wc.brain}/{s}.png" for s in sections_of(wc.brain)],
        images=lambda wc: SECTIONS.loc[SECTIONS.brain_id == wc.brain, "image"].tolist(),
        brains=brains_table(),
        areas=areas_table(),
    output:
        manifest=f"{R}/patches/{{brain}}/manifest.json",
    params:
        patches=as_json(config["patches"]),
        dask=as_json(config["dask"]),  # where the Dask workers run (LocalCluster of {threads}, or Slurm jobs)
        out=f"{R}/patches/{{brain}}",
        masks=f"{R}/masks/{{brain}}",
        code=fingerprint("patches", "readers", "tables", "transforms", "dask_cluster"),
    threads: config["threads"]["patches"]
    log:
        f"{R}/logs/patches/{{brain}}.log",
    shell:
        "cytonet patches --brain {wildcards.brain} --brains-table {input.brains} --areas {input.areas}"
        " --masks-dir {params.masks} --out {params.out} --threads {threads} --dask {params.dask}"
        " --params {params.patches} > {log} 2>&1"
