"""The VisDial v1.0 answer-ranking metric (`visdial.py`, loadable with `evaluate.load` from this folder)."""

from .visdial import scores_to_ranks, visdial_metrics

__all__ = ["scores_to_ranks", "visdial_metrics"]
