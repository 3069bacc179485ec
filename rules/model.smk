TRAIN_RES = config["resources"]["train"]
MERGE_RES = config["resources"]["merge"]
ANSWER_RES = config["resources"]["answer"]


rule build_demo_model:
    input:
        train="results/data/train.json",
        script=SCRIPTS / "build_demo_model.py",
        lib=library_of("build_demo_model.py"),
    output:
        directory(DEMO_MODEL),
    log:
        "logs/build_demo_model.log",
    conda:
        "../envs/train.yaml"
    params:
        settings=as_json({k: v for k, v in config["demo_model"].items() if k != "training"}),
    shell:
        "python {input.script:q} --train {input.train:q} --out {output:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


if IS_GGUF:

    rule convert_gguf_base:
        input:
            gguf=config["base_model"],
            script=SCRIPTS / "convert_gguf_base.py",
            lib=library_of("convert_gguf_base.py"),
        output:
            directory(BASE_FOLDER),
        log:
            "logs/convert_gguf_base.log",
        conda:
            "../envs/train.yaml"
        # A 7B dequantized in bf16 is held whole before it is written: the merge's memory and time.
        resources:
            mem_mb=MERGE_RES["mem_mb"],
            runtime=MERGE_RES["runtime"],
        shell:
            "python {input.script:q} --gguf {input.gguf:q} --out {output:q} > {log:q} 2>&1"


rule train_lora:
    input:
        unpack(get_training_data),
        base=base_model_input,
        deepspeed=Path(workflow.basedir) / "resources" / "deepspeed" / "zero2.json",
        script=SCRIPTS / "train_lora.py",
        lib=library_of("train_lora.py"),
    output:
        adapter=directory("results/{model}/adapter"),
        log_jsonl="results/{model}/train_log.jsonl",
    log:
        "logs/{model}/train_lora.log",
    benchmark:
        "logs/{model}/train_lora.benchmark.tsv"
    wildcard_constraints:
        model=regex(TRAINED),
    conda:
        "../envs/train.yaml"
    threads: TRAIN_RES["threads"]
    resources:
        gpu=TRAIN_RES["gpu"],
        mem_mb=TRAIN_RES["mem_mb"],
        runtime=TRAIN_RES["runtime"],
    params:
        settings=training_settings,
        val=lambda wildcards, input: f"--val {shlex.quote(input.val)}" if hasattr(input, "val") else "",
        extra=lambda wildcards, input: files_flag("--extra", input.extra),
        teacher=lambda wildcards, input: (
            f"--teacher-probs {shlex.quote(input.teacher)} --teacher-records {shlex.quote(input.teacher_records)}"
            if hasattr(input, "teacher")
            else ""
        ),
        base_model=base_model_path(),
        remote_code=remote_code_flag(),
        revision=revision_flag(),
        rotations=rotations_flag,
        tracking=lambda wildcards: (
            f"--tensorboard-dir results/tensorboard/{wildcards.model}" if config["tracking"] == "tensorboard" else ""
        ),
        prompt_format=config["prompt_format"],
        launcher=train_launcher,
        # Not an output: Snakemake must not delete it when a job fails, so a
        # rerun resumes from the last checkpoint.
        checkpoint_dir="results/{model}/checkpoints",
    shell:
        "{params.launcher} {input.script:q} --train {input.train:q} {params.val} {params.extra} {params.teacher} "
        "--base-model {params.base_model:q} --out {output.adapter:q} --log-jsonl {output.log_jsonl:q} "
        "--checkpoint-dir {params.checkpoint_dir:q} --deepspeed-config {input.deepspeed:q} "
        "--settings {params.settings:q} --prompt-format {params.prompt_format} {params.rotations} "
        "--compile-cache resources/compile_cache {params.tracking} "
        "{params.remote_code} {params.revision} "
        "> {log:q} 2>&1"


rule merge_lora:
    input:
        adapter="results/{model}/adapter",
        base=base_model_input,
        script=SCRIPTS / "merge_lora.py",
        lib=library_of("merge_lora.py"),
    output:
        directory("results/{model}/merged"),
    log:
        "logs/{model}/merge_lora.log",
    benchmark:
        "logs/{model}/merge_lora.benchmark.tsv"
    wildcard_constraints:
        model=regex(TRAINED),
    conda:
        "../envs/merge.yaml"
    threads: MERGE_RES["threads"]
    resources:
        gpu=MERGE_RES["gpu"],
        mem_mb=MERGE_RES["mem_mb"],
        runtime=MERGE_RES["runtime"],
    params:
        base_model=base_model_path(),
    shell:
        "python {input.script:q} --base-model {params.base_model:q} --adapter {input.adapter:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"


