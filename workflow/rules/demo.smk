# Demo brains: the built-in phantom dataset (cytonet/synth). One job per brain.
DEMO = config["demo"]["out_dir"]


def demo_outputs() -> list[str]:
    if not config["demo"]["enabled"]:
        return []
    return [f"{DEMO}/brains.csv", *[f"{DEMO}/previews/{b}.png" for b in BRAINS]]


if config["demo"]["enabled"]:

    rule demo_tables:
        output:
            brains=f"{DEMO}/brains.csv",
            areas=f"{DEMO}/areas.csv",
        params:
            demo=as_json(DEMO_PARAMS),
            code=fingerprint("synth"),
        log:
            f"{R}/logs/demo/tables.log",
        shell:
            "cytonet make-demo --tables-only --params {params.demo} --out {DEMO} > {log} 2>&1"

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
            params:
                brain=_brain,
                demo=as_json(DEMO_PARAMS),
                code=fingerprint("synth"),
            log:
                f"{R}/logs/demo/{_brain}.log",
            shell:
                "cytonet make-demo --brain {params.brain} --params {params.demo} --out {DEMO} > {log} 2>&1"
