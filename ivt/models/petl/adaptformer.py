"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck in parallel with every MLP.

AdaptFormer Eq. 1-3, with x'_l = x_{l-1} + Attention(LN(x_{l-1})) the MLP sub-layer's input:
    x~_l = ReLU(x'_l W_down) W_up                 (Eq. 2; the release's default feeds x'_l
                                                   without a LayerNorm, as here)
    x_l  = x'_l + MLP(LN(x'_l)) + s * x~_l         (Eq. 3)
W_down: C -> r and W_up: r -> C with biases, dropout 0.1 on the hidden units, s = 0.1, r = 64;
init as the release's "lora" option: W_down kaiming-uniform, W_up and both biases zero, so the
frozen model is unchanged at step 0. Trainable parameters: 2 C r + r + C per block.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ivtuning import Grid


class AdaptFormer(nn.Module):
    """One block's AdaptFormer: the `adapters` hook, acting after the MLP (pos 1)."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """x~ of Eq. 2: (B, N, C) -> (B, N, C)."""
        return self.up(self.drop(F.relu(self.down(x))))

    def forward(self, pos: int, z_in: torch.Tensor, z_out: torch.Tensor,
                prompt: Optional[torch.Tensor], hw: Grid):
        """z_in: the MLP's input x'_l, z_out = x'_l + MLP(LN(x'_l)); both (B, N, C)."""
        if pos == 0:
            return z_out, prompt
        return z_out + self.scale * self.branch(z_in), prompt              # Eq. 3

    def extra_repr(self) -> str:
        return f"s={self.scale}"
