rule prepare_train_data:
    input:
        table=config["data"]["train"],
        script=SCRIPTS / "prepare_data.py",
        lib=library_of("prepare_data.py"),
    output:
        train="results/data/train.json",
        val="results/data/val.json",
        report="results/data/train_report.json",
    log:
        "logs/prepare_train_data.log",
    conda:
        "../envs/data.yaml"
    params:
        val_fraction=config["data"]["val_fraction"],
        split_seed=config["data"]["split_seed"],
        split_by=config["data"]["split_by"],
        on_invalid=config["data"]["on_invalid"],
    shell:
        "python {input.script:q} train --input {input.table:q} --train-out {output.train:q} "
        "--val-out {output.val:q} --report-out {output.report:q} --val-fraction {params.val_fraction} "
        "--split-seed {params.split_seed} --split-by {params.split_by} "
        "--on-invalid {params.on_invalid} > {log:q} 2>&1"


rule split_folds:
    input:
        train="results/data/train.json",
        script=SCRIPTS / "prepare_data.py",
        lib=library_of("prepare_data.py"),
    output:
        folds="results/data/folds.json",
        parts=expand("results/data/{fold}/{part}.json", fold=FOLD_NAMES, part=["train", "val"]),
    log:
        "logs/split_folds.log",
    conda:
        "../envs/data.yaml"
    params:
        folds=FOLDS,
        split_seed=config["data"]["split_seed"],
        split_by=config["data"]["split_by"],
    shell:
        "python {input.script:q} folds --train {input.train:q} --folds {params.folds} --out-dir results/data "
        "--split-seed {params.split_seed} --split-by {params.split_by} > {log:q} 2>&1"


rule prepare_extra_data:
    input:
        table=lambda wildcards: EXTRA[wildcards.source]["path"],
        # The test file as it was when the source was first screened: a new one does not screen it again,
        # which would retrain every run that trains on it; check_extra_data holds it to the new one.
        against=["results/data/train.json", "results/data/val.json", ancient("results/data/test.json")],
        script=SCRIPTS / "prepare_data.py",
        lib=library_of("prepare_data.py"),
    output:
        records="results/data/extra/{source}.json",
        report="results/data/extra/{source}_report.json",
    log:
        "logs/prepare_extra_data/{source}.log",
    conda:
        "../envs/data.yaml"
    params:
        convert=lambda wildcards: EXTRA[wildcards.source]["convert"],
        columns=lambda wildcards: as_json(EXTRA[wildcards.source]["columns"]),
        on_invalid=config["data"]["on_invalid"],
    shell:
        "python {input.script:q} extra --input {input.table:q} --name {wildcards.source} "
        "--convert {params.convert} --columns {params.columns:q} --against {input.against:q} "
        "--out {output.records:q} --report-out {output.report:q} --on-invalid {params.on_invalid} > {log:q} 2>&1"


rule check_extra_data:
    input:
        records="results/data/extra/{source}.json",
        test="results/data/test.json",
        script=SCRIPTS / "prepare_data.py",
        lib=library_of("prepare_data.py"),
    output:
        "results/data/extra/{source}_test_check.json",
    log:
        "logs/check_extra_data/{source}.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} extra-check --records {input.records:q} --against {input.test:q} --out {output:q} "
        "> {log:q} 2>&1"


rule prepare_test_data:
    input:
        table=config["data"]["test"],
        script=SCRIPTS / "prepare_data.py",
        lib=library_of("prepare_data.py"),
    output:
        test="results/data/test.json",
        report="results/data/test_report.json",
    log:
        "logs/prepare_test_data.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} test --input {input.table:q} --out {output.test:q} "
        "--report-out {output.report:q} > {log:q} 2>&1"


rule summarize_data:
    input:
        train="results/data/train_report.json",
        test="results/data/test_report.json",
        folds="results/data/folds.json" if FOLDS else [],
        extra=expand("results/data/extra/{source}_report.json", source=EXTRA),
        pseudo_labels=expand("results/{run}/pseudo_labels_report.json", run=PSEUDO_LABELLED),
        script=SCRIPTS / "summarize_data.py",
        lib=library_of("summarize_data.py"),
    output:
        json="results/data/report.json",
        html=report(
            "results/data/report.html",
            caption="../workflow/report/data_report.rst",
            category="Data",
            labels={"figure": "rows read, kept, fixed, skipped"},
        ),
    log:
        "logs/summarize_data.log",
    conda:
        "../envs/data.yaml"
    params:
        folds=lambda wildcards, input: f"--folds {shlex.quote(input.folds)}" if FOLDS else "",
        extra=lambda wildcards, input: files_flag("--extra", input.extra),
        pseudo_labels=lambda wildcards, input: files_flag("--pseudo-labels", input.pseudo_labels),
    shell:
        "python {input.script:q} --train {input.train:q} --test {input.test:q} {params.folds} {params.extra} "
        "{params.pseudo_labels} --out {output.json:q} --html {output.html:q} > {log:q} 2>&1"


rule select_pseudo_labels:
    input:
        test="results/data/test.json",
        teacher=teacher_probs,
        script=SCRIPTS / "select_pseudo_labels.py",
        lib=library_of("select_pseudo_labels.py"),
    output:
        records="results/{run}/pseudo_labels.json",
        report="results/{run}/pseudo_labels_report.json",
    log:
        "logs/{run}/select_pseudo_labels.log",
    wildcard_constraints:
        run=regex(PSEUDO_LABELLED),
    conda:
        "../envs/data.yaml"
    params:
        teacher=lambda wildcards: RUNS[wildcards.run]["pseudo_labels"]["teacher"],
        min_probability=lambda wildcards: RUNS[wildcards.run]["pseudo_labels"]["min_probability"],
    shell:
        "python {input.script:q} --test {input.test:q} --teacher-probs {input.teacher:q} --teacher {params.teacher} "
        "--min-probability {params.min_probability} --out {output.records:q} --report-out {output.report:q} "
        "> {log:q} 2>&1"
