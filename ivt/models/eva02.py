"""EVA-02 (Fang et al., 2023): the shared ViT (`vit.py`) with separate q/k/v projections (q and
v biased), 2-D rotary position embedding on the patch tokens and a SwiGLU MLP with a "subln"
LayerNorm, and its checkpoints.

The architecture is timm's `eva02_base_patch14_224.mim_in22k` /
`eva02_large_patch14_224.mim_m38m` (pre-norm blocks, LayerNorm eps 1e-6, no layer scale), and
parameter names are timm's, so timm files load as they are and the original release's after
`checkpoint_filter_fn`.

The paper runs EVA02-L with patch 16. The released weights are patch 14; the authors trained
from them as converted by EVA's `interpolate_patch_14to16.py` (their file
`eva02_L_pt_m38m_p14to16_converted.pt`), and loading a patch-14 checkpoint into a patch-16 model
converts it the same way (`eva_patch_conversion`).
Any input whose sides are multiples of the patch works: the absolute position embedding is resized
bicubically to the token grid (PyTorch's plain bicubic, as EVA's and the authors' code) and the
rotary positions are scaled to a reference grid of 16, so the (H, W) grid spans the same angles as
the 16 x 16 pre-training grid.
"""
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch.nn.functional as F

from .backbone import StateDict
from .vit import (Grid, ViTBackbone, ViTConfig, apply_rope, feature_blocks, fit_embeddings,
                  resize_pos_embed, rope_sin_cos, square_side)

# EVA02's public names: its own, and the shared ViT's rotary embedding (EVA02's option) and
# feature taps, which describe EVA02 as much as the other families.
__all__ = ["EVA02Config", "EVA02_CONFIGS", "EVA02Backbone", "checkpoint_filter_fn",
           "eva_patch_conversion", "apply_rope", "feature_blocks", "rope_sin_cos"]


@dataclass
class EVA02Config(ViTConfig):
    """EVA02's options of the shared ViT (the sizes are given)."""
    rope_ref_grid: Optional[int] = 16        # the rotary angles' pre-training grid (224 / 14)
    qkv_fused: bool = False
    swiglu: bool = True
    antialias: bool = False                  # plain bicubic position resizes, as EVA's code


EVA02_CONFIGS: Dict[str, EVA02Config] = {
    "eva02_b": EVA02Config(768, 12, 12, int(768 * 4 * 2 / 3)),      # 2048
    "eva02_l": EVA02Config(1024, 24, 16, int(1024 * 4 * 2 / 3)),    # 2730, the paper's model
}


# Original release -> timm names (the EVA02 MIM checkpoints, `{'module': ...}`).
_RENAMES = ((r"\.mlp\.ffn_ln\.", ".mlp.norm."), (r"\.mlp\.w1\.", ".mlp.fc1_g."),
            (r"\.mlp\.w2\.", ".mlp.fc1_x."), (r"\.mlp\.w3\.", ".mlp.fc2."),
            (r"\.attn\.q_bias$", ".attn.q_proj.bias"), (r"\.attn\.v_bias$", ".attn.v_proj.bias"))
# Dropped on purpose: pre-training leftovers and the classifier path, which the features never use.
_DROPPED_PREFIXES = ("mask_token", "lm_head.", "norm.", "fc_norm.", "head.")


# EVA's patch conversion writes the position embedding for a 32 x 32 grid (512 / 16).
EVA_CONVERTED_GRID: Grid = (32, 32)


def eva_patch_conversion(state_dict: StateDict, patch_size: int) -> StateDict:
    """EVA's `interpolate_patch_14to16.py` (EVA-02's version), which made the checkpoint the
    paper's EVA02-L runs trained from. Pure; the state dict in this module's names.

    The patch kernel (C, 3, 14, 14) -> (C, 3, patch_size, patch_size) and the position grid
    (1, 1 + 16*16, C) -> (1, 1 + 32*32, C), both by PyTorch's plain bicubic (align_corners=False)
    in float32, the cls entry kept. Unlike the pseudo-inverse resize (`resize_patch_kernel`), the
    kernel's values are resampled as an image, so a 16 x 16 patch's token is about (16/14)^2 times
    the 14 x 14 patch's.
    """
    out = dict(state_dict)
    kernel = out["patch_embed.proj.weight"].float()                        # (C, 3, p, p)
    out["patch_embed.proj.weight"] = F.interpolate(kernel, size=(patch_size, patch_size),
                                                   mode="bicubic", align_corners=False)
    if "pos_embed" in out:
        side = square_side(out["pos_embed"])
        out["pos_embed"] = resize_pos_embed(out["pos_embed"].float(), (side, side),
                                            EVA_CONVERTED_GRID, antialias=False)
    return out


def checkpoint_filter_fn(state_dict: StateDict, patch_size: int, pos_grid: Grid) -> StateDict:
    """Map an EVA02 checkpoint (original release or timm) onto this module's names. Pure.

    Dropped on purpose: the rotary `rope.*` buffers (recomputed for every grid), the MIM
    pre-training leftovers `mask_token` and `lm_head.*`, and the final `norm`/`fc_norm`/`head`
    that only feed a classifier. The release's `q_bias`/`v_bias` become `q_proj.bias`/
    `v_proj.bias`, `mlp.w1/w2/w3` become `mlp.fc1_g/fc1_x/fc2`, `mlp.ffn_ln` becomes `mlp.norm`.
    A kernel whose size differs from the model's patch is converted as EVA's tool does
    (`eva_patch_conversion`), then the position embedding is resized to the model's grid by plain
    bicubic (`fit_embeddings`, as the authors' loaders).
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_DROPPED_PREFIXES) or k.startswith("rope.") or ".rope." in k:
            continue
        for pattern, new in _RENAMES:
            k = re.sub(pattern, new, k)
        out[k] = v
    kernel = out.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-1] != patch_size:
        out = eva_patch_conversion(out, patch_size)
    return fit_embeddings(out, patch_size, pos_grid, antialias=False)


class EVA02Backbone(ViTBackbone):
    """EVA02-B/L (`ViTBackbone` with `EVA02Config`'s options) loading EVA02 checkpoints."""

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.patch_size, self.pos_grid)
