"""Contrastive denoising queries (DN-DETR, Li et al. 2022; DINO, Zhang et al. 2023).

During training, noised copies of the ground-truth boxes are fed to the decoder beside the
matching queries. Each group holds, per ground-truth object, a positive query (each box corner
moved by less than s times half the box's width / height, s = the box noise scale, to be
reconstructed) and a negative one (moved by s to 2 s half sizes, to be classified as background);
the label of either may be flipped to a random class. DINO's config: s = 0.4, label noise 0.5,
dn_number 100 (its training scripts and mmdet's DINO config: s = 1.0). The queries' targets
are known, so they need no matching, and they teach the decoder to refine boxes.
An attention mask keeps the matching queries from seeing the denoising ones (which would leak the
ground truth) and the groups from seeing each other.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingQueries:
    # (B, pad_size, C): label embeddings of the (possibly flipped) labels
    content: torch.Tensor
    boxes_unact: torch.Tensor    # (B, pad_size, 4): noised boxes before the sigmoid
    attn_mask: torch.Tensor      # (pad_size + Q, pad_size + Q) bool, True = may not attend
    meta: Dict[str, int]         # pad_size, num_groups, group_size


def denoising_attention_mask(num_groups: int, group_size: int, num_queries: int,
                             device) -> torch.Tensor:
    """(P + Q, P + Q) bool with P = num_groups * group_size; queries are ordered
    [group 0, ..., group G-1, matching queries]. True entries are blocked."""
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True                                   # matching queries do not see DN ones
    group = torch.arange(pad, device=device) // group_size
    mask[:pad, :pad] = group[:, None] != group[None, :]       # groups do not see each other
    return mask


def denoising_indices(meta: Dict[str, int], targets: List[Dict[str, torch.Tensor]]
                      ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The fixed assignment of the positive denoising queries: per image, (query_idx, target_idx)
    as the matcher returns them, query_idx counted within the pad_size denoising queries."""
    out = []
    for t in targets:
        n = len(t["labels"])
        j = torch.arange(n, dtype=torch.int64)
        starts = torch.arange(meta["num_groups"], dtype=torch.int64) * meta["group_size"]
        out.append(((starts[:, None] + j[None, :]).flatten(), j.repeat(meta["num_groups"])))
    return out


class Denoising(nn.Module):
    """Per batch with at most n objects in an image: G = max(1, dn_number // n) groups of n
    positive and n negative queries per image (mmdet's dynamic groups, DINO's count for
    dn_number >= 50), so about dn_number positive and dn_number negative queries. Labels flip to
    a random class with probability label_noise_ratio / 2 (DINO); corners move by up to
    box_noise_scale half sizes (positives) or between one and two times that (negatives)."""

    def __init__(self, num_classes: int, dim: int, dn_number: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4):
        super().__init__()
        self.num_classes, self.dn_number = num_classes, dn_number
        self.label_noise_ratio, self.box_noise_scale = label_noise_ratio, box_noise_scale
        self.label_embed = nn.Embedding(num_classes, dim)

    def forward(self, targets: List[Dict[str, torch.Tensor]], num_queries: int
                ) -> Optional[DenoisingQueries]:
        """targets: B dicts with 'labels' (n_b,) and 'boxes' (n_b, 4) normalised cxcywh.
        Returns None when the batch has no objects."""
        counts = [len(t["labels"]) for t in targets]
        max_n = max(counts)
        if max_n == 0:
            return None
        device = self.label_embed.weight.device
        groups = max(1, self.dn_number // max_n)                  # about dn_number positives
        copies = 2 * groups                                       # [g0 pos, g0 neg, g1 pos, ...]
        labels = torch.cat([t["labels"] for t in targets]).to(device).repeat(copies)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().repeat(copies, 1)
        image = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(counts)])
        within = torch.cat([torch.arange(n) for n in counts])
        copy = torch.arange(copies).repeat_interleave(len(within))
        negative = (copy % 2 == 1).to(device)

        if self.label_noise_ratio > 0:                            # flip half the ratio (DINO)
            flip = torch.rand(labels.shape, device=device) < self.label_noise_ratio * 0.5
            labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        if self.box_noise_scale > 0:                              # corners move by |u| s half sizes
            half = boxes[:, 2:].repeat(1, 2) / 2                  # (w/2, h/2, w/2, h/2)
            u = torch.rand_like(boxes) + negative[:, None].float()         # [0, 1) pos, [1, 2) neg
            sign = torch.randint_like(boxes, 2) * 2 - 1
            xyxy = box_cxcywh_to_xyxy(boxes) + sign * u * half * self.box_noise_scale
            boxes = box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0))

        pad = copies * max_n
        slot = (copy * max_n + within.repeat(copies)).to(device)
        image = image.repeat(copies).to(device)
        B, dim = len(targets), self.label_embed.embedding_dim
        content = torch.zeros(B, pad, dim, device=device, dtype=self.label_embed.weight.dtype)
        content = content.index_put((image, slot), self.label_embed(labels))
        boxes_unact = torch.zeros(B, pad, 4, device=device).index_put((image, slot),
                                                                      inverse_sigmoid(boxes))
        mask = denoising_attention_mask(groups, 2 * max_n, num_queries, device)
        return DenoisingQueries(content, boxes_unact, mask,
                                {"pad_size": pad, "num_groups": groups, "group_size": 2 * max_n})


def build_denoising(cfg) -> Optional[Denoising]:
    """The denoising queries of a `DetectorConfig`; None when dn_number is 0."""
    if cfg.dn_number == 0:
        return None
    return Denoising(cfg.num_classes, cfg.hidden_dim, cfg.dn_number, cfg.label_noise_ratio,
                     cfg.box_noise_scale)
