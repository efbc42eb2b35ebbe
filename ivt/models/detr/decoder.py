"""The decoder: queries refine their boxes layer by layer (Deformable DETR's iterative box
refinement, with DINO's "look forward twice" gradient path); each layer is self-attention among
the queries, deformable cross-attention into the encoder memory around the query's box, an FFN."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .box_ops import inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention
from .encoder import FeedForward, Shapes
from .position_encoding import box_position_embedding


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else layer(x).relu()
        return x


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, boxes: torch.Tensor,
                memory: torch.Tensor, shapes: Shapes,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """tgt, query_pos: (B, Q, C); boxes: (B, Q, 4) reference boxes in [0, 1]; memory (B, S, C);
        attn_mask: (Q, Q) bool, True where a query may NOT look (denoising groups) -> (B, Q, C)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, attn_mask=attn_mask,
                                                           need_weights=False)[0]))
        reference = boxes[:, :, None, :].expand(-1, -1, len(shapes), -1)     # (B, Q, L, 4)
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt + query_pos, reference, memory,
                                                            shapes)))
        return self.ffn(tgt)


class Decoder(nn.Module):
    """Class and box heads are shared by all layers (DINO); the box head predicts a residual in
    logit space: b_i = sigmoid(delta_i + logit(b_{i-1})). As in DINO, the heads read each
    layer's output through the decoder's LayerNorm for the predictions, while the reference box
    the next layer attends around is refined from the output itself."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float, num_classes: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, num_levels, num_points, ffn_dim,
                                                 dropout)
                                    for _ in range(num_layers))
        self.query_pos_head = MLP(2 * dim, dim, dim, 2)      # sine embedding of the box -> position
        self.norm = nn.LayerNorm(dim)                        # before the heads' predictions
        self.class_head = nn.Linear(dim, num_classes)
        self.box_head = MLP(dim, dim, 4, 3)
        nn.init.constant_(self.class_head.bias, -4.595)       # prior probability 0.01 (focal loss)
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    def forward(self, tgt: torch.Tensor, boxes_unact: torch.Tensor, memory: torch.Tensor,
                shapes: Shapes, attn_mask: Optional[torch.Tensor] = None
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        tgt: (B, Q, C) content queries; boxes_unact: (B, Q, 4) initial boxes before the sigmoid
        (no gradient flows into them); memory: (B, S, C).
        Returns per layer the class logits (B, Q, K) and boxes (B, Q, 4) normalised cxcywh.
        """
        ref = boxes_unact.sigmoid()            # detached reference of the current layer
        prev = ref                             # the previous layer's prediction, with its gradient
        logits, boxes = [], []
        for layer in self.layers:
            query_pos = self.query_pos_head(box_position_embedding(ref, self.dim))
            tgt = layer(tgt, query_pos, ref, memory, shapes, attn_mask)
            refined = (self.box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
            out = self.norm(tgt)
            # Look forward twice (DINO): the loss of layer i also reaches layer i-1's box head.
            boxes.append((self.box_head(out) + inverse_sigmoid(prev)).sigmoid())
            logits.append(self.class_head(out))
            prev, ref = refined, refined.detach()
        return logits, boxes


def build_decoder(cfg) -> Decoder:
    return Decoder(cfg.dec_layers, cfg.hidden_dim, cfg.num_heads, cfg.num_feature_levels,
                   cfg.num_points, cfg.ffn_dim, cfg.dropout, cfg.num_classes)
