"""Sine position embeddings (Transformer / DETR), for feature-map pixels and for query boxes,
and RT-DETR's 2-D sin-cos embedding for the hybrid encoder's attention (AIFI)."""
from typing import Tuple

import math

import torch


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """coords: (..., D) positions in [0, 1] -> (..., D * num_feats).

    Each coordinate u becomes [sin(2 pi u / T^(0/F)), cos(2 pi u / T^(0/F)),
    sin(2 pi u / T^(2/F)), ...] with F = num_feats (even) and T = temperature; the coordinates'
    embeddings are concatenated.
    """
    if num_feats % 2:
        raise ValueError(f"sine_embedding: num_feats must be even, got {num_feats}")
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)                    # (F,)
    pos = coords.float()[..., None] * (2 * math.pi) / dim_t                  # (..., D, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)  # (..., D, F/2, 2)
    return pos.flatten(-3)


def map_position_embedding(size_hw: Tuple[int, int], dim: int, device,
                           temperature: float = 20.0) -> torch.Tensor:
    """(H, W) -> (H * W, dim): embedding of each pixel ((y + 1) / H, (x + 1) / W), y's half
    first, in row-major order: DINO's map embedding (a cumulative count normalised by the last,
    temperature 20; Deformable DETR's would be (y + 0.5) / H)."""
    h, w = size_hw
    y = (torch.arange(h, dtype=torch.float32, device=device) + 1) / h
    x = (torch.arange(w, dtype=torch.float32, device=device) + 1) / w
    yx = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(h * w, 2)
    return sine_embedding(yx, dim // 2, temperature)


def box_position_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0
                           ) -> torch.Tensor:
    """(..., 4) normalised cxcywh -> (..., 2 * dim) in DINO's order (y, x, w, h): the decoder's
    query position comes from this through a small MLP (Conditional / DAB-DETR)."""
    cx, cy, w, h = boxes.unbind(-1)
    return sine_embedding(torch.stack([cy, cx, w, h], dim=-1), dim // 2, temperature)


def sincos_2d_embedding(size_hw: Tuple[int, int], dim: int, temperature: float = 10000.0,
                        device=None) -> torch.Tensor:
    """(H, W) -> (H * W, dim): RT-DETR's 2-D sin-cos embedding of each token's pixel indices
    (x, y) (x = column, y = row; row-major order, as `flatten(2)` orders a map's tokens):
    [sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)] for k < dim / 4, w_k = T^(-4k / dim).
    (RT-DETR's code lists its grid column by column while its tokens run row by row, which swaps
    x and y on square maps; here every token gets its own (x, y).)"""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a dim divisible by 4, got {dim}")
    h, w = size_hw
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float32, device=device)
                             / (dim // 4))
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                          torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega                  # (H*W, dim/4)
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
