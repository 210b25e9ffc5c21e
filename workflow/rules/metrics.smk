# Section metrics against the ground truth (where a section has one), then the per-brain and overall tables,
# the maps index and a montage per brain. METRIC_MODELS and all_section_metrics(): common.smk.


# One job per section scores every model's map of it (one process reads the ground truth and imports once).
rule section_metrics:
    input:
        maps=[f"{R}/maps/{m}/{{brain}}/{{section}}_infer.json" for m in METRIC_MODELS],
        brains=brains_table(),
    output:
        csv=[f"{R}/metrics/{m}/{{brain}}/{{section}}.csv" for m in METRIC_MODELS],
        json=[f"{R}/metrics/{m}/{{brain}}/{{section}}.json" for m in METRIC_MODELS],
    log:
        f"{R}/logs/section_metrics/{{brain}}/{{section}}.log",
    conda:
        "../../envs/cytonet.yaml"
    params:
        # one --model/--pred/--out-csv/--out-json group per model, in METRIC_MODELS order: --pred is its maps' folder
        models=lambda wc, input, output: option_groups(
            ["--model", "--pred", "--out-csv", "--out-json"],
            METRIC_MODELS,
            [os.path.dirname(p) for p in input.maps],
            output.csv,
            output.json,
        ),
        thickness=config["section_thickness_um"],
        code=fingerprint_stage("section-metrics"),
    shell:
        "cytonet section-metrics --brains {input.brains:q} --brain {wildcards.brain:q}"
        " --section {wildcards.section:q} {params.models} --section-thickness-um {params.thickness} > {log:q} 2>&1"


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
    log:
        f"{R}/logs/aggregate.log",
    conda:
        "../../envs/cytonet.yaml"
    params:
        out=lambda wc, output: os.path.dirname(output.overall),
        code=fingerprint_stage("aggregate"),
    shell:
        "cytonet aggregate --metrics {input:q} --out {params.out:q} --montage-model cytonet > {log:q} 2>&1"
