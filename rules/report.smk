rule summarize_experiments:
    input:
        unpack(get_experiment_inputs),
        script=SCRIPTS / "summarize_experiments.py",
        lib=library_of("summarize_experiments.py"),
    output:
        tsv="results/experiments.tsv",
        html=report(
            "results/experiments.html",
            caption="../workflow/report/experiments_table.rst",
            category="Validation",
            subcategory="all runs",
            labels={"figure": "experiments table"},
        ),
        png=report(
            "results/experiments.png",
            caption="../workflow/report/experiments_plot.rst",
            category="Validation",
            subcategory="all runs",
            labels={"figure": "accuracy with 95% intervals"},
        ),
    log:
        "logs/summarize_experiments.log",
    conda:
        "../envs/data.yaml"
    params:
        manifest=as_json(EXPERIMENTS),
        ensemble=lambda wildcards, input: (
            ["--ensemble-metrics", input.ensemble, "--ensemble-probs", input.ensemble_probs]
            if HAS_VAL and ENSEMBLE
            else []
        ),
        reference=lambda wildcards: (
            ["--reference", config["experiments"]["reference"]] if config["experiments"]["reference"] else []
        ),
    shell:
        "python {input.script:q} --manifest {params.manifest:q} {params.ensemble:q} {params.reference:q} --tsv {output.tsv:q} "
        "--html {output.html:q} --png {output.png:q} > {log:q} 2>&1"


rule plot_confusion:
    input:
        metrics="results/{member}/metrics.json",
        script=SCRIPTS / "plot_confusion.py",
        lib=library_of("plot_confusion.py"),
    output:
        report(
            "results/{member}/confusion.png",
            caption="../workflow/report/confusion.rst",
            category="Validation",
            subcategory="confusion matrices",
            labels={"run": "{member}", "figure": "confusion matrix"},
        ),
    log:
        "logs/{member}/plot_confusion.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} --metrics {input.metrics:q} --out {output:q} --title {wildcards.member:q} > {log:q} 2>&1"
