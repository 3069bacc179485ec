rule ensemble_answers:
    input:
        probs=expand("results/{run}/answer_probs.csv", run=ENSEMBLE),
        metrics=get_ensemble_weights_input,
        script=SCRIPTS / "ensemble_answers.py",
        lib=library_of("ensemble_answers.py"),
    output:
        answers=report(
            "results/ensemble/answers.csv",
            caption="../workflow/report/answers.rst",
            category="Answers",
            labels={"run": "ensemble", "file": "answers.csv"},
        ),
        probs="results/ensemble/answer_probs.csv",
    params:
        members=ENSEMBLE,
        weights=config["ensemble"]["weights"],
        metrics=lambda wildcards, input: ["--metrics", *input.metrics] if input.metrics else [],
    log:
        "logs/ensemble_answers.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} --members {params.members:q} --weights {params.weights} {params.metrics:q} "
        "--test-probs {input.probs:q} --answers {output.answers:q} --probs {output.probs:q} > {log:q} 2>&1"


rule evaluate_ensemble:
    input:
        probs=expand("results/{run}/val_probs.csv", run=ENSEMBLE),
        metrics=get_ensemble_weights_input,
        script=SCRIPTS / "ensemble_answers.py",
        lib=library_of("ensemble_answers.py"),
    output:
        "results/ensemble/metrics.json",
    params:
        members=ENSEMBLE,
        weights=config["ensemble"]["weights"],
        metrics=lambda wildcards, input: ["--metrics", *input.metrics] if input.metrics else [],
    log:
        "logs/evaluate_ensemble.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} --members {params.members:q} --weights {params.weights} {params.metrics:q} "
        "--val-probs {input.probs:q} --metrics-out {output:q} > {log:q} 2>&1"
