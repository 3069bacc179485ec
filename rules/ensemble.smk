rule ensemble_answers:
    input:
        probs=expand("results/{run}/answer_probs.csv", run=ENSEMBLE),
        val_probs=get_ensemble_validation_input,
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
    log:
        "logs/ensemble_answers.log",
    conda:
        "../envs/data.yaml"
    params:
        members=ENSEMBLE,
        weights=config["ensemble"]["weights"],
        method=config["ensemble"]["method"],
    shell:
        "python {input.script:q} --members {params.members:q} --weights {params.weights} --method {params.method} "
        "--val-probs {input.val_probs:q} --test-probs {input.probs:q} --answers {output.answers:q} "
        "--probs {output.probs:q} > {log:q} 2>&1"


rule evaluate_ensemble:
    input:
        probs=[validation_probs(run) for run in ENSEMBLE],
        script=SCRIPTS / "ensemble_answers.py",
        lib=library_of("ensemble_answers.py"),
    output:
        metrics="results/ensemble/metrics.json",
        probs="results/ensemble/val_probs.csv",
    log:
        "logs/evaluate_ensemble.log",
    conda:
        "../envs/data.yaml"
    params:
        members=ENSEMBLE,
        weights=config["ensemble"]["weights"],
        method=config["ensemble"]["method"],
        step_chosen=[run for run in ENSEMBLE if RUNS[run]["select_best"]],
        distilled=[run for run in ENSEMBLE if run in DISTILLED],
    shell:
        "python {input.script:q} --members {params.members:q} --weights {params.weights} --method {params.method} "
        "--val-probs {input.probs:q} --metrics-out {output.metrics:q} --val-probs-out {output.probs:q} "
        "--step-chosen {params.step_chosen:q} --distilled {params.distilled:q} > {log:q} 2>&1"
