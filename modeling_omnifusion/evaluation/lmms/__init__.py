"""
OmniFusion in lmms-eval (0.7.x): the chat model `omnifusion` and offline task configs.

The model is registered through the `lmms_eval.models` entry point (`registration.MANIFEST`), so after
`pip install "omnifusion-transformers[lmms]"` `lmms-eval --model omnifusion` finds it. The task YAMLs in `TASKS_DIR`
(`python -m modeling_omnifusion.evaluation.lmms` prints the folder, for `--include_path`) run TextVQA, ScienceQA-IMG,
POPE, GQA and OK-VQA on local parquet files laid out like their Hub datasets, and Visual Dialog (`visdial_val`).
Nothing here is imported by the model's own code; only lmms-eval loads these modules.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