rule export_gguf:
    input:
        merged="results/{model}/merged",
        script=SCRIPTS / "export_gguf.py",
        lib=library_of("export_gguf.py"),
    output:
        "results/{model}/model-{type}.gguf",
    log:
        "logs/{model}/export_gguf_{type}.log",
    wildcard_constraints:
        model=regex(EXPORTED),
        type="f16|bf16|q8_0",
    conda:
        "../envs/train.yaml"
    # One tensor in memory at a time; the merge's time.
    resources:
        runtime=MERGE_RES["runtime"],
    shell:
        "python {input.script:q} --model {input.merged:q} --type {wildcards.type} --out {output:q} > {log:q} 2>&1"


rule answer_questions:
    input:
        model=get_scoring_model,
        test="results/data/test.json",
        script=SCRIPTS / "score_questions.py",
        lib=library_of("score_questions.py"),
    output:
        answers=report(
            "results/{model}/answers.csv",
            caption="../workflow/report/answers.rst",
            category="Answers",
            labels={"run": "{model}", "file": "answers.csv"},
        ),
        probs="results/{model}/answer_probs.csv",
    log:
        "logs/{model}/answer_questions.log",
    benchmark:
        "logs/{model}/answer_questions.benchmark.tsv"
    wildcard_constraints:
        model=regex(SCORED_AS_SAVED),
    conda:
        "../envs/answer.yaml"
    threads: ANSWER_RES["threads"]
    resources:
        gpu=ANSWER_RES["gpu"],
        mem_mb=ANSWER_RES["mem_mb"],
        runtime=ANSWER_RES["runtime"],
    params:
        model=scoring_model_path,
        settings=as_json(ANSWERING),
        max_seq_length=lambda wildcards: RUNS[run_of(wildcards)]["max_seq_length"],
        revision=lambda wildcards: "" if wildcards.model in TRAINED else revision_flag(),
        remote_code=remote_code_flag(),
    shell:
        "python {input.script:q} --model {params.model:q} {params.revision} --test {input.test:q} "
        "--answers {output.answers:q} --answer-probs {output.probs:q} --max-seq-length {params.max_seq_length} "
        "--settings {params.settings:q} {params.remote_code} > {log:q} 2>&1"


rule evaluate_answers:
    input:
        model=get_scoring_model,
        val=get_validation_data,
        script=SCRIPTS / "score_questions.py",
        lib=library_of("score_questions.py"),
    output:
        metrics=report(
            "results/{model}/metrics.json",
            caption="../workflow/report/metrics.rst",
            category="Validation",
            subcategory="metrics",
            labels={"run": "{model}", "figure": "metrics.json"},
        ),
        probs="results/{model}/val_probs.csv",
    log:
        "logs/{model}/evaluate_answers.log",
    benchmark:
        "logs/{model}/evaluate_answers.benchmark.tsv"
    wildcard_constraints:
        model=regex(SCORED_AS_SAVED),
    conda:
        "../envs/answer.yaml"
    threads: ANSWER_RES["threads"]
    resources:
        gpu=ANSWER_RES["gpu"],
        mem_mb=ANSWER_RES["mem_mb"],
        runtime=ANSWER_RES["runtime"],
    params:
        model=scoring_model_path,
        settings=as_json(ANSWERING),
        max_seq_length=lambda wildcards: RUNS[run_of(wildcards)]["max_seq_length"],
        selected_step=lambda wildcards: "--selected-step" if RUNS[run_of(wildcards)]["select_best"] else "",
        revision=lambda wildcards: "" if wildcards.model in TRAINED else revision_flag(),
        remote_code=remote_code_flag(),
    shell:
        "python {input.script:q} --model {params.model:q} {params.revision} --val {input.val:q} "
        "--metrics {output.metrics:q} --val-probs {output.probs:q} --max-seq-length {params.max_seq_length} "
        "--settings {params.settings:q} {params.selected_step} {params.remote_code} > {log:q} 2>&1"


