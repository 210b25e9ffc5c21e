# Whole-section inference: one job per section maps it with every model in infer.models ("cytonet" is the
# seed-0 CytoNet classifier; the others, e.g. the random-init baseline, are mapped the same way so that
# section-level metrics compare them). One process per section starts Python and loads torch once for all models
# (each model still reads the section's tiles itself).
# `cytonet infer` writes <section>_infer.json last: it marks a complete set of maps.
MAP_MODELS = config["infer"]["models"]


def all_maps() -> list[str]:
    return [f"{R}/maps/{m}/{b}/{s}_infer.json" for m in MAP_MODELS for b in BRAINS for s in sections_of(b)]


rule infer:
    input:
        image=section_image,
        mask=f"{R}/masks/{{brain}}/{{section}}.png",
        classifiers=[f"{R}/finetune/{m}/seed{SEEDS[0]}/classifier.pt" for m in MAP_MODELS],
        areas=areas_table(),
    output:
        manifests=[f"{R}/maps/{m}/{{brain}}/{{section}}_infer.json" for m in MAP_MODELS],
    params:
        models=lambda wc, input: " ".join(
            f"--classifier {c} --out {R}/maps/{m}/{wc.brain}" for m, c in zip(MAP_MODELS, input.classifiers)
        ),
        pixel_size=pixel_size_option,
        output_um=config["infer"]["output_um"],
        uncertain=config["infer"]["uncertain_below"],
        tile=config["infer"]["tile_px"],
        mode=config["infer"]["mode"],
        halo="" if config["infer"]["halo_px"] is None else f"--halo-px {config['infer']['halo_px']}",
        code=fingerprint("infer", "mapio", "models", "readers", "finetune"),
    threads: config["threads"]["infer"]
    log:
        f"{R}/logs/infer/{{brain}}/{{section}}.log",
    shell:
        "cytonet infer --image {input.image} --mask {input.mask} {params.models}"
        " --areas {input.areas} --name {wildcards.section} {params.pixel_size}"
        " --output-um {params.output_um} --uncertain-below {params.uncertain} --tile-px {params.tile}"
        " --mode {params.mode} {params.halo} --threads {threads} --no-progress > {log} 2>&1"


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
        params:
            brain=_brain,
            pred=f"{R}/maps/cytonet/{_brain}",
            out=f"{R}/maps/cytonet_smooth3d/{_brain}",
            sigma=config["smooth3d"]["sigma_um"],
            neighbours=config["smooth3d"]["neighbours"],
            thickness=config["section_thickness_um"],
            code=fingerprint("smooth3d", "mapio", "transforms", "tables"),
        log:
            f"{R}/logs/smooth3d/{_brain}.log",
        shell:
            "cytonet smooth3d --brains {input.brains} --brain {params.brain}"
            " --pred {params.pred} --out {params.out} --sigma-um {params.sigma} --neighbours {params.neighbours}"
            " --section-thickness-um {params.thickness} > {log} 2>&1"
