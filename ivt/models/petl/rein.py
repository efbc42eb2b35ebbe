"""Rein (Wei et al., "Stronger, Fewer, & Superior", CVPR 2024): learnable tokens refine every
block's output.

For block i with output f_i (N, C) and tokens T_i (m, C) (Rein Sec. 3):
    S_i   = softmax(f_i T_i^T / sqrt(C))                      token-feature similarity (N, m)
    df'_i = S_i[:, 1:] (T_i[1:] W_T + b_T)                     the first token only normalises
    df_i  = (df'_i + f_i) W_f + b_f
    f_i  <- f_i + alpha * df_i                                 alpha learnable, init 1e-3
Low-rank tokens T_i = A_i B_i with A_i (m, r), B_i (r, C) (Rein's default LoRA tokens, m = 100,
r = 16), and the two MLPs (W_T, b_T), (W_f, b_f) and alpha shared by the layers. For a
hierarchical backbone Rein's release (its ConvNeXt-L config) builds one such module per stage,
shared by the stage's blocks (the widths differ between stages); so do we for Swin, and one module
for the ViTs (EVA02, DINOv2, MAE). The release's link to Mask2Former queries (`transform`, `merge`)
has no counterpart in a Segformer head and is left out. On the ViTs the cls (and register) tokens
pass unchanged, as in the release.

Trainable parameters per stage: L (m r + r C) + 2 (C^2 + C) + 1. With W_f = 0, b_f = 0 (or
alpha = 0) the block outputs are unchanged.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ivtuning import Grid


class Rein(nn.Module):
    """Rein for one stage of `num_layers` blocks of width `dim`."""

    def __init__(self, dim: int, num_layers: int, tokens: int = 100, rank: int = 16,
                 scale_init: float = 1e-3, patch: int = 16):
        super().__init__()
        self.dim = dim
        self.tokens_a = nn.Parameter(torch.empty(num_layers, tokens, rank))     # A_i
        self.tokens_b = nn.Parameter(torch.empty(num_layers, rank, dim))        # B_i
        self.scale = nn.Parameter(torch.tensor(scale_init))                      # alpha
        self.mlp_token2feat = nn.Linear(dim, dim)                                # W_T, b_T
        self.mlp_delta_f = nn.Linear(dim, dim)                                   # W_f, b_f
        # the release's token init; its configs use patch_size 16 for every backbone (ConvNeXt too)
        val = math.sqrt(6.0 / float(3 * patch * patch + math.sqrt(dim * rank)))
        nn.init.uniform_(self.tokens_a, -val, val)
        nn.init.uniform_(self.tokens_b, -val, val)

    def forward(self, f: torch.Tensor, layer: int) -> torch.Tensor:
        """f: (B, N, C) the output of the stage's block `layer` -> refined (B, N, C)."""
        t = self.tokens_a[layer] @ self.tokens_b[layer]                          # T_i (m, C)
        s = F.softmax(f @ t.T * self.dim ** -0.5, dim=-1)                        # S_i (B, N, m)
        delta = s[..., 1:] @ self.mlp_token2feat(t[1:])                          # df'_i
        delta = self.mlp_delta_f(delta + f)                                      # df_i
        return f + self.scale * delta


class ReinHook:
    """A block's `adapters` hook into its stage's shared `Rein` (a plain callable, not a module:
    the parameters live once, in the stage's Rein)."""

    def __init__(self, rein: Rein, layer: int):
        self.rein, self.layer = rein, layer

    def __call__(self, pos: int, z_in: torch.Tensor, z_out: torch.Tensor,
                 prompt: Optional[torch.Tensor], hw: Grid
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if pos == 0:
            return z_out, prompt
        return self.rein(z_out, self.layer), prompt

    def __repr__(self) -> str:
        return f"ReinHook(layer={self.layer})"
