"""The shared ViT's fast forward (EVA02, DINOv2, MAE): each block's two IPAs computed together
from weights folded for all blocks at once, EVA02's q and k rotated in one complex
multiplication, blocks checkpointed or their frozen sub-layers recomputed, and, at fused
inference, each adapter's kernel writing over the block's patch rows and handing the next
sub-layer its LayerNorm (nothing concatenated)."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.dinov2 import DINOv2Backbone
from ..models.eva02 import EVA02Backbone
from ..models.ivtuning import Grid, tokens_to_map
from ..models.mae import MAEBackbone
from ..models.vit import ViTBackbone, ViTBlock
from .adapters import FastBlockAdapters, adapt, block_internal_prompts, takes_factors
from .eva02 import Turns, attention_heads, with_cls_row
from .memory import checkpointed, recomputed
from .prompts import FoldedIPAs, fold_block_ipas


def heads(block: ViTBlock, x: torch.Tensor, turns: Optional[Turns]) -> torch.Tensor:
    """The block's attention heads on normed tokens x (B, L, C), before `attn.proj`; with turns
    (EVA02's rotary angles from `with_cls_row`) q and k rotated together (`attention_heads`)."""
    return block.attn.heads(x, None) if turns is None else attention_heads(block.attn, x, turns)


class FastViTBlock(ViTBlock):
    """`ViTBlock` with EVA02's q and k rotated together, IPA1 and IPA2 computed together (their
    weights folded for all blocks at once, `fold_block_ipas`) and the memory options `make_fast`
    sets: `checkpoint` (the block keeps only its inputs) or `recompute` (its frozen attention
    and MLP sub-layers keep only theirs)."""

    checkpoint = False
    recompute = False

    def forward(self, z: torch.Tensor, hw: Grid, turns: Optional[Turns],
                prompt: Optional[torch.Tensor], folded: Optional[FoldedIPAs] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z: (B, prefix + N, C); turns: from `with_cls_row` or None; prompt:
        (B, N, C) or None."""
        if self.checkpoint:
            return checkpointed(self.body, z, hw, turns, prompt, folded)
        return self.body(z, hw, turns, prompt, folded, self.recompute)

    def body(self, z: torch.Tensor, hw: Grid, turns: Optional[Turns],
             prompt: Optional[torch.Tensor], folded: Optional[FoldedIPAs],
             recompute: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        internal = block_internal_prompts([self.adapters], prompt, hw, folded)[0]
        # the sub-layers up to their last frozen Linear (applied after, with the LayerScale),
        # which keeps nothing for backward
        sublayers = ((lambda t: heads(self, self.norm1(t), turns),
                      lambda h: self.ls1(self.attn.proj(h))),
                     (lambda t: self.mlp.hidden(self.norm2(t)),
                      lambda h: self.ls2(self.mlp.fc2(h))))
        for pos, (sublayer, last) in enumerate(sublayers):
            z_in, z = z, z + self.drop_path(last(recomputed(sublayer, z, recompute)))
            if self.adapters is not None:                                # {HA, IPA} at pos
                z, prompt = adapt(self.adapters, pos, z_in, z, prompt, hw, internal[pos],
                                  self.prefix)
        return z, prompt


def fused_eval_block(block: ViTBlock, z: torch.Tensor, zn: Optional[torch.Tensor], hw: Grid,
                     turns: Optional[Turns], prompt: torch.Tensor, folded: Optional[FoldedIPAs],
                     next_norm: Optional[nn.LayerNorm]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A block at inference where its adapters run as the fused inference kernels
    (`FastBlockAdapters.fuses_norms`), same result: each adapter's kernel writes its output over
    the sub-layer's result's patch rows (the cls and register rows stay; nothing is
    concatenated) and also makes the LayerNorm the next sub-layer reads (norm2, then the next
    block's norm1, `next_norm`, None after the last block), in the dtype the next Linear
    computes in (`FastBlockAdapters.fused_eval`). zn: norm1(z), made by the previous block's
    kernel, or None. -> (z, next_norm(z) or None)."""
    internal = block_internal_prompts([block.adapters], prompt, hw, folded)[0]
    zn = block.norm1(z) if zn is None else zn
    z = z + block.drop_path(block.ls1(block.attn.proj(heads(block, zn, turns))))
    z, zn = block.adapters.fused_eval(0, z, hw, internal[0], block.norm2,
                                      lead=block.prefix)                # HA1, IPA1
    z = z + block.drop_path(block.ls2(block.mlp(zn)))
    return block.adapters.fused_eval(1, z, hw, internal[1], next_norm,
                                     lead=block.prefix)                 # HA2, IPA2


class FastViTBackbone(ViTBackbone):
    """`ViTBackbone` running `FastViTBlock`s (or `fused_eval_block` where every block's
    adapters run as the fused inference kernels). The families' fast classes below put it in
    front of their own class, which keeps their checkpoint conversion."""

    def forward_blocks(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
                       ) -> List[torch.Tensor]:
        z, hw, prompt = self.embed(vis, ir)
        rope, turns = self.rope_tables(hw, z.device), None
        if rope is not None:
            turns = self._rope.get((hw, z.device, "turns"),
                                   lambda: with_cls_row(rope))           # (1 + N, d / 2) each
        hooks = [block.adapters for block in self.blocks]
        folded = fold_block_ipas(hooks, takes_factors(hooks, z))                 # all at once
        fused = all(isinstance(b.adapters, FastBlockAdapters) and b.adapters.fuses_norms(z)
                    for b in self.blocks)
        maps, zn = {}, None
        for index, block in enumerate(self.blocks):
            if prompt is not None and index > 0 and not self.ivt_cfg.ipa_deep:
                prompt = z[:, self.prefix:]           # as `ViTBackbone.forward_blocks`
            if fused:                                                    # inference, fused
                following = self.blocks[index + 1].norm1 if index + 1 < len(self.blocks) else None
                z, zn = fused_eval_block(block, z, zn, hw, turns, prompt, folded[index],
                                         following)
            else:
                z, prompt = block(z, hw, turns, prompt, folded[index])
            if index in self.feature_blocks:
                maps[index] = tokens_to_map(z[:, self.prefix:], hw).contiguous()  # (B, C, h, w)
        return [maps[i] for i in self.feature_blocks]


class FastEVA02Backbone(FastViTBackbone, EVA02Backbone):
    """`EVA02Backbone` with the fast forward."""


class FastDINOv2Backbone(FastViTBackbone, DINOv2Backbone):
    """`DINOv2Backbone` with the fast forward."""


class FastMAEBackbone(FastViTBackbone, MAEBackbone):
    """`MAEBackbone` with the fast forward."""
