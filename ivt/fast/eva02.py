"""EVA02's fast forward: each block's two IPAs computed together from weights folded for all
blocks at once, q and k rotated in one operation, blocks checkpointed or their frozen sub-layers
recomputed, and, at fused inference, each adapter's kernel writing over the block's patch rows
and handing the next sub-layer its LayerNorm (nothing concatenated)."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.eva02 import Attention, EVA02Backbone, EVA02Block, SwiGLU, apply_rope
from ..models.ivtuning import Grid, tokens_to_map
from .adapters import FastBlockAdapters, adapt, block_internal_prompts
from .memory import checkpointed, recomputed
from .prompts import FoldedIPAs, fold_block_ipas

Rope = Tuple[torch.Tensor, torch.Tensor]


def with_cls_row(rope: Rope) -> Rope:
    """(N, d) sin and cos -> (1 + N, d) with an identity rotation (sin 0, cos 1) for the cls
    token first: `apply_rope` then leaves the cls token exactly as it is (x * 1 + r * 0 = x), so
    the whole sequence is rotated at once, without splitting the cls token off and back."""
    sin, cos = rope
    return (torch.cat([torch.zeros_like(sin[:1]), sin]), torch.cat([torch.ones_like(cos[:1]), cos]))


def attention_heads(attn: Attention, x: torch.Tensor, rope_cls: Rope) -> torch.Tensor:
    """`Attention.heads` (without extra_kv) with q and k rotated together, in one `apply_rope`
    over the whole sequence: x (B, 1 + N, C) normed tokens, rope_cls (1 + N, d) sin and cos from
    `with_cls_row`. Same result."""
    B, L, C = x.shape
    heads = lambda t: t.view(B, L, attn.num_heads, -1).transpose(1, 2)     # noqa: E731
    qk = torch.stack([heads(attn.q_proj(x)), heads(attn.k_proj(x))])       # (2, B, h, L, d)
    q, k = apply_rope(qk, *rope_cls).unbind(0)
    x = F.scaled_dot_product_attention(q, k, heads(attn.v_proj(x)))         # scale d^-0.5
    return x.transpose(1, 2).reshape(B, L, C)


def swiglu_hidden(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """(.., C) -> (.., hidden): the SwiGLU MLP up to, not including, fc2."""
    return mlp.norm(F.silu(mlp.fc1_g(x)) * mlp.fc1_x(x))


class FastEVA02Block(EVA02Block):
    """`EVA02Block` with q and k rotated together, IPA1 and IPA2 computed together (their
    weights folded for all blocks at once, `fold_block_ipas`) and the memory options `make_fast`
    sets: `checkpoint` (the block keeps only its inputs) or `recompute` (its frozen attention
    and MLP sub-layers keep only theirs)."""

    checkpoint = False
    recompute = False

    def forward(self, z: torch.Tensor, hw: Grid, rope: Rope, prompt: Optional[torch.Tensor],
                folded: Optional[FoldedIPAs] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z: (B, 1 + N, C); rope: (1 + N, d) from `with_cls_row`; prompt: (B, N, C) or None."""
        if self.checkpoint:
            return checkpointed(self.body, z, hw, rope, prompt, folded)
        return self.body(z, hw, rope, prompt, folded, self.recompute)

    def body(self, z: torch.Tensor, hw: Grid, rope: Rope, prompt: Optional[torch.Tensor],
             folded: Optional[FoldedIPAs], recompute: bool = False
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        internal = block_internal_prompts([self.adapters], prompt, hw, folded)[0]
        # the sub-layers up to their last frozen Linear (applied after), which keeps nothing for
        # backward
        sublayers = ((lambda t: attention_heads(self.attn, self.norm1(t), rope), self.attn.proj),
                     (lambda t: swiglu_hidden(self.mlp, self.norm2(t)), self.mlp.fc2))
        for pos, (sublayer, last) in enumerate(sublayers):
            z_in, z = z, z + self.drop_path(last(recomputed(sublayer, z, recompute)))
            if self.adapters is not None:                                # {HA, IPA} at pos
                patches, prompt = adapt(self.adapters, pos, z_in[:, 1:], z[:, 1:], prompt, hw,
                                        internal[pos])
                z = torch.cat([z[:, :1], patches], dim=1)
        return z, prompt


def fused_eval_block(block: EVA02Block, z: torch.Tensor, zn: Optional[torch.Tensor], hw: Grid,
                     rope: Rope, prompt: torch.Tensor, folded: Optional[FoldedIPAs],
                     next_norm: Optional[nn.LayerNorm]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A block at inference where its adapters run as the fused inference kernels
    (`FastBlockAdapters.fuses_norms`), same result: each adapter's kernel writes its output over
    the sub-layer's result's patch rows (the cls row stays; nothing is concatenated) and also
    makes the LayerNorm the next sub-layer reads (norm2, then the next block's norm1,
    `next_norm`, None after the last block), in the dtype the next Linear computes in
    (`FastBlockAdapters.fused_eval`). zn: norm1(z), made by the previous block's kernel, or
    None. -> (z, next_norm(z) or None)."""
    internal = block_internal_prompts([block.adapters], prompt, hw, folded)[0]
    zn = block.norm1(z) if zn is None else zn
    z = z + block.drop_path(block.attn.proj(attention_heads(block.attn, zn, rope)))
    z, zn = block.adapters.fused_eval(0, z, hw, internal[0], block.norm2, lead=1)  # HA1, IPA1
    z = z + block.drop_path(block.mlp(zn))
    return block.adapters.fused_eval(1, z, hw, internal[1], next_norm, lead=1)     # HA2, IPA2


class FastEVA02Backbone(EVA02Backbone):
    """`EVA02Backbone` running `FastEVA02Block`s (or `fused_eval_block` where every block's
    adapters run as the fused inference kernels)."""

    def forward_blocks(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
                       ) -> List[torch.Tensor]:
        z, hw, prompt = self.embed(vis, ir)
        key = (hw, z.device, "with_cls")
        if key not in self._rope:
            self._rope[key] = with_cls_row(self.rope_tables(hw, z.device))
        rope = self._rope[key]                                           # (1 + N, d) sin, cos
        folded = fold_block_ipas([block.adapters for block in self.blocks])  # all at once
        fused = all(isinstance(b.adapters, FastBlockAdapters) and b.adapters.fuses_norms(z)
                    for b in self.blocks)
        maps, zn = {}, None
        for index, block in enumerate(self.blocks):
            if prompt is not None and index > 0 and not self.ivt_cfg.ipa_deep:
                prompt = z[:, 1:]                     # as `EVA02Backbone.forward_blocks`
            if fused:                                                    # inference, fused
                following = self.blocks[index + 1].norm1 if index + 1 < len(self.blocks) else None
                z, zn = fused_eval_block(block, z, zn, hw, rope, prompt, folded[index],
                                         following)
            else:
                z, prompt = block(z, hw, rope, prompt, folded[index])
            if index in self.feature_blocks:
                maps[index] = tokens_to_map(z[:, 1:], hw).contiguous()      # (B, C, H/p, W/p)
        return [maps[i] for i in self.feature_blocks]
