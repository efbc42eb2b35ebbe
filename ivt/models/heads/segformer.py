"""The Segformer decode head as mmsegmentation runs it (`mmseg.models.decode_heads.SegformerHead`),
the paper's segmentation head (Sec. 4.1: the paper trains with mmseg's Segformer).

Each of the four backbone levels (strides 4, 8, 16, 32) goes through a 1x1 conv without bias + BN
+ ReLU to one width `embed_dim` (mmseg's `channels`), is resized to the stride-4 level's size
(bilinear, align_corners=False), the four maps are concatenated shallow level first, fused by a
1x1 conv without bias + BN + ReLU, and a 1x1 conv with bias after Dropout2d gives the class
logits at stride 4. The head is always trainable. Module names follow mmseg's (`convs`,
`fusion_conv`, `conv_seg`), and so does the initialisation: the convs followed by BN
kaiming-normal (fan_out, relu) with BN weight 1 and bias 0, the classifier normal(std 0.01) with
bias 0.

`embed_dim`: the paper does not state the head's width; we default to 256 (mmseg's Segformer
configs, `channels=256`) and expose it as `--head-dim`.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Module):
    """1x1 conv (no bias) + BatchNorm + ReLU, mmcv's `ConvModule` with a BN norm:
    (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        # mmcv's ConvModule.init_weights: kaiming_init (normal, fan_out, relu); BN 1 / 0.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SegformerHead(nn.Module):
    """features [(B, C_i, H/2^(i+2), W/2^(i+2)) for i = 0..3] -> logits (B, K, H/4, W/4).

    Args:
        in_channels: channels of the four levels (the backbone's `out_channels`).
        num_classes: K.
        embed_dim: common width of the projected levels and of the fused map (mmseg's `channels`).
        dropout: Dropout2d probability before the classifier (0.1, mmseg's `dropout_ratio`).
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
        self.convs = nn.ModuleList(ConvBNReLU(c, embed_dim) for c in in_channels)
        self.fusion_conv = ConvBNReLU(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        # mmseg's BaseDecodeHead init_cfg: Normal(std=0.01) on conv_seg, bias 0.
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]                              # stride 4
        maps = [F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                for conv, f in zip(self.convs, features)]         # 4 x (B, E, H/4, W/4)
        x = self.fusion_conv(torch.cat(maps, dim=1))              # (B, 4E, ...) -> (B, E, ...)
        return self.conv_seg(self.dropout(x))                     # (B, K, H/4, W/4)
