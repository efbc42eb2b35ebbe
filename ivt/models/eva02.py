"""EVA-02 (Fang et al., 2023): the shared ViT (`vit.py`) with separate q/k/v projections (q and
v biased), 2-D rotary position embedding on the patch tokens and a SwiGLU MLP with a "subln"
LayerNorm, and its checkpoints.

The architecture is timm's `eva02_base_patch14_224.mim_in22k` /
`eva02_large_patch14_224.mim_m38m` (pre-norm blocks, LayerNorm eps 1e-6, no layer scale), and
parameter names are timm's, so timm files load as they are and the original release's after
`checkpoint_filter_fn`.

The paper runs EVA02-L with patch 16 (the released weights are patch 14: the kernel is resized on
loading). Any input whose sides are multiples of the patch works: the absolute position embedding
is resized bicubically to the token grid and the rotary positions are scaled to a reference grid
of 16, so the (H, W) grid spans the same angles as the 16 x 16 pre-training grid.
"""
import re
from dataclasses import dataclass
from typing import Dict, Optional

from .backbone import StateDict
from .vit import (Grid, ViTBackbone, ViTConfig, apply_rope, feature_blocks, fit_embeddings,
                  resize_patch_kernel, rope_sin_cos)

# EVA02's public names: its own, and the shared ViT's rotary embedding (EVA02's option), feature
# taps and patch-kernel resize, which describe EVA02 as much as the other families.
__all__ = ["EVA02Config", "EVA02_CONFIGS", "EVA02Backbone", "checkpoint_filter_fn",
           "apply_rope", "feature_blocks", "resize_patch_kernel", "rope_sin_cos"]


@dataclass
class EVA02Config(ViTConfig):
    """EVA02's options of the shared ViT (the sizes are given)."""
    rope_ref_grid: Optional[int] = 16        # the rotary angles' pre-training grid (224 / 14)
    qkv_fused: bool = False
    swiglu: bool = True


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


def checkpoint_filter_fn(state_dict: StateDict, patch_size: int, pos_grid: Grid) -> StateDict:
    """Map an EVA02 checkpoint (original release or timm) onto this module's names. Pure.

    Dropped on purpose: the rotary `rope.*` buffers (recomputed for every grid), the MIM
    pre-training leftovers `mask_token` and `lm_head.*`, and the final `norm`/`fc_norm`/`head`
    that only feed a classifier. The release's `q_bias`/`v_bias` become `q_proj.bias`/
    `v_proj.bias`, `mlp.w1/w2/w3` become `mlp.fc1_g/fc1_x/fc2`, `mlp.ffn_ln` becomes `mlp.norm`.
    The patch kernel is resized by `resize_patch_kernel` when its size differs from the model's
    patch, the position embedding bicubically to the model's grid (`fit_embeddings`).
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_DROPPED_PREFIXES) or k.startswith("rope.") or ".rope." in k:
            continue
        for pattern, new in _RENAMES:
            k = re.sub(pattern, new, k)
        out[k] = v
    return fit_embeddings(out, patch_size, pos_grid)


class EVA02Backbone(ViTBackbone):
    """EVA02-B/L (`ViTBackbone` with `EVA02Config`'s options) loading EVA02 checkpoints."""

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.patch_size, self.pos_grid)
