TRAIN_RES = config["resources"]["train"]
MERGE_RES = config["resources"]["merge"]
ANSWER_RES = config["resources"]["answer"]


rule build_demo_model:
    input:
        train="results/data/train.json",
        script=SCRIPTS / "build_demo_model.py",
        lib=LIB,
    output:
        directory(DEMO_MODEL),
    params:
        settings=as_json(config["demo_model"]),
    log:
        "logs/build_demo_model.log",
    conda:
        "../envs/train.yaml"
    shell:
        "python {input.script} --train {input.train} --out {output} "
        "--settings {params.settings:q} > {log} 2>&1"


rule train_lora:
    input:
        train="results/data/train.json",
        val="results/data/val.json",
        base=base_model_input,
        deepspeed=Path(workflow.basedir) / "resources" / "deepspeed" / "zero2.json",
        script=SCRIPTS / "train_lora.py",
        lib=LIB,
    output:
        adapter=directory("results/{run}/adapter"),
        log_jsonl="results/{run}/train_log.jsonl",
    params:
        settings=lambda wildcards: as_json(RUNS[wildcards.run]),
        base_model=base_model_path(),
        remote_code=remote_code_flag(),
        launcher=train_launcher,
        # Not an output: Snakemake must not delete it when a job fails, so a
        # rerun resumes from the last checkpoint.
        checkpoint_dir="results/{run}/checkpoints",
    threads: TRAIN_RES["threads"]
    resources:
        gpu=TRAIN_RES["gpu"],
        mem_mb=TRAIN_RES["mem_mb"],
        runtime=TRAIN_RES["runtime"],
    log:
        "logs/{run}/train_lora.log",
    benchmark:
        "benchmarks/{run}/train_lora.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launcher} {input.script} --train {input.train} --val {input.val} "
        "--base-model {params.base_model:q} --out {output.adapter} --log-jsonl {output.log_jsonl} "
        "--checkpoint-dir {params.checkpoint_dir} --deepspeed-config {input.deepspeed} "
        "--settings {params.settings:q} {params.remote_code} > {log} 2>&1"


rule merge_lora:
    input:
        adapter="results/{run}/adapter",
        base=base_model_input,
        script=SCRIPTS / "merge_lora.py",
        lib=LIB,
    output:
        directory("results/{run}/merged"),
    params:
        base_model=base_model_path(),
    threads: MERGE_RES["threads"]
    resources:
        gpu=MERGE_RES["gpu"],
        mem_mb=MERGE_RES["mem_mb"],
        runtime=MERGE_RES["runtime"],
    log:
        "logs/{run}/merge_lora.log",
    benchmark:
        "benchmarks/{run}/merge_lora.tsv"
    conda:
        "../envs/merge.yaml"
    shell:
        "python {input.script} --base-model {params.base_model:q} --adapter {input.adapter} "
        "--out {output} --threads {threads} > {log} 2>&1"


rule answer_questions:
    input:
        model="results/{run}/merged",
        test="results/data/test.json",
        script=SCRIPTS / "answer_questions.py",
        lib=LIB,
    output:
        answers="results/{run}/answers.csv",
        probs="results/{run}/answer_probs.csv",
    params:
        settings=as_json(config["answering"]),
        max_seq_length=lambda wildcards: RUNS[wildcards.run]["max_seq_length"],
        remote_code=remote_code_flag(),
    threads: ANSWER_RES["threads"]
    resources:
        gpu=ANSWER_RES["gpu"],
        mem_mb=ANSWER_RES["mem_mb"],
        runtime=ANSWER_RES["runtime"],
    log:
        "logs/{run}/answer_questions.log",
    benchmark:
        "benchmarks/{run}/answer_questions.tsv"
    conda:
        "../envs/answer.yaml"
    shell:
        "python {input.script} --model {input.model} --test {input.test} --answers {output.answers} "
        "--probs {output.probs} --max-seq-length {params.max_seq_length} "
        "--settings {params.settings:q} {params.remote_code} > {log} 2>&1"


rule evaluate_answers:
    input:
        model="results/{run}/merged",
        val="results/data/val.json",
        script=SCRIPTS / "evaluate_answers.py",
        lib=LIB,
    output:
        "results/{run}/metrics.json",
    params:
        settings=as_json(config["answering"]),
        max_seq_length=lambda wildcards: RUNS[wildcards.run]["max_seq_length"],
        remote_code=remote_code_flag(),
    threads: ANSWER_RES["threads"]
    resources:
        gpu=ANSWER_RES["gpu"],
        mem_mb=ANSWER_RES["mem_mb"],
        runtime=ANSWER_RES["runtime"],
    log:
        "logs/{run}/evaluate_answers.log",
    benchmark:
        "benchmarks/{run}/evaluate_answers.tsv"
    conda:
        "../envs/answer.yaml"
    shell:
        "python {input.script} --model {input.model} --val {input.val} --out {output} "
        "--max-seq-length {params.max_seq_length} --settings {params.settings:q} "
        "{params.remote_code} > {log} 2>&1"


rule plot_training:
    input:
        log_jsonl="results/{run}/train_log.jsonl",
        script=SCRIPTS / "plot_training.py",
    output:
        "results/{run}/train_curve.png",
    log:
        "logs/{run}/plot_training.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python {input.script} --log-jsonl {input.log_jsonl} --out {output} --title {wildcards.run} > {log} 2>&1"
