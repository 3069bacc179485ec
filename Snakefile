# Reading-comprehension LoRA workflow:
# xlsx -> train/val/test JSON -> LoRA adapter -> merged checkpoint -> answers CSV
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/ensemble.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
