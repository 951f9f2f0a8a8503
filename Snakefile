# attnlab: information flow through attention, and sparse-attention policies compared.
# Main job: snakemake --cores 8 figs/niah_heatmap_99.png
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow_config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/capture.smk"
include: "rules/intervention.smk"
include: "rules/induction.smk"
include: "rules/niah.smk"
include: "rules/pareto.smk"
include: "rules/curvature.smk"
include: "rules/bench.smk"


rule all:
    input:
        all_targets(),
