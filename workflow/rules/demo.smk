# Demo brains: the built-in phantom dataset (cytonet/synth). One job per brain. DEMO and demo_outputs(): common.smk.


if config["demo"]["enabled"]:

    rule demo_tables:
        output:
            brains=f"{DEMO}/brains.csv",
            areas=f"{DEMO}/areas.csv",
        log:
            f"{R}/logs/demo/tables.log",
        conda:
            "../../envs/cytonet.yaml"
        params:
            demo=as_json(DEMO_PARAMS),
            out=lambda wc, output: os.path.dirname(output.brains),  # DEMO
            code=fingerprint_stage("make-demo"),
        shell:
            "cytonet make-demo --tables-only --params {params.demo} --out {params.out:q} > {log:q} 2>&1"

    # One job per brain; its rule is written out per brain so that every section image is a declared output.
    for _brain in BRAINS:

        rule:
            name:
                f"demo_brain_{_brain}"
            output:
                sections=f"{DEMO}/{_brain}/sections.csv",
                preview=report(
                    f"{DEMO}/previews/{_brain}.png", caption="../report/preview.rst", category="0. Demo brains"
                ),
                images=[f"{DEMO}/{_brain}/images/{s}.ome.tif" for s in sections_of(_brain)],
            log:
                f"{R}/logs/demo/{_brain}.log",
            conda:
                "../../envs/cytonet.yaml"
            params:
                brain=_brain,
                demo=as_json(DEMO_PARAMS),
                out=lambda wc, output: os.path.dirname(os.path.dirname(output.sections)),  # DEMO/<brain>/.. = DEMO
                code=fingerprint_stage("make-demo"),
            shell:
                "cytonet make-demo --brain {params.brain:q} --params {params.demo} --out {params.out:q} > {log:q} 2>&1"
