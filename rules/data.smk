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
    shell:
        "python {input.script:q} --train {input.train:q} --test {input.test:q} {params.folds} --out {output.json:q} "
        "--html {output.html:q} > {log:q} 2>&1"
