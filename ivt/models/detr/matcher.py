"""Hungarian matching between predictions and ground truth (DETR, with DINO's focal class cost)."""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising
    C = cost_class * C_focal + cost_bbox * |b - b_gt|_1 + cost_giou * (-GIoU(b, b_gt)).

    The class cost is the focal loss of the target class being positive minus that of it being
    negative, so it agrees with the focal classification loss the matched pairs are trained on.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        outputs: 'pred_logits' (B, Q, K) class logits, 'pred_boxes' (B, Q, 4) normalised cxcywh.
        targets: B dicts with 'labels' (n_b,) int64 and 'boxes' (n_b, 4) normalised cxcywh.
        Returns B pairs (query_idx, target_idx), int64 tensors of length min(Q, n_b): query
        query_idx[i] is assigned to target target_idx[i]. Images without targets give empty pairs.
        """
        B, Q, _ = outputs["pred_logits"].shape
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(B)]
        prob = outputs["pred_logits"].flatten(0, 1).float().sigmoid()      # (B*Q, K)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()                 # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])                  # (N,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()        # (N, 4)

        a, g = self.alpha, self.gamma
        neg = (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]                       # (B*Q, N)
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)                       # (B*Q, N)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        if not torch.isfinite(C).all():
            raise FloatingPointError("HungarianMatcher: non-finite matching cost (the predicted "
                                     "logits or boxes hold NaN or inf)")
        C = C.view(B, Q, -1).cpu()

        indices = []
        for b, c in enumerate(C.split(sizes, dim=-1)):                      # c: (B, Q, n_b)
            if sizes[b] == 0:
                indices.append((empty, empty))
                continue
            q, t = linear_sum_assignment(c[b].numpy())
            indices.append((torch.as_tensor(q, dtype=torch.int64),
                            torch.as_tensor(t, dtype=torch.int64)))
        return indices


def build_matcher(cfg) -> HungarianMatcher:
    return HungarianMatcher(cfg.match_cost_class, cfg.match_cost_bbox, cfg.match_cost_giou,
                            cfg.focal_alpha, cfg.focal_gamma)
