# Section metrics against the ground truth (where a section has one), then the per-brain and overall tables,
# the maps index and a montage per brain.
METRIC_MODELS = MAP_MODELS + (["cytonet_smooth3d"] if config["smooth3d"]["enabled"] else [])


def all_section_metrics() -> list[str]:
    return [f"{R}/metrics/{m}/{b}/{s}.json" for m in METRIC_MODELS for b in BRAINS for s in sections_of(b)]


rule section_metrics:
    wildcard_constraints:
        model="|".join(METRIC_MODELS),
    input:
        maps=f"{R}/maps/{{model}}/{{brain}}/{{section}}_infer.json",
        brains=brains_table(),
    output:
        csv=f"{R}/metrics/{{model}}/{{brain}}/{{section}}.csv",
        json=f"{R}/metrics/{{model}}/{{brain}}/{{section}}.json",
    params:
        pred=f"{R}/maps/{{model}}/{{brain}}",
        thickness=config["section_thickness_um"],
        code=fingerprint("section_metrics", "tables"),
    log:
        f"{R}/logs/section_metrics/{{model}}/{{brain}}/{{section}}.log",
    shell:
        "cytonet section-metrics --brains {input.brains} --brain {wildcards.brain} --section {wildcards.section}"
        " --pred {params.pred} --out-csv {output.csv} --out-json {output.json} --model {wildcards.model}"
        " --section-thickness-um {params.thickness} > {log} 2>&1"


rule aggregate:
    input:
        all_section_metrics(),
    output:
        overall=f"{R}/summary/metrics_overall.md",
        brains=f"{R}/summary/metrics_brains.md",
        index=f"{R}/summary/maps_index.md",
        overall_csv=report(
            f"{R}/summary/metrics_overall.csv", caption="../report/section_metrics.rst", category="3. Area maps"
        ),
        brains_csv=report(
            f"{R}/summary/metrics_brains.csv", caption="../report/section_metrics.rst", category="3. Area maps"
        ),
        index_csv=report(f"{R}/summary/maps_index.csv", caption="../report/maps_index.rst", category="3. Area maps"),
        montages=[
            report(f"{R}/summary/montage_{b}.png", caption="../report/montage.rst", category="3. Area maps")
            for b in BRAINS
        ],
    params:
        out=f"{R}/summary",
        code=fingerprint("aggregate"),
    log:
        f"{R}/logs/aggregate.log",
    shell:
        "cytonet aggregate --metrics {input} --out {params.out} --montage-model cytonet > {log} 2>&1"
