rule ensemble_answers:
    input:
        unpack(get_ensemble_members),
        script=SCRIPTS / "ensemble_answers.py",
        lib=LIB,
    output:
        answers=report(
            "results/ensemble/answers.csv",
            caption="../workflow/report/answers.rst",
            category="Answers",
            labels={"run": "ensemble", "file": "answers.csv"},
        ),
        probs="results/ensemble/answer_probs.csv",
        metrics="results/ensemble/metrics.json" if HAS_VAL else [],
    params:
        members=ENSEMBLE,
        weights=config["ensemble"]["weights"],
        val=lambda wildcards, input: ["--val-probs", *input.val_probs, "--metrics", *input.metrics] if HAS_VAL else [],
        metrics_out=lambda wildcards, output: ["--metrics-out", output.metrics] if HAS_VAL else [],
    log:
        "logs/ensemble_answers.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} --members {params.members:q} --weights {params.weights} "
        "--test-probs {input.test_probs:q} {params.val:q} --answers {output.answers:q} --probs {output.probs:q} "
        "{params.metrics_out:q} > {log:q} 2>&1"
