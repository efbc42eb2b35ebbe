"""Start from a COCO-trained detector: load the `backbone.*` weights of an mmdet or detrex DINO
Swin checkpoint into our Swin (what the paper's detection numbers started from).

`--pretrained dino_swin_l` (or the file) does this in every script, through the Swin family's
`checkpoint_filter_fn` (the mapping is in `ivt/models/swin_mmdet.py`); `load_detector_backbone`
loads such a file into a backbone already built and returns the keys set aside."""
from typing import List

from ..backbone import CheckpointError, IVTBackbone, read_state_dict
from ..swin_mmdet import dino_backbone_filter_fn


def load_detector_backbone(backbone: IVTBackbone, path: str) -> List[str]:
    """Load the Swin backbone of an mmdet / detrex DINO checkpoint into `backbone`'s visible
    part; returns the checkpoint keys deliberately not loaded (see `dino_backbone_filter_fn`).
    Missing or unexpected backbone keys and shape mismatches are errors naming the keys."""
    if not hasattr(backbone, "cfg") or not hasattr(backbone.cfg, "window_size"):
        raise CheckpointError(f"detector checkpoints are supported for Swin backbones, "
                              f"not {type(backbone).__name__}")
    sd, ignored = dino_backbone_filter_fn(read_state_dict(path))
    backbone.load_visible_state(backbone.checkpoint_filter_fn(sd), f"detector checkpoint {path}")
    return ignored
