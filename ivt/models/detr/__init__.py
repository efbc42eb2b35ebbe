"""A small DETR-style detector (DINO / RT-DETR family) in plain PyTorch, one concept per file:
`box_ops`, `position_encoding`, `deformable_attention`, `neck`, `encoder` (DINO's deformable
encoder), `hybrid_encoder` (RT-DETR's), `query_selection`, `decoder`, `denoising`, `matcher`,
`criterion`, `detector`, and `coco_backbone` (loading a COCO-trained DINO's Swin backbone)."""
from .criterion import SetCriterion
from .coco_backbone import load_detector_backbone
from .detector import Detector, DetectorConfig, build_detector
from .matcher import HungarianMatcher

__all__ = ["Detector", "DetectorConfig", "build_detector", "load_detector_backbone",
           "SetCriterion", "HungarianMatcher"]
