"""The neck: backbone levels -> `num_levels` maps of `dim` channels (1x1 conv + GroupNorm each;
levels beyond the backbone's are made by stride-2 3x3 convs from the last one, as DINO's)."""
from typing import List

import torch
import torch.nn as nn


class ChannelMapper(nn.Module):
    """in_channels: the backbone's per-level channels (strides 4, 8, 16, 32).

    Uses the backbone levels from `first_level` on (at most `num_levels` of them) and adds extra
    levels (strides x2 each) until there are `num_levels`: DINO's 4-scale is first_level=1,
    num_levels=4 (strides 8-64); its 5-scale is first_level=0, num_levels=5 (strides 4-64).
    """

    def __init__(self, in_channels: List[int], dim: int = 256, num_levels: int = 4,
                 first_level: int = 0, groups: int = 32):
        super().__init__()
        if num_levels < 1 or not 0 <= first_level < len(in_channels):
            raise ValueError(f"num_feature_levels={num_levels} must be >= 1 and "
                             f"first_backbone_level={first_level} in [0, {len(in_channels)})")
        groups = min(groups, dim)
        if dim % groups:
            raise ValueError(f"hidden_dim {dim} is not divisible by the "
                             f"GroupNorm's {groups} groups")
        self.in_channels, self.first = list(in_channels), first_level
        used = self.in_channels[first_level:first_level + num_levels]
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(groups, dim))
            for c in used)
        extra_in = ([used[-1]] + [dim] * (num_levels - len(used) - 1))[:num_levels - len(used)]
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=3, stride=2, padding=1),
                          nn.GroupNorm(groups, dim))
            for c in extra_in)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """[(B, C_l, H_l, W_l)] from the backbone -> [(B, dim, H_l, W_l)] for the num_levels
        levels."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"neck built for {len(self.in_channels)} backbone levels, "
                             f"got {len(features)}")
        features = features[self.first:self.first + len(self.lateral)]
        outs = [proj(f) for proj, f in zip(self.lateral, features)]
        x = features[-1]
        for conv in self.extra:
            x = conv(x)
            outs.append(x)
        return outs


def build_neck(in_channels: List[int], cfg) -> ChannelMapper:
    return ChannelMapper(in_channels, cfg.hidden_dim, cfg.num_feature_levels,
                         cfg.first_backbone_level)
