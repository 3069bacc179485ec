# Reading-comprehension LoRA workflow:
# xlsx -> train/val/test JSON -> LoRA adapter -> merged checkpoint -> answers CSV
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"


rule all:
    input:
        "results/data/report.json",
        expand("results/{run}/answers.csv", run=RUNS),
        expand("results/{run}/metrics.json", run=RUNS) if HAS_VAL else [],
        expand("results/{run}/train_curve.png", run=RUNS),
    default_target: True
