"""The CPNet decoder (Hu et al., IJCV 2024), IV-tuning's salient object detection head.

The paper keeps only CPNet's multi-level residual convolution (RCM) blocks as the SOD decoder
(supplementary Sec. 9); this is that decoder as the authors' release builds it. Top-down, from
the stride-32 level to the input resolution:

    deconv1:  conv3x3(c4 -> 768, no bias)-BN-GELU, upsample           768 @ stride 16  -> side3
    level 3:  concat f3, conv3x3(768 + c3 -> 384)-BN-GELU, upsample,
              ConvNeXt block(384)                                       384 @ stride 8   -> side2
    level 2:  concat f2, conv3x3(384 + c2 -> 192)-BN-GELU, upsample,
              ConvNeXt block(192)                                       192 @ stride 4   -> side1
    level 1:  concat f1, conv3x3(192 + c1 -> 96)-BN-GELU, upsample x2,
              ConvNeXt block(96)                                         96 @ stride 2
    predict:  conv3x3(96 -> 48)-BN-GELU, upsample x2, conv3x3(48 -> 1)    1 @ stride 1  -> main
    sides:    conv3x3(192 -> 1), conv3x3(384 -> 1), conv3x3(768 -> 1)

Channel arithmetic, for the backbone's level channels (c1, c2, c3, c4) at strides 4, 8, 16, 32:
    Swin-L  (192, 384, 768, 1536): 1536 -> 768;  768 + 768 = 1536 -> 384;  384 + 384 = 768 -> 192;
                                   192 + 192 = 384 -> 96
    EVA02-L (1024 x 4, after the multi-scale resize): 1024 -> 768;  768 + 1024 = 1792 -> 384;
                                   384 + 1024 = 1408 -> 192;  192 + 1024 = 1216 -> 96
    Swin-T..B (C, 2C, 4C, 8C) likewise, with the decoder widths fixed at 768/384/192/96.

Upsampling inside the decoder is bilinear with align_corners=True (the release's
`nn.Upsample(scale_factor=2, align_corners=True)`), to the next level's size rather than a blind
x2, so inputs whose sides are not multiples of 32 work. The four logit maps are resized to
`out_size` bilinearly (align_corners=False), as the release resizes its side outputs.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (96, 192, 384, 768)        # decoder widths at strides 2, 4, 8, 16
PREDICT_WIDTH = 48


def conv_bn_gelu(in_ch: int, out_ch: int) -> nn.Sequential:
    """conv3x3 (no bias) - BatchNorm - GELU, (B, in_ch, H, W) -> (B, out_ch, H, W)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.GELU())


def upsample(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True (equal to the release's x2 `nn.Upsample` when size = 2x)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ConvNeXtBlock(nn.Module):
    """x + gamma * Linear(4C -> C)(GELU(Linear(C -> 4C)(LayerNorm(dwconv7x7(x))))),
    (B, C, H, W) -> (B, C, H, W); gamma (layer scale) starts at 1e-6 (Liu et al., 2022)."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)                    # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class CPNetDecoder(nn.Module):
    """features [(B, c_i, H_i, W_i) at strides 4, 8, 16, 32] -> [main, side1, side2, side3],
    each (B, 1, *out_size) logits; side1..3 come from the 192-, 384- and 768-channel maps.

    Args:
        in_channels: (c1, c2, c3, c4), the backbone's `out_channels`.
    """

    def __init__(self, in_channels: Sequence[int]):
        super().__init__()
        if len(in_channels) != 4 or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"CPNetDecoder expects 4 positive level widths, got "
                             f"in_channels={list(in_channels)}")
        self.in_channels = [int(c) for c in in_channels]
        c1, c2, c3, c4 = self.in_channels
        w2, w4, w8, w16 = WIDTHS
        self.deconv1 = conv_bn_gelu(c4, w16)
        self.deconv2 = conv_bn_gelu(w16 + c3, w8)
        self.block2 = ConvNeXtBlock(w8)
        self.deconv3 = conv_bn_gelu(w8 + c2, w4)
        self.block3 = ConvNeXtBlock(w4)
        self.deconv4 = conv_bn_gelu(w4 + c1, w2)
        self.block4 = ConvNeXtBlock(w2)
        self.predict = conv_bn_gelu(w2, PREDICT_WIDTH)
        self.predict_out = nn.Conv2d(PREDICT_WIDTH, 1, 3, padding=1)
        self.side1 = nn.Conv2d(w4, 1, 3, padding=1)
        self.side2 = nn.Conv2d(w8, 1, 3, padding=1)
        self.side3 = nn.Conv2d(w16, 1, 3, padding=1)

    def forward(self, features: List[torch.Tensor], out_size: Sequence[int]) -> List[torch.Tensor]:
        if len(features) != 4:
            raise ValueError(f"CPNetDecoder expects 4 feature maps, got {len(features)}")
        got = [f.shape[1] for f in features]
        if got != self.in_channels:
            raise ValueError(f"feature channels {got} do not match the decoder's in_channels "
                             f"{self.in_channels}")
        f1, f2, f3, f4 = features
        size = tuple(int(s) for s in out_size)
        s2 = (2 * f1.shape[2], 2 * f1.shape[3])
        s1 = (2 * s2[0], 2 * s2[1])
        x16 = upsample(self.deconv1(f4), f3.shape[2:])                                # 768
        x8 = self.block2(upsample(self.deconv2(torch.cat([x16, f3], 1)), f2.shape[2:]))  # 384
        x4 = self.block3(upsample(self.deconv3(torch.cat([x8, f2], 1)), f1.shape[2:]))   # 192
        x2 = self.block4(upsample(self.deconv4(torch.cat([x4, f1], 1)), s2))             # 96
        main = self.predict_out(upsample(self.predict(x2), s1))                         # 1
        outputs = [main, self.side1(x4), self.side2(x8), self.side3(x16)]
        return [o if tuple(o.shape[2:]) == size else
                F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                for o in outputs]
