"""A salient object detection model: an IV-tuning backbone (`build_backbone`) plus the CPNet
decoder, and its training loss: BCE-with-logits + IoU on the main and three side outputs (paper
sec. 3.5, after Eq. 16: "we follow CPNet to use a hybrid loss composed of BCE loss and IoU
loss")."""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import build_backbone
from .backbone import IVTBackbone
from .heads import CPNetDecoder
from .swin import SWIN_CONFIGS, TAPS


class SaliencyModel(nn.Module):
    """`forward(vis, ir)` -> [main, side1, side2, side3] logits, each (B, 1, H, W) at the input
    size; `predict(vis, ir)` -> the main output's saliency probabilities (B, 1, H, W).

    The backbone's tuning mode decides which of its parameters train; the decoder always trains.
    """

    def __init__(self, backbone: IVTBackbone, decoder: CPNetDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        for p in self.decoder.parameters():
            p.requires_grad = True

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) -> 4 x (B, 1, H, W) logits."""
        return self.decoder(self.backbone(vis, ir), vis.shape[2:])

    @torch.no_grad()
    def predict(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1]: sigmoid of the main output (the only one used at test time)."""
        return torch.sigmoid(self(vis, ir)[0])


def sod_loss(logits_list: List[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over the outputs of BCE-with-logits + IoU loss (paper Sec. 3.5, CPNet's hybrid loss).

    logits_list: [(B, 1, H, W)] logits; mask: (B, 1, H, W) or (B, H, W), 1 = salient, 0 = not,
    or a soft target in [0, 1] (the release's augmentation, `ivt.data.vt.SODReleaseTransform`).
    BCE is the mean over all pixels of the batch of -(g log p + (1 - g) log(1 - p)), with
    p = sigmoid(logits) and g = mask, which a soft g weighs between the two classes (the release's
    `BCEWithLogitsLoss` on its soft GTs); the IoU loss of one image is
    1 - (sum pg + 1) / (sum p + sum g - sum pg + 1) with g's values as they are (the release's
    `iou_loss`), averaged over images.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    total = 0.0
    for i, logits in enumerate(logits_list):
        if logits.dim() != 4 or logits.shape[1] != 1 or logits.shape[2:] != mask.shape[2:] \
                or logits.shape[0] != mask.shape[0]:
            raise ValueError(f"output {i} has shape {tuple(logits.shape)}; the mask "
                             f"{tuple(mask.shape)} needs (B, 1, H, W) logits of its size")
        g = mask.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, g)
        p = torch.sigmoid(logits)
        inter = (p * g).sum(dim=(1, 2, 3))
        union = p.sum(dim=(1, 2, 3)) + g.sum(dim=(1, 2, 3)) - inter
        iou = 1.0 - (inter + 1.0) / (union + 1.0)
        total = total + bce + iou.mean()
    return total


def build_saliency_model(backbone: str, tuning: str = "ivt", pretrained: Optional[str] = None,
                         img_size=None, taps: str = "stages",
                         **backbone_options) -> SaliencyModel:
    """Backbone `backbone` (a name in `BACKBONES`, built by `build_backbone` with `tuning`,
    `pretrained`, `img_size` and `backbone_options` passed through) + the CPNet decoder on its
    four levels. `ivt.engine.describe_parameters(model)` gives the one-line parameter count.

    taps: which backbone features the decoder reads. 'stages': the four stage outputs (Swin:
    before patch merging, strides 4-32; the ViTs: blocks 8, 12, 16, 24 resized to strides 4-32).
    'release': the authors' SOD release; on Swin the external-prompted patch embedding Z0 and
    stages 1-3's outputs after patch merging (`SwinBackbone`, taps='release'); on EVA02 the
    release taps blocks 8, 12, 16, 24 as 'stages' does, so the two are the same model on the ViTs.
    """
    if taps not in TAPS:
        raise ValueError(f"taps={taps!r}: expected one of {', '.join(TAPS)}")
    if backbone in SWIN_CONFIGS:
        backbone_options["taps"] = taps
    bb = build_backbone(backbone, tuning=tuning, pretrained=pretrained, img_size=img_size,
                        **backbone_options)
    return SaliencyModel(bb, CPNetDecoder(bb.out_channels))
