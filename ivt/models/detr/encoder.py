"""The deformable encoder (Deformable DETR, DINO): layers of deformable self-attention over the
flattened multi-scale tokens, each token attending around its own position on every level, then
an FFN; post-norm. DINO stacks 6 such layers with FFN 2048 and dropout 0 (`--encoder deformable`
with the default `--enc-layers 6`); hybrid_encoder.py holds RT-DETR's encoder, the default."""
from typing import List, Tuple

import torch
import torch.nn as nn

from .deformable_attention import MultiScaleDeformableAttention

Shapes = List[Tuple[int, int]]


class FeedForward(nn.Module):
    """x + Dropout(W2 act(W1 x)), then LayerNorm (post-norm, as DETR's transformer); act is ReLU
    (DINO) or GELU (RT-DETR's AIFI). (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: type = nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), activation(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor,
                shapes: Shapes) -> torch.Tensor:
        """src, pos: (B, S, C); reference: (B, S, L, 2) -> (B, S, C)."""
        src = self.norm(src + self.dropout(self.self_attn(src + pos, reference, src, shapes)))
        return self.ffn(src)


def token_reference_points(shapes: Shapes, batch: int, device) -> torch.Tensor:
    """Each token's pixel centre (x, y) in [0, 1], used as its reference on every level:
    -> (B, S, L, 2). (Inputs are not padded, so every level spans the whole image.)"""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
                              indexing="ij")
        points.append(torch.stack([x, y], dim=-1).reshape(h * w, 2))
    points = torch.cat(points)                                        # (S, 2)
    return points[None, :, None, :].expand(batch, -1, len(shapes), -1)


class Encoder(nn.Module):
    """`num_layers` deformable encoder layers; every layer reads every level."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, num_levels, num_points, ffn_dim,
                                                 dropout)
                                    for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """src, pos: (B, S, C) flattened levels -> memory (B, S, C). The reference points stay
        float32 under autocast (see deformable_attention.py)."""
        reference = token_reference_points(shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, reference, shapes)
        return src


def build_encoder(cfg) -> Encoder:
    """The deformable encoder of a `DetectorConfig`: `enc_layers` layers, FFN `ffn_dim`."""
    return Encoder(cfg.enc_layers, cfg.hidden_dim, cfg.num_heads, cfg.num_feature_levels,
                   cfg.num_points, cfg.ffn_dim, cfg.dropout)
