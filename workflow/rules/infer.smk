# Whole-section inference with the seed-0 CytoNet classifier: one job per section. The manifest
# <section>_infer.json is written last by `cytonet infer`, so it marks a complete set of maps.


def all_maps() -> list[str]:
    return [f"{R}/maps/{b}/{s}_infer.json" for b in BRAINS for s in sections_of(b)]


rule infer:
    input:
        image=section_image,
        mask=f"{R}/masks/{{brain}}/{{section}}.png",
        classifier=f"{R}/finetune/cytonet/seed{SEEDS[0]}/classifier.pt",
        areas=areas_table(),
    output:
        manifest=f"{R}/maps/{{brain}}/{{section}}_infer.json",
    params:
        out=f"{R}/maps/{{brain}}",
        pixel_size=pixel_size_option,
        output_um=config["infer"]["output_um"],
        uncertain=config["infer"]["uncertain_below"],
        tile=config["infer"]["tile_px"],
        mode=config["infer"]["mode"],
        code=fingerprint("infer", "models", "readers", "finetune"),
    threads: config["threads"]["infer"]
    log:
        f"{R}/logs/infer/{{brain}}/{{section}}.log",
    shell:
        "cytonet infer --image {input.image} --mask {input.mask} --classifier {input.classifier}"
        " --areas {input.areas} --out {params.out} --name {wildcards.section} {params.pixel_size}"
        " --output-um {params.output_um} --uncertain-below {params.uncertain} --tile-px {params.tile}"
        " --mode {params.mode} --threads {threads} --no-progress > {log} 2>&1"
