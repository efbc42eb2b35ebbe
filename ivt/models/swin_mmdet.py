"""Swin checkpoints from detection codebases -> the Swin release's layout. Pure functions.

Two forms reach `swin.checkpoint_filter_fn` beside the release's and timm's files:

* mmdet's SwinTransformer names (`stages.i`, `attn.w_msa`, `ffn.layers`, `patch_embed.projection`,
  patch merging concatenated in `nn.Unfold`'s order), as in mmdet's converted backbones;
* a whole detector, e.g. a COCO-trained DINO Swin-L from mmdet (the `dino_swin_l` release in
  `ivt.weights`) or detrex, whose backbone is under `backbone.*` next to the neck, transformer
  and heads (what the paper's detection numbers started from).
"""
import re
import warnings
from collections import Counter
from typing import List, Tuple

import torch

from .backbone import CheckpointError, StateDict

# mmdet's and mmseg's per-output LayerNorms (`SwinBackbone(out_norms=True)`'s `out_norms.i`)
OUTPUT_NORM = re.compile(r"norm(\d)\.(weight|bias)")


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


def is_detector(state_dict: StateDict) -> bool:
    """A whole detector's state dict (its backbone under `backbone.*`)."""
    return any(k.startswith("backbone.") for k in state_dict)


def dino_backbone_filter_fn(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """A whole-detector state dict -> (the backbone's weights in the Swin release's layout, its
    per-output norms `norm0..3` included, and the keys set aside, sorted).

    Keeps `backbone.*`; sets aside the rest (the neck, transformer and heads are for COCO's 80
    classes and another design).
    """
    sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if not sd:
        raise CheckpointError("no 'backbone.*' keys: not an mmdet / detrex detector checkpoint")
    if any(k.startswith("stages.") for k in sd):
        sd = mmdet_to_release(sd)
    return sd, sorted(k for k in state_dict if not k.startswith("backbone."))


def to_release_layout(state_dict: StateDict) -> StateDict:
    """A detector's or mmdet's Swin state dict -> the Swin release's names (with mmdet's output
    norms `norm0..3`, if any); any other (release, timm) is returned as it is. What a detector's
    checkpoint holds beyond its backbone is named, by prefix and count, in a warning."""
    if is_detector(state_dict):
        state_dict, ignored = dino_backbone_filter_fn(state_dict)
        parts = Counter(k.split(".")[0] for k in ignored)
        if ignored:
            warnings.warn(f"detector checkpoint: only its backbone is loaded; {len(ignored)} keys "
                          f"of the detector's own parts not loaded: "
                          + ", ".join(f"{p}.* ({n})" for p, n in sorted(parts.items())),
                          stacklevel=2)
        return state_dict
    if any(k.startswith("stages.") for k in state_dict):
        return mmdet_to_release(state_dict)
    return state_dict
