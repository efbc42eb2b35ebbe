"""RT-DETR's hybrid encoder (Zhao et al. 2024, "DETRs Beat YOLOs on Real-time Object Detection";
lyuwenyu/RT-DETR's HybridEncoder): `--encoder hybrid`, the default; encoder.py holds DINO's.

* AIFI (attention-based intra-scale feature interaction): one standard transformer encoder layer
  (multi-head self-attention, then an FFN with GELU; post-norm, dropout as configured) over the
  tokens of the coarsest level only (stride 32 with our default levels), with RT-DETR's 2-D sin-cos
  position embedding added to the queries and keys.
* CCFM (CNN-based cross-scale feature fusion): a top-down FPN path, then a bottom-up PAN path.
  Top-down, from the coarsest level: the running map passes a 1x1 lateral conv, is upsampled to
  the next finer level and fused with that level by a CSP block on their channel concatenation.
  Bottom-up, from the finest fused map: a 3x3 stride-2 conv downsamples it and a CSP block fuses it
  with the next coarser top-down map (as it left its lateral conv).
* CSP block (RT-DETR's CSPRepLayer, expansion 1): two 1x1 convs of the 2C-channel input; one
  branch runs through `num_blocks` RepVGG blocks (3x3 conv-BN plus 1x1 conv-BN, summed, SiLU);
  the two branches are summed (C channels).

Every conv is conv (no bias) + BatchNorm + SiLU (RT-DETR's ConvNormLayer with act='silu') unless
said otherwise; RT-DETR's default initialisation (PyTorch's). RT-DETR fuses three levels (strides
8-32); this fuses any number of levels, our default four (strides 4-32), and returns as many. Our
neck (neck.py: 1x1 conv + GroupNorm per level) stands in for RT-DETR's input projection.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import FeedForward
from .position_encoding import sincos_2d_embedding


class ConvNormAct(nn.Sequential):
    """k x k conv (padding (k - 1) / 2, no bias) + BatchNorm (+ SiLU when `act`):
    (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, act: bool = True):
        layers = [nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, bias=False),
                  nn.BatchNorm2d(c_out)]
        super().__init__(*layers, *([nn.SiLU()] if act else []))


class RepVGGBlock(nn.Module):
    """SiLU(BN(conv3x3(x)) + BN(conv1x1(x))): (B, C, H, W) -> (B, C, H, W). (The two branches can
    be folded into one 3x3 conv for inference, RepVGG's point; kept apart here.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = ConvNormAct(channels, channels, 3, act=False)
        self.conv1 = ConvNormAct(channels, channels, 1, act=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class CSPRepLayer(nn.Module):
    """(B, C_in, H, W) -> (B, C, H, W): blocks(conv_a(x)) + conv_b(x), conv_a/b 1x1 to C."""

    def __init__(self, c_in: int, channels: int, num_blocks: int = 3):
        super().__init__()
        self.conv_a = ConvNormAct(c_in, channels, 1)
        self.conv_b = ConvNormAct(c_in, channels, 1)
        self.blocks = nn.Sequential(*(RepVGGBlock(channels) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv_a(x)) + self.conv_b(x)


class AIFI(nn.Module):
    """One transformer encoder layer over one map's tokens: (B, C, H, W) -> (B, C, H, W).

    x = LN(x + Dropout(MHSA(q = k = x + pos, v = x))); x = LN(x + Dropout(W2 GELU(W1 x))),
    pos = `sincos_2d_embedding((H, W), C, temperature)` (RT-DETR: temperature 10000)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 temperature: float = 10000.0):
        super().__init__()
        self.temperature = temperature
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout, nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        src = x.flatten(2).transpose(1, 2)                                    # (B, H*W, C)
        pos = sincos_2d_embedding((H, W), C, self.temperature, x.device)[None]
        q = src + pos.to(src.dtype)
        src = self.norm(src + self.dropout(self.self_attn(q, q, src, need_weights=False)[0]))
        return self.ffn(src).transpose(1, 2).reshape(B, C, H, W)


def resize_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """x (B, C, h, w) at `size` (H, W): unchanged if equal, nearest for an exact x2 upsampling
    (RT-DETR), else bilinear (RT-DETR's fallback for odd sizes)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] == 2 * x.shape[-2] and size[1] == 2 * x.shape[-1]:
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HybridEncoder(nn.Module):
    """AIFI on the last (coarsest) level, then CCFM over all `num_levels` levels (module
    docstring). `forward` takes and returns L maps (B, dim, H_l, W_l), finest first."""

    def __init__(self, num_levels: int, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 num_blocks: int = 3):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"the hybrid encoder needs at least one level, got {num_levels}")
        if dim % 4:
            raise ValueError(f"the hybrid encoder's 2-D sin-cos position embedding needs a "
                             f"hidden_dim divisible by 4, got {dim}")
        self.num_levels = num_levels
        self.aifi = AIFI(dim, num_heads, ffn_dim, dropout)
        n = num_levels - 1
        self.lateral = nn.ModuleList(ConvNormAct(dim, dim, 1) for _ in range(n))
        self.fpn = nn.ModuleList(CSPRepLayer(2 * dim, dim, num_blocks) for _ in range(n))
        self.downsample = nn.ModuleList(ConvNormAct(dim, dim, 3, stride=2) for _ in range(n))
        self.pan = nn.ModuleList(CSPRepLayer(2 * dim, dim, num_blocks) for _ in range(n))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"hybrid encoder built for {self.num_levels} levels, got {len(feats)}")
        feats = list(feats[:-1]) + [self.aifi(feats[-1])]
        # Top-down: inner[0] is the running (coarsest unfused) map; finer fused maps go in front.
        inner = [feats[-1]]
        for k, level in enumerate(range(self.num_levels - 2, -1, -1)):
            high = self.lateral[k](inner[0])
            inner[0] = high
            up = resize_to(high, feats[level].shape[-2:])
            inner.insert(0, self.fpn[k](torch.cat([up, feats[level]], dim=1)))
        # Bottom-up: inner now holds one map per level, finest first.
        outs = [inner[0]]
        for k in range(self.num_levels - 1):
            down = resize_to(self.downsample[k](outs[-1]), inner[k + 1].shape[-2:])
            outs.append(self.pan[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs


def build_hybrid_encoder(cfg) -> HybridEncoder:
    """The hybrid encoder of a `DetectorConfig`: AIFI with `num_heads` heads and FFN `ffn_dim`
    (RT-DETR: 8 heads, FFN 1024), CSP blocks of `hybrid_blocks` RepVGG blocks (RT-DETR: 3)."""
    return HybridEncoder(cfg.num_feature_levels, cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim,
                         cfg.dropout, cfg.hybrid_blocks)
