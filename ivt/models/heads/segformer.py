"""The Segformer all-MLP decode head (Xie et al., 2021), the paper's segmentation head (spec sec. 6).

Each of the four backbone levels (strides 4, 8, 16, 32) is projected by a Linear layer to one width
`embed_dim`, upsampled to stride 4 (bilinear, align_corners=False), the four maps are concatenated
(deepest first, as in the reference implementation), fused by a 1x1 conv + BN + ReLU, and a 1x1
conv after dropout gives the class logits at stride 4. The head is always trainable.

`embed_dim`: the original Segformer-B5 uses 768; the paper does not state its width, so we default
to 256 (mmsegmentation's `channels=256` for large backbones) and expose it as `--head-dim`.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPProjection(nn.Module):
    """Per-level Linear on the channel dimension: (B, C, H, W) -> (B, E, H, W)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))               # (B, HW, E)
        return x.transpose(1, 2).reshape(b, -1, h, w)             # (B, E, H, W)


class SegformerHead(nn.Module):
    """features [(B, C_i, H/2^(i+2), W/2^(i+2)) for i = 0..3] -> logits (B, K, H/4, W/4).

    Args:
        in_channels: channels of the four levels (the backbone's `out_channels`).
        num_classes: K.
        embed_dim: common width of the projected levels and of the fused map.
        dropout: Dropout2d probability before the classifier (0.1 as in Segformer).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SegformerHead expects 4 levels, got in_channels={list(in_channels)}")
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(f"embed_dim and num_classes must be positive, got {embed_dim}, "
                             f"{num_classes}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.projections = nn.ModuleList(MLPProjection(c, embed_dim) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(4 * embed_dim, embed_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]                              # stride 4
        maps = [F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
                for proj, f in zip(self.projections, features)]   # 4 x (B, E, H/4, W/4)
        x = self.fuse(torch.cat(maps[::-1], dim=1))               # (B, 4E, ...) -> (B, E, ...)
        return self.classifier(self.dropout(x))                   # (B, K, H/4, W/4)
