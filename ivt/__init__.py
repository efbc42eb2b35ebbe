"""IV-tuning: parameter-efficient transfer of visible-light vision transformers to
infrared-visible tasks (salient object detection, semantic segmentation, object detection)."""
__version__ = "0.1.0"
