"""Start from a COCO-trained detector (issue 9, item 8): load the `backbone.*` weights of an
mmdet or detrex DINO Swin checkpoint into our Swin (what the paper's detection numbers started
from). The mapping is a pure function; loading is strict, listing missing and unexpected keys."""
import re
from typing import List, Tuple

import torch

from ..backbone import CheckpointError, IVTBackbone, StateDict, read_state_dict

OUTPUT_NORM = re.compile(r"norm\d\.(weight|bias)")


def unfold_to_concat_order(w: torch.Tensor) -> torch.Tensor:
    """Patch merging in mmdet concatenates the 2x2 neighbourhood as `nn.Unfold` does: channel c of
    offset k=(dh, dw) at c * 4 + k, offsets (0,0) (0,1) (1,0) (1,1). The Swin release (and this
    repository) concatenates whole offsets: k * C + c, offsets (0,0) (1,0) (0,1) (1,1).
    The inverse of mmdet's `correct_unfold_reduction_order` / `correct_unfold_norm_order`.
    w: (out, 4C) reduction weight or (4C,) norm parameter."""
    lead = w.shape[:-1]
    c = w.shape[-1] // 4
    w = w.reshape(*lead, c, 4).transpose(-1, -2)              # (..., 4[unfold order], C)
    return w[..., [0, 2, 1, 3], :].reshape(*lead, 4 * c)


def mmdet_to_release(sd: StateDict) -> StateDict:
    """mmdet's SwinTransformer names -> the Swin release's (downsample still closing stage i)."""
    out = {}
    for k, v in sd.items():
        if ".downsample." in k:
            v = unfold_to_concat_order(v)
        k = k.replace("patch_embed.projection.", "patch_embed.proj.").replace("stages.", "layers.")
        k = k.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
        out[k.replace(".ffn.layers.1.", ".mlp.fc2.")] = v
    return out


def dino_backbone_filter_fn(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """A whole-detector state dict -> (the backbone's weights in the Swin release's layout,
    the keys set aside). Pure.

    Keeps `backbone.*` (the neck, transformer and heads are for COCO's 80 classes and another
    design). Set aside on purpose and returned by name: the per-level output norms `norm0..3`,
    which our backbone does not have (our neck normalises each level with GroupNorm instead).
    """
    sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if not sd:
        raise CheckpointError("no 'backbone.*' keys: not an mmdet / detrex detector checkpoint")
    if any(k.startswith("stages.") for k in sd):
        sd = mmdet_to_release(sd)
    ignored = sorted("backbone." + k for k in sd if OUTPUT_NORM.fullmatch(k))
    return {k: v for k, v in sd.items() if not OUTPUT_NORM.fullmatch(k)}, ignored


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
