"""The whole experiment as one command: the numbered notebooks run headless through papermill.

    python -m helpers.pipeline [--preset demo|smoke|gpt2-owt] [--out DIR] [key=value ...]

Steps, each an executed notebook kept in the run folder as the record:
01 data -> (parent pre-trained from scratch here, when the preset says so) -> 02 inherit (layer
scores, every strategy's untrained child) -> 03 once per arm of `compare` (default: the inherited
child and a scratch model of the same shape), all on the same token budget and recipe -> 04
evaluate -> 05 plots. With grow=true, the paper's Algorithm 2 instead: rounds of 02-03-04 with a
growing child until it reaches the parent's val loss. A failing notebook stops the pipeline with
the path of its executed copy and the failing cell's error.
"""
from helpers.pipeline.experiments import compare_table, main, run, run_grow  # noqa: F401
from helpers.pipeline.notebooks import NOTEBOOKS, REPO, NotebookFailed, run_notebook  # noqa: F401
from helpers.pipeline.report import (finite_or_null, machine, summarize, write_readme_compare,  # noqa: F401
                                     write_readme_results)
from helpers.pipeline.settings import (ARMS, COMMON, PRESETS, PROMPTS, RECIPES, absolute_paths, arm_label,  # noqa: F401
                                       arm_names, arm_settings, settings, train_settings, untrained_label)
