"""DINOv2 (Oquab et al., 2023; registers: Darcet et al., 2024): the shared ViT (`vit.py`) with a
fused, biased qkv projection, a GELU MLP of ratio 4 and LayerScale (`ls1`, `ls2`) on both
residual branches, and optionally 4 register tokens; and its checkpoints.

The architecture is the release's `dinov2_vitb14` / `dinov2_vitl14` (dinov2/hub/backbones.py:
img_size 518, patch 14, `init_values` 1.0 (LayerScale on), `ffn_layer` "mlp", LayerNorm eps
1e-6) and `dinov2_vit{b,l}14_reg` (`num_register_tokens` 4), which timm names
`vit_{base,large}_patch14_dinov2.lvd142m` and `vit_{base,large}_patch14_reg4_dinov2.lvd142m`.
Parameter names are timm's (`reg_token` for the release's `register_tokens`).

The released kernel is patch 14 with a 37 x 37 position grid (518 px). The default here is patch
16, as the paper runs EVA02-L: the tasks' input sizes (512, 384, 640) are multiples of 16, not
14, and the heads read strides 4-32. The 14 x 14 kernel is resized to 16 x 16 on loading
(FlexiViT's pseudo-inverse resize: a 16 x 16 patch gives the token the release gives the same
patch resized to 14 x 14), and the position embedding to the model's grid; `patch_size=14` runs
the release's kernel as it is.

Registers get no position embedding: they are inserted after the cls token once the position
embedding is added (the release's `prepare_tokens_with_masks`). At input sizes other than its own
the release resizes its position embedding with an offset of 0.1 and no antialiasing; this model
resizes as timm does (bicubic with `antialias=True`), so outputs equal timm's.
"""
import math
from typing import Dict

import torch

from .backbone import CheckpointError, StateDict
from .vit import Grid, ViTBackbone, ViTConfig, fit_embeddings

LAYER_SCALE_INIT = 1e-5        # timm's `init_values` for DINOv2 (a random init only)
REGISTERS = 4                  # the `_reg4` releases

DINOV2_CONFIGS: Dict[str, ViTConfig] = {
    "dinov2_b": ViTConfig(768, 12, 12, 4 * 768, layer_scale=LAYER_SCALE_INIT),
    "dinov2_l": ViTConfig(1024, 24, 16, 4 * 1024, layer_scale=LAYER_SCALE_INIT),
    "dinov2_b_reg": ViTConfig(768, 12, 12, 4 * 768, layer_scale=LAYER_SCALE_INIT,
                              registers=REGISTERS),
    "dinov2_l_reg": ViTConfig(1024, 24, 16, 4 * 1024, layer_scale=LAYER_SCALE_INIT,
                              registers=REGISTERS),
}

# Dropped on purpose: the masked-image-modelling token and the final norm / classifier path,
# which the features never use.
_DROPPED_PREFIXES = ("mask_token", "norm.", "fc_norm.", "head.")


def checkpoint_filter_fn(state_dict: StateDict, patch_size: int, pos_grid: Grid,
                         registers: int) -> StateDict:
    """Map a DINOv2 checkpoint (the release's `dinov2_vit*14[_reg4]_pretrain.pth` or timm's)
    onto this module's names, for a model with `registers` register tokens. Pure.

    Dropped on purpose: `mask_token` (pre-training) and the final `norm`/`fc_norm`/`head`. The
    release's `register_tokens` become `reg_token`. timm's register files store the position
    embedding without a cls entry and the cls token with that entry added (`no_embed_class`):
    a zero cls entry is put back, which gives the same sum. A checkpoint whose register count
    differs from the model's is an error that says so. The patch kernel and the position
    embedding are resized to the model's (`fit_embeddings`).
    """
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(_DROPPED_PREFIXES):
            out["reg_token" if k == "register_tokens" else k] = v
    found = out["reg_token"].shape[1] if "reg_token" in out else 0
    if found != registers:
        raise CheckpointError(
            f"the checkpoint has {found or 'no'} register tokens, the model "
            f"{registers or 'none'}: " + ("build dinov2_b_reg / dinov2_l_reg for a checkpoint "
                                          "with registers" if found else
                                          "build dinov2_b / dinov2_l for a checkpoint without "
                                          "registers"))
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:     # no cls entry
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return fit_embeddings(out, patch_size, pos_grid)


class DINOv2Backbone(ViTBackbone):
    """DINOv2 ViT-B/14, ViT-L/14 (`ViTBackbone` with LayerScale, optionally registers) loading
    DINOv2 checkpoints."""

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.patch_size, self.pos_grid,
                                    self.cfg.registers)
