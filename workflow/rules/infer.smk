# Whole-section inference: one job per section maps it with every model in infer.models ("cytonet" is the
# seed-0 CytoNet classifier; the others, e.g. the random-init baseline, are mapped the same way so that
# section-level metrics compare them). One process per section starts Python and loads torch once for all models
# (each model still reads the section's tiles itself).
# With config `model: BUNDLE` the bundle maps every section instead (maps/cytonet/) and nothing is trained.
# `cytonet infer` writes <section>_infer.json last: it marks a complete set of maps.
# MAP_MODELS, map_model_files(), infer_model_options() and all_maps(): common.smk.


rule infer:
    input:
        image=section_image,
        mask=f"{R}/masks/{{brain}}/{{section}}.png",
        models=map_model_files(),  # the seed-0 classifiers, or the bundle of config `model` (its card and weights)
        areas=areas_table(),
    output:
        manifests=[f"{R}/maps/{m}/{{brain}}/{{section}}_infer.json" for m in MAP_MODELS],
    log:
        f"{R}/logs/infer/{{brain}}/{{section}}.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["infer"]
    params:
        # one --classifier/--out pair per model (or --model BUNDLE --out): --out is the folder of its manifest
        models=infer_model_options,
        pixel_size=pixel_size_option,
        output_um=config["infer"]["output_um"],
        uncertain=config["infer"]["uncertain_below"],
        tile=config["infer"]["tile_px"],
        mode=config["infer"]["mode"],
        halo="" if config["infer"]["halo_px"] is None else option("--halo-px", config["infer"]["halo_px"]),
        code=fingerprint_stage("infer"),
    shell:
        "cytonet infer --image {input.image:q} --mask {input.mask:q} {params.models}"
        " --areas {input.areas:q} --name {wildcards.section:q} {params.pixel_size}"
        " --output-um {params.output_um} --uncertain-below {params.uncertain} --tile-px {params.tile}"
        " --mode {params.mode:q} {params.halo} --threads {threads} > {log:q} 2>&1"


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
