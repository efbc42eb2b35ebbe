"""Evaluation metrics, one file per task: segmentation (`seg.py`), SOD and detection beside it."""
from .seg import SegMetric

__all__ = ["SegMetric"]
