"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) with `F.grid_sample`.

Each query attends to a few sampled points per head and level around its reference point,
instead of to every token: out = W_o sum_{l, p} A_{h,l,p} * V_l(ref + offset_{h,l,p}).
No compiled extension: every level is one bilinear `grid_sample`, which is exact for any
(H_l, W_l), square or not, because offsets and locations are normalised per level by (W_l, H_l).

Precision: the offsets, locations, attention weights and the bilinear sampling are computed in
float32 (float64 stays float64) even under bf16 autocast (`--amp`). A bfloat16 coordinate in [0, 1]
has 8 significant bits: near 1 its spacing is 2^-8, 2.5 pixels of a 640-pixel level, so a bf16
sampling grid would read the wrong pixels. Only the value and output projections follow autocast.
"""
import math
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Shapes = List[Tuple[int, int]]


def multi_scale_deformable_attention(value: torch.Tensor, shapes: Shapes,
                                     locations: torch.Tensor,
                                     weights: torch.Tensor) -> torch.Tensor:
    """The sampling core.

    value: (B, S, M, D) per-head values of all levels, flattened level by level (S = sum H_l W_l).
    shapes: [(H_l, W_l)] for the L levels.
    locations: (B, Q, M, L, P, 2) sampling points as (x, y) in [0, 1] of each level's extent;
        pixel (i, j) covers [j, j+1] / W_l x [i, i+1] / H_l, so its centre is at
        ((j+.5)/W_l, (i+.5)/H_l).
    weights: (B, Q, M, L, P) attention weights (softmax over L * P per head).
    Returns (B, Q, M * D) in value's dtype. Points outside the map read zeros (bilinear, as the
    CUDA kernel does). The sampling runs in float32 at least: a lower-precision value is cast up,
    the grid is built from locations in float32 (or float64) and the result is cast back.
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"value has {S} tokens but the level shapes {shapes} hold "
                         f"{sum(h * w for h, w in shapes)}")
    out_dtype = value.dtype
    dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), torch.float32)
    with torch.autocast(value.device.type, enabled=False):
        out = _sample(value.to(dtype), shapes, locations.to(dtype), weights.to(dtype))
    return out.to(out_dtype)


def _sample(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """`multi_scale_deformable_attention` with every input in one dtype."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    grids = 2 * locations - 1                                   # grid_sample's [-1, 1]
    sampled = []
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = v.permute(0, 2, 3, 1).reshape(B * M, D, h, w)       # (B*M, D, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))      # (B*M, D, Q, P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)          # (B*M, D, Q, L*P)
    w = weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)
    out = (sampled * w).sum(-1)                                 # (B*M, D, Q)
    return out.view(B, M * D, Q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """`forward(query, reference, value, shapes)`; dim split over `num_heads` heads, each sampling
    `num_points` points on each of `num_levels` levels."""

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_levels, self.num_points = (dim, num_heads, num_levels,
                                                                      num_points)
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head h starts sampling along direction 2 pi h / M, point p at
        distance p + 1 (in pixels of each level); uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]                       # (M, 2)
        grid = grid[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: Shapes) -> torch.Tensor:
        """
        query: (B, Q, C) (content + position). value: (B, S, C), the flattened levels.
        reference: (B, Q, L, 2) points (x, y) in [0, 1], offsets then count in pixels of each
            level; or (B, Q, L, 4) boxes (cx, cy, w, h), offsets then scale with the box
            (Deformable DETR's two-stage / refinement variant).
        Returns (B, Q, C). Offsets, locations and weights are computed in float32 at least,
        also under autocast (see the module docstring).
        """
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != L:
            raise ValueError(f"expected {L} levels, got shapes {shapes}")
        if reference.shape[-1] not in (2, 4):
            raise ValueError("reference must end in 2 (points) or 4 (boxes), got "
                             f"{tuple(reference.shape)}")
        v = self.value_proj(value).view(B, value.shape[1], M, self.dim // M)
        dtype = torch.promote_types(torch.promote_types(query.dtype, reference.dtype),
                                    torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            q, reference = query.to(dtype), reference.to(dtype)
            offsets = _linear(self.sampling_offsets, q).view(B, Q, M, L, P, 2)
            weights = _linear(self.attention_weights, q).view(B, Q, M, L * P).softmax(-1)
            weights = weights.view(B, Q, M, L, P)
            if reference.shape[-1] == 2:
                wh = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=query.device)
                locations = (reference[:, :, None, :, None, :]
                             + offsets / wh[None, None, None, :, None, :])
            else:
                locations = (reference[:, :, None, :, None, :2]
                             + offsets / P * reference[:, :, None, :, None, 2:] * 0.5)
        out = multi_scale_deformable_attention(v, shapes, locations, weights)
        return self.output_proj(out)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in x's dtype, whatever the dtype the layer's parameters are stored in."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
