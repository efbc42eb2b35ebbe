"""A segmentation model: an IV-tuning backbone (`build_backbone`) plus the Segformer head."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import Normalization, pad_black
from . import build_backbone, count_parameters, normalization_for
from .backbone import IVTBackbone
from .heads import SegformerHead
from .swin import mmlab_options


class Segmentor(nn.Module):
    """`forward(vis, ir)` -> logits at stride 4; `predict(vis, ir)` -> class ids at input size.

    The backbone's tuning mode decides which of its parameters train; the head always trains.
    `norm`: the inputs' normalisation, which says what a black pixel is to the model (the
    padding of `logits_at_input_size`).
    """

    def __init__(self, backbone: IVTBackbone, head: SegformerHead, norm: Normalization):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.norm = norm
        for p in self.head.parameters():
            p.requires_grad = True

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> torch.Tensor:
        """vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) -> logits (B, K, H/4, W/4)."""
        return self.head(self.backbone(vis, ir))

    def logits_at_input_size(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
                             ) -> torch.Tensor:
        """(B, K, H, W): stride-4 logits upsampled bilinearly (align_corners=False). An input
        whose sides are not multiples of the backbone's `input_multiple` (a ViT's patch: MFNet's
        480x640 with patch 14) is padded at the bottom and right with black pixels, as training
        pads its crops, and the logits cropped back."""
        H, W = vis.shape[2:]
        vis, ir = pad_black(vis, ir, self.backbone.input_multiple, self.norm)
        logits = F.interpolate(self(vis, ir), size=vis.shape[2:], mode="bilinear",
                               align_corners=False)
        return logits[:, :, :H, :W]

    @torch.no_grad()
    def predict(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H, W) int64 class ids at the input's (native) size: logits are upsampled before
        the argmax, as RGB-T segmentation papers evaluate."""
        return self.logits_at_input_size(vis, ir).argmax(dim=1)


def build_segmentor(backbone: str, num_classes: int, tuning: str = "ivt",
                    pretrained: Optional[str] = None, img_size=None, head_dim: int = 256,
                    head_dropout: float = 0.1, **backbone_options) -> Segmentor:
    """Backbone `backbone` (a name in `BACKBONES`, built by `build_backbone` with `tuning`,
    `pretrained`, `img_size` and `backbone_options` passed through) + a Segformer head of width
    `head_dim` producing `num_classes` logits. A Swin is mmseg's, with a LayerNorm on each
    output (`out_norms`), unless `out_norms=False` is given."""
    bb = build_backbone(backbone, tuning=tuning, pretrained=pretrained, img_size=img_size,
                        **mmlab_options(backbone, backbone_options))
    return Segmentor(bb, SegformerHead(bb.out_channels, num_classes, head_dim, head_dropout),
                     normalization_for(backbone))


def describe(model: Segmentor) -> str:
    """One line: trainable / total parameter counts of the backbone and head."""
    bb_t, bb_n = count_parameters(model.backbone, True), count_parameters(model.backbone)
    head_n = count_parameters(model.head)
    total_t = bb_t + head_n
    total = bb_n + head_n
    return (f"parameters: backbone {bb_t:,} / {bb_n:,} trainable, head {head_n:,}; "
            f"total {total_t:,} / {total:,} trainable ({100.0 * total_t / total:.2f}%)")
