"""MAE (He et al., 2022): the shared ViT (`vit.py`) as the standard ViT-B/16, ViT-L/16 (fused,
biased qkv, GELU MLP of ratio 4, no LayerScale, LayerNorm eps 1e-6), and its checkpoints.

The architecture is the release's encoder (models_mae.py / models_vit.py: timm's `Block`,
`qkv_bias=True`), which timm names `vit_{base,large}_patch16_224.mae`. The release's files
(`mae_pretrain_vit_{base,large}.pth`, `{'model': ...}`) hold the encoder in timm's names, with
its fixed 2-D sin-cos position embedding for 224 px (14 x 14 + cls) stored as a tensor: it is
loaded as it is and resized bicubically to the model's grid. Patch 16 is the release's.
"""
from typing import Dict

from .backbone import StateDict
from .vit import Grid, ViTBackbone, ViTConfig, fit_embeddings

MAE_CONFIGS: Dict[str, ViTConfig] = {
    "mae_b": ViTConfig(768, 12, 12, 4 * 768),
    "mae_l": ViTConfig(1024, 24, 16, 4 * 1024),      # GoPT's backbone in the paper's Table 2
}

# Dropped on purpose: the final norm / classifier path, which the features never use, and the
# decoder and its mask token, which the `_full` and visualisation releases also hold (the MAE
# repository's issue 8).
_DROPPED_PREFIXES = ("norm.", "fc_norm.", "head.", "mask_token", "decoder_")


def checkpoint_filter_fn(state_dict: StateDict, patch_size: int, pos_grid: Grid) -> StateDict:
    """Map an MAE checkpoint (the release's, already unwrapped from `{'model': ...}`, or timm's)
    onto this module's names: the same names, less what is dropped on purpose (above); the patch
    kernel and the position embedding resized to the model's (`fit_embeddings`). Pure."""
    out = {k: v for k, v in state_dict.items() if not k.startswith(_DROPPED_PREFIXES)}
    return fit_embeddings(out, patch_size, pos_grid)


class MAEBackbone(ViTBackbone):
    """MAE ViT-B/16, ViT-L/16 (the standard `ViTBackbone`) loading MAE checkpoints."""

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.patch_size, self.pos_grid)
