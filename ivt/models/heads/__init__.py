"""Task heads that sit on the backbone's four feature maps: `segformer.py` (segmentation)."""
from .segformer import SegformerHead

__all__ = ["SegformerHead"]
