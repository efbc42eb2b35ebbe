"""Evaluation metrics, one file per task: segmentation (`seg.py`), SOD and detection beside it."""
from .det import DetMetric
from .seg import SegMetric
from .sod import SODMetric

__all__ = ["DetMetric", "SegMetric", "SODMetric"]
