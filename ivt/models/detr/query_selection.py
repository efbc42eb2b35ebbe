"""Two-stage query selection (Deformable DETR's two-stage, DINO's mixed query selection): every
encoder token proposes a box around an anchor at its own position; the `num_queries` tokens with
the highest class score give the decoder its initial reference boxes, while the content queries
stay learned embeddings."""
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .box_ops import inverse_sigmoid
from .decoder import MLP
from .encoder import Shapes


def anchor_proposals(shapes: Shapes, device,
                     base_size: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """One anchor per token: centred on its pixel, side base_size * 2^l on level l.

    Returns anchors (S, 4) as logits of normalised cxcywh, and valid (S,) bool: anchors whose
    coordinates all lie in (0.01, 0.99) (large anchors on coarse extra levels do not).
    """
    anchors = []
    for lvl, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
                              indexing="ij")
        wh = torch.full((h * w, 2), base_size * 2.0 ** lvl, device=device)
        anchors.append(torch.cat([torch.stack([x, y], -1).reshape(h * w, 2), wh], dim=-1))
    anchors = torch.cat(anchors)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
    return inverse_sigmoid(anchors), valid


class QuerySelection(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes)
        self.box_head = MLP(dim, dim, 4, 3)
        self.content = nn.Embedding(num_queries, dim)          # learned content queries (DINO)
        nn.init.constant_(self.class_head.bias, -4.595)         # prior probability 0.01
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    def forward(self, memory: torch.Tensor, shapes: Shapes
                ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """memory: (B, S, C) ->
        content queries (B, Q, C), initial boxes before the sigmoid (B, Q, 4) (detached), and the
        proposals' outputs {'pred_logits': (B, Q, K), 'pred_boxes': (B, Q, 4)} for their loss."""
        B, S, _ = memory.shape
        if S < self.num_queries:
            raise ValueError(f"the input gives {S} encoder tokens, fewer than num_queries="
                             f"{self.num_queries}; use a larger input or fewer queries")
        anchors, valid = anchor_proposals(shapes, memory.device)
        out = self.norm(self.proj(memory.masked_fill(~valid[None, :, None], 0.0)))   # (B, S, C)
        logits = self.class_head(out)                                               # (B, S, K)
        boxes_unact = self.box_head(out) + anchors                  # (B, S, 4), float32 boxes
        scores = logits.max(-1).values.masked_fill(~valid[None], float("-inf"))
        top = scores.topk(self.num_queries, dim=1).indices                          # (B, Q)
        top_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        top_boxes = boxes_unact.gather(1, top[..., None].expand(-1, -1, 4))
        content = self.content.weight[None].expand(B, -1, -1)
        return content, top_boxes.detach(), {"pred_logits": top_logits,
                                             "pred_boxes": top_boxes.sigmoid()}


def build_query_selection(cfg) -> QuerySelection:
    return QuerySelection(cfg.hidden_dim, cfg.num_classes, cfg.num_queries)
