# Reading-comprehension LoRA workflow:
# xlsx -> train/val/test JSON -> LoRA adapter -> merged checkpoint -> answers CSV
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/config.smk"
include: "rules/planning.smk"
include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/ensemble.smk"
include: "rules/report.smk"


# Seconds of CPU work each: on a cluster they run where Snakemake runs rather than wait in a queue for a node.
localrules:
    all,
    build_demo_model,
    split_folds,
    prepare_train_data,
    prepare_test_data,
    check_extra_data,
    summarize_data,
    plot_training,
    combine_folds,
    ensemble_answers,
    evaluate_ensemble,
    summarize_experiments,
    plot_confusion,


onsuccess:
    print(end_of_run_summary())


onerror:
    print(failed_job_logs(log))


rule all:
    default_target: True
    input:
        get_final_output(),
