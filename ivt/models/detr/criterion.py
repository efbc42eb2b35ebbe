"""The training loss, Eq. 17: after Hungarian matching, focal classification + L1 + GIoU on the
matched boxes, for the final decoder layer, every earlier layer (auxiliary), the encoder's
proposals and, when present, the denoising queries (whose assignment is known)."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou, normalize_boxes
from .denoising import denoising_indices
from .matcher import HungarianMatcher, build_matcher

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float
                       ) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log(p_t), p = sigmoid."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def check_targets(targets: Sequence[Dict[str, torch.Tensor]], batch: int, num_classes: int) -> None:
    """Clear errors for targets that do not follow the contract (see `Detector.forward`)."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch} images")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] needs 'boxes' and 'labels', has {sorted(t)}")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]: boxes must be (n, 4) and labels (n,), got "
                             f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"targets[{i}]: labels must lie in [0, {num_classes}), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        if len(boxes) and not (boxes[:, 2:] >= boxes[:, :2]).all():
            raise ValueError(f"targets[{i}]: boxes must be xyxy with x1 >= x0 and y1 >= y0")


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: Dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes, self.matcher, self.weights = num_classes, matcher, dict(weights)
        self.alpha, self.gamma = focal_alpha, focal_gamma

    def set_losses(self, out: Dict[str, torch.Tensor], targets, indices: Indices, num_boxes: float,
                   suffix: str) -> Dict[str, torch.Tensor]:
        """Losses of one set of predictions ('pred_logits' (B, Q, K), 'pred_boxes' (B, Q, 4))
        given the assignment; each is summed and divided by the number of target boxes."""
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        batch_idx = torch.cat([torch.full_like(q, b)
                               for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][j.to(t["labels"].device)]
                            for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        # unmatched: background
        onehot[batch_idx, query_idx, labels] = 1.0
        loss_cls = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma).sum() / num_boxes
        src = boxes[batch_idx, query_idx]                                     # (N, 4) cxcywh
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)]
                         for t, (_, j) in zip(targets, indices)])
        loss_l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {f"loss_cls{suffix}": loss_cls, f"loss_l1{suffix}": loss_l1,
                f"loss_giou{suffix}": loss_giou}

    def forward(self, outputs: Dict,
                targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """outputs: `Detector.forward`'s dict; targets: B dicts, 'boxes' (n, 4) xyxy in pixels of
        the input tensor (outputs['image_size']), 'labels' (n,) int64 in [0, K).
        Returns every named term (unweighted) and their weighted sum under 'loss' (Eq. 17):
        loss = sum over outputs of cls_weight * L_focal + l1_weight * L_1 + giou_weight * L_GIoU."""
        device = outputs["pred_logits"].device
        check_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        targets = [{"labels": t["labels"].to(device).long(),
                    "boxes": normalize_boxes(t["boxes"].to(device).float(), outputs["image_size"])}
                   for t in targets]
        num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():                     # average over ranks
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        num_boxes = max(num_boxes.item(), 1.0)

        sets = [("", outputs)] + [(f"_{i}", aux)
                                  for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            sets.append(("_enc", outputs["enc_outputs"]))
        losses = {}
        for suffix, out in sets:
            losses.update(self.set_losses(out, targets, self.matcher(out, targets), num_boxes,
                                          suffix))
        if "dn_outputs" in outputs:
            meta, dn = outputs["dn_meta"], outputs["dn_outputs"]
            indices = denoising_indices(meta, targets)
            dn_sets = [("_dn", dn)] + [(f"_dn_{i}", aux) for i, aux in enumerate(dn["aux_outputs"])]
            for suffix, out in dn_sets:
                losses.update(self.set_losses(out, targets, indices, num_boxes * meta["num_groups"],
                                              suffix))
        losses["loss"] = sum(self.weights[name.split("_")[1]] * value
                             for name, value in losses.items())
        return losses


def build_criterion(cfg) -> SetCriterion:
    return SetCriterion(cfg.num_classes, build_matcher(cfg),
                        {"cls": cfg.cls_weight, "l1": cfg.l1_weight, "giou": cfg.giou_weight},
                        cfg.focal_alpha, cfg.focal_gamma)
