"""Local Hugging Face `evaluate` metrics, each a folder holding `<name>.py` and its card (`README.md`).

`evaluate.load(str(VISDIAL_METRIC_DIR))` loads the VisDial metric offline from the installed package; its plain
functions (`scores_to_ranks`, `visdial_metrics`) are importable as `modeling_omnifusion.evaluation.metrics.visdial`.
"""

from pathlib import Path

VISDIAL_METRIC_DIR = Path(__file__).resolve().parent / "visdial"
