# The benchmark figures (docs/benchmarks.md) as a page of the Snakemake report (`make report`).


rule benchmarks_page:
    input:
        "docs/benchmarks.md",
    output:
        report(f"{R}/report/benchmarks.html", caption="../report/benchmarks.rst", category="5. Benchmarks"),
    log:
        f"{R}/logs/benchmarks_page.log",
    conda:
        # `python -m markdown`: Markdown is one of cytonet's dependencies, so the package's environment has it
        "../../envs/cytonet.yaml"
    shell:
        "python -m markdown -x tables {input:q} > {output:q} 2> {log:q}"
