"""Evaluation metrics, one file per task: segmentation (`seg.py`), and beside it SOD and detection."""
from .seg import SegMetric

__all__ = ["SegMetric"]
