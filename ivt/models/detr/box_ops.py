"""Box utilities as small pure functions. Boxes are (..., 4) tensors, either `cxcywh` (centre,
width, height) or `xyxy` (corners); the detector predicts normalised cxcywh in [0, 1]."""
from typing import Tuple

import torch

EPS = 1e-7


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """a: (N, 4), b: (M, 4) xyxy -> IoU (N, M) and union area (N, M).

    Zero-area boxes are allowed: their IoU with anything is 0 (the union is floored at EPS).
    """
    lt = torch.max(a[:, None, :2], b[None, :, :2])              # (N, M, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)                      # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=EPS), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest enclosing box (Rezatofighi et al. 2019).

    a: (N, 4), b: (M, 4) xyxy with x1 >= x0 and y1 >= y0 -> (N, M) in [-1, 1].
    """
    for name, boxes in (("first", a), ("second", b)):
        if not (boxes[:, 2:] >= boxes[:, :2]).all():
            raise ValueError(f"generalized_box_iou: the {name} set holds boxes with x1 < x0 or "
                             f"y1 < y0 (expected xyxy corners)")
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=EPS)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(x / (1 - x)) with x and 1 - x each clamped to at least `eps` (DINO's form and eps), so
    that boxes on the image border stay finite: at most +-log(1000) ~ +-6.9 in logit space."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def normalize_boxes(boxes_xyxy: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """(n, 4) xyxy in pixels of an (H, W) image -> (n, 4) cxcywh in [0, 1]."""
    h, w = size_hw
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_xyxy_to_cxcywh(boxes_xyxy / scale)
