# Whole-section inference: each job maps its sections with every model in infer.models ("cytonet" is the
# seed-0 CytoNet classifier; the others, e.g. the random-init baseline, are mapped the same way so that
# section-level metrics compare them). One job maps infer.sections_per_job sections of one brain with one process
# per GPU (ranks: srun tasks through {resources.mpi} under Slurm, --nproc local processes otherwise; rank r maps
# sections r, r+W, ...), and each rank loads torch and every model once for all its sections.
# With config `model: BUNDLE` the bundle maps every section instead (maps/cytonet/) and nothing is trained.
# `cytonet infer` writes <section>_infer.json last: it marks a complete set of maps. A batch job (sections_per_job
# > 1) cannot declare per-section outputs, so it writes a batch manifest last, and infer_section (a local rule,
# no torch) publishes each section's manifest from it; downstream rules read the per-section manifests either way.
# A changed section reruns its batch. Helpers (MAP_MODELS, INFER_OUTPUT, infer_*, all_maps()): common.smk.


rule infer:
    input:
        images=infer_images,
        masks=infer_masks,
        models=map_model_files(),  # the seed-0 classifiers, or the bundle of config `model` (its card and weights)
        areas=areas_table(),
    output:
        **INFER_OUTPUT,
    log:
        INFER_LOG,
    conda:
        "../../envs/cytonet.yaml"
    threads: max(config["threads"]["infer"], config["launch"]["infer_nproc"])
    resources:
        # Empty locally. The jureca profile sets it to the srun line that starts one rank per GPU (a Slurm job with
        # an `mpi` resource runs its command in the batch script, without srun -n1); see pretrain.smk.
        mpi="",
    params:
        sections=infer_section_options,  # --image/--mask/--name (and --pixel-size) per section
        # one --classifier/--out pair per model (or --model BUNDLE --out): --out is the folder of its maps
        models=infer_model_options,
        batch=batch_manifest_option,
        output_um=config["infer"]["output_um"],
        uncertain=config["infer"]["uncertain_below"],
        tile=config["infer"]["tile_px"],
        mode=config["infer"]["mode"],
        halo="" if config["infer"]["halo_px"] is None else option("--halo-px", config["infer"]["halo_px"]),
        pipeline=infer_pipeline_options(),
        nproc=config["launch"]["infer_nproc"],
        code=fingerprint_stage("infer"),
    shell:
        "{resources.mpi} cytonet infer {params.sections} {params.models} --areas {input.areas:q}"
        " --output-um {params.output_um} --uncertain-below {params.uncertain} --tile-px {params.tile}"
        " --mode {params.mode:q} {params.halo} {params.pipeline} --nproc {params.nproc} --threads {threads}"
        " {params.batch} > {log:q} 2>&1"


if INFER_BATCHED:

    localrules:
        infer_section,

    # A section's manifests from its batch manifest (seconds: no torch, run in the Snakemake process).
    rule infer_section:
        input:
            batch=infer_batch_file,
        output:
            manifests=[f"{R}/maps/{m}/{{brain}}/{{section}}_infer.json" for m in MAP_MODELS],
        log:
            f"{R}/logs/infer/{{brain}}/{{section}}.log",
        run:
            publish_section_manifests(input.batch, wildcards.section, output.manifests, log[0])


# Optional 3D consistency: smooth each section's probabilities with its neighbours' through their 3D transforms.
# One job per brain (its rule written out per brain, so that every smoothed section is a declared output): every
# smoothed section reads its neighbours' maps, so any changed map of the brain reruns them all anyway, and one
# process reads each map once instead of once per neighbour.
for _brain in BRAINS:

    rule:
        name:
            f"smooth3d_{_brain}"
        input:
            maps=[f"{R}/maps/cytonet/{_brain}/{s}_infer.json" for s in sections_of(_brain)],
            brains=brains_table(),
        output:
            manifests=[f"{R}/maps/cytonet_smooth3d/{_brain}/{s}_infer.json" for s in sections_of(_brain)],
        log:
            f"{R}/logs/smooth3d/{_brain}.log",
        conda:
            "../../envs/cytonet.yaml"
        params:
            brain=_brain,
            pred=lambda wc, input: os.path.dirname(input.maps[0]),
            out=lambda wc, output: os.path.dirname(output.manifests[0]),
            sigma=config["smooth3d"]["sigma_um"],
            neighbours=config["smooth3d"]["neighbours"],
            thickness=config["section_thickness_um"],
            code=fingerprint_stage("smooth3d"),
        shell:
            "cytonet smooth3d --brains {input.brains:q} --brain {params.brain:q}"
            " --pred {params.pred:q} --out {params.out:q} --sigma-um {params.sigma} --neighbours {params.neighbours}"
            " --section-thickness-um {params.thickness} > {log:q} 2>&1"
