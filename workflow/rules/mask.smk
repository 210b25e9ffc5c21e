# Tissue masking: one job per section, at the low working resolution mask.resolution_um. all_masks(): common.smk.


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
    log:
        f"{R}/logs/mask/{{brain}}/{{section}}.log",
    conda:
        "../../envs/cytonet.yaml"
    threads: config["threads"]["mask"]
    params:
        resolution=config["mask"]["resolution_um"],
        pixel_size=pixel_size_option,
        code=fingerprint_stage("mask"),  # an edit to any module `cytonet mask` imports reruns masking
    shell:
        "cytonet mask {input.image:q} -o {output.mask:q} --qc {output.qc:q} --resolution {params.resolution}"
        " {params.pixel_size} --section-id {wildcards.section:q} > {log:q} 2>&1"