rule score_fold_model:
    input:
        adapter="results/{model}/adapter",
        base=base_model_input,
        val=get_validation_data,
        test="results/data/test.json",
        script=SCRIPTS / "score_questions.py",
        lib=library_of("score_questions.py"),
    output:
        metrics="results/{model}/metrics.json",
        val_probs="results/{model}/val_probs.csv",
        answer_probs="results/{model}/answer_probs.csv",
    log:
        "logs/{model}/score_fold_model.log",
    benchmark:
        "logs/{model}/score_fold_model.benchmark.tsv"
    wildcard_constraints:
        model=regex(FOLD_MODELS),
    conda:
        "../envs/answer.yaml"
    threads: ANSWER_RES["threads"]
    resources:
        gpu=ANSWER_RES["gpu"],
        mem_mb=ANSWER_RES["mem_mb"],
        runtime=ANSWER_RES["runtime"],
    params:
        base_model=base_model_path(),
        revision=revision_flag(),
        settings=as_json(ANSWERING),
        max_seq_length=lambda wildcards: RUNS[run_of(wildcards)]["max_seq_length"],
        selected_step=lambda wildcards: "--selected-step" if RUNS[run_of(wildcards)]["select_best"] else "",
        remote_code=remote_code_flag(),
    shell:
        "python {input.script:q} --model {params.base_model:q} --adapter {input.adapter:q} {params.revision} "
        "--val {input.val:q} --metrics {output.metrics:q} --val-probs {output.val_probs:q} "
        "--test {input.test:q} --answer-probs {output.answer_probs:q} --max-seq-length {params.max_seq_length} "
        "--settings {params.settings:q} {params.selected_step} {params.remote_code} > {log:q} 2>&1"


rule plot_training:
    input:
        log_jsonl="results/{model}/train_log.jsonl",
        script=SCRIPTS / "plot_training.py",
        lib=library_of("plot_training.py"),
    output:
        report(
            "results/{model}/train_curve.png",
            caption="../workflow/report/train_curve.rst",
            category="Training",
            labels={"run": "{model}", "figure": "training curve"},
        ),
    log:
        "logs/{model}/plot_training.log",
    wildcard_constraints:
        model=regex(TRAINED),
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script:q} --log-jsonl {input.log_jsonl:q} --out {output:q} --title {wildcards.model:q} > {log:q} 2>&1"


rule combine_folds:
    input:
        val_probs=expand("results/{{run}}/{fold}/val_probs.csv", fold=FOLD_NAMES),
        answer_probs=expand("results/{{run}}/{fold}/answer_probs.csv", fold=FOLD_NAMES),
        folds="results/data/folds.json",
        script=SCRIPTS / "combine_folds.py",
        lib=library_of("combine_folds.py"),
    output:
        oof="results/{run}/oof_probs.csv",
        metrics=report(
            "results/{run}/metrics.json",
            caption="../workflow/report/oof_metrics.rst",
            category="Validation",
            subcategory="metrics",
            labels={"run": "{run}", "figure": "metrics.json"},
        ),
        answers=report(
            "results/{run}/answers.csv",
            caption="../workflow/report/answers.rst",
            category="Answers",
            labels={"run": "{run}", "file": "answers.csv"},
        ),
        answer_probs="results/{run}/answer_probs.csv",
    log:
        "logs/{run}/combine_folds.log",
    wildcard_constraints:
        run=regex(FOLDED),
    conda:
        "../envs/data.yaml"
    params:
        selected_step=lambda wildcards: "--selected-step" if RUNS[wildcards.run]["select_best"] else "",
        distilled=lambda wildcards: "--distilled" if wildcards.run in DISTILLED else "",
        pseudo_labelled=lambda wildcards: "--pseudo-labelled" if learns_from_held_out(wildcards.run) else "",
    shell:
        "python {input.script:q} --folds {input.folds:q} --val-probs {input.val_probs:q} "
        "--answer-probs {input.answer_probs:q} --oof {output.oof:q} --metrics {output.metrics:q} "
        "--answers {output.answers:q} --probs {output.answer_probs:q} {params.selected_step} {params.distilled} "
        "{params.pseudo_labelled} "
        "> {log:q} 2>&1"
