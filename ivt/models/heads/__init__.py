"""Task heads that sit on the backbone's four feature maps: `segformer.py` (segmentation),
`cpnet.py` (salient object detection)."""
from .cpnet import CPNetDecoder
from .segformer import SegformerHead

__all__ = ["CPNetDecoder", "SegformerHead"]
