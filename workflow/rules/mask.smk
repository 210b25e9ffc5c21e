# Tissue masking: one job per section, at the low working resolution mask.resolution_um.


def all_masks() -> list[str]:
    return [f"{R}/masks/{b}/{s}.png" for b in BRAINS for s in sections_of(b)]


rule mask:
    input:
        image=section_image,
    output:
        mask=f"{R}/masks/{{brain}}/{{section}}.png",
        qc=report(
            f"{R}/masks/{{brain}}/{{section}}_qc.png",
            caption="../report/mask_qc.rst",
            category="1. Masking QC",
            subcategory="{brain}",
        ),
    params:
        resolution=config["mask"]["resolution_um"],
        pixel_size=pixel_size_option,
        code=fingerprint("mask", "readers"),  # edits to these modules rerun masking
    threads: config["threads"]["mask"]
    log:
        f"{R}/logs/mask/{{brain}}/{{section}}.log",
    shell:
        "cytonet mask {input.image} -o {output.mask} --qc {output.qc} --resolution {params.resolution}"
        " {params.pixel_size} --section-id {wildcards.section} > {log} 2>&1"
