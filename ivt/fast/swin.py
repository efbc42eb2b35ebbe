"""Swin's fast forward: a stage's IPAs computed together, blocks checkpointed or their frozen
sub-layers recomputed, and, at fused inference, each adapter's kernel handing the next sub-layer
its LayerNorm.

Every block of a stage reads the same external prompt (the stage's input), so a stage's IPAs
are one `block_internal_prompts` call. `memory="checkpoint:N"` checkpoints the first N blocks in
forward order: a block's activations scale with tokens x channels, halving from stage to stage,
while its compute stays about the same (Swin-L's first 4 blocks, stages 1 and 2, hold about 40%
of its block activations and are 4 of its 24 blocks to recompute).
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.ivtuning import Grid
from ..models.swin import SwinBlock, SwinStage
from .adapters import FastBlockAdapters, adapt, block_internal_prompts
from .memory import checkpointed, recomputed


class FastSwinBlock(SwinBlock):
    """`SwinBlock` with its IPAs' outputs given and the memory options `make_fast` sets:
    `checkpoint` (the whole block keeps only its inputs and is recomputed in backward) or
    `recompute` (its frozen attention and MLP sub-layers keep only their inputs)."""

    checkpoint = False
    recompute = False

    def forward(self, z: torch.Tensor, hw: Grid, prompt: Optional[torch.Tensor],
                internal: Sequence[Optional[torch.Tensor]] = (None, None)
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z: (B, N, C); internal = [IPA1(P), IPA2(P)] computed for the whole stage at once
        (`block_internal_prompts`; None: computed here) -> (z, prompt for the next IPA)."""
        if self.checkpoint:
            return checkpointed(self.body, z, hw, prompt, *internal)
        return self.body(z, hw, prompt, *internal, self.recompute)

    def body(self, z: torch.Tensor, hw: Grid, prompt: Optional[torch.Tensor],
             ipa1: Optional[torch.Tensor], ipa2: Optional[torch.Tensor], recompute: bool = False
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # the sub-layers up to their last frozen Linear, which keeps nothing for backward
        heads = lambda t: self.window_attention(self.norm1(t), hw, project=False)  # noqa: E731
        hidden = lambda t: self.mlp.act(self.mlp.fc1(self.norm2(t)))     # noqa: E731
        z_in, z = z, z + self.drop_path(self.attn.proj(recomputed(heads, z, recompute)))
        if self.adapters is not None:                                    # HA1, IPA1 (Eq. 5-6)
            z, prompt = adapt(self.adapters, 0, z_in, z, prompt, hw, ipa1)
        z_in, z = z, z + self.drop_path(self.mlp.fc2(recomputed(hidden, z, recompute)))
        if self.adapters is not None:                                    # HA2, IPA2
            z, prompt = adapt(self.adapters, 1, z_in, z, prompt, hw, ipa2)
        return z, prompt


def fused_eval_block(block: SwinBlock, z: torch.Tensor, zn: Optional[torch.Tensor], hw: Grid,
                     internal: Sequence[Optional[object]], next_norm: Optional[nn.LayerNorm]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A block at inference where its adapters run as the fused inference kernels
    (`FastBlockAdapters.fuses_norms`), same result: each adapter's kernel also makes the
    LayerNorm of its output that the next sub-layer reads (norm2, then the next block's norm1,
    `next_norm`, None at the stage's end), in the dtype the next Linear computes in, so that
    LayerNorm is no pass of its own over the tokens and, under autocast, the window partition
    moves bfloat16 instead of float32 tokens. zn: norm1(z), made by the previous block's kernel,
    or None. -> (z, next_norm(z) or None)."""
    zn = block.norm1(z) if zn is None else zn
    z = z + block.drop_path(block.window_attention(zn, hw))
    z, zn = block.adapters.fused_eval(0, z, hw, internal[0], block.norm2)     # HA1, IPA1
    z = z + block.drop_path(block.mlp(zn))
    return block.adapters.fused_eval(1, z, hw, internal[1], next_norm)        # HA2, IPA2


class FastSwinStage(SwinStage):
    """A stage whose IPAs, which all read the stage's prompt, run together."""

    def forward(self, z: torch.Tensor, hw: Grid, prompt: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hooks = [b.adapters for b in self.blocks]
        internal = (checkpointed(block_internal_prompts, hooks, prompt, hw)
                    if self.blocks[0].checkpoint                   # with the stage's first block
                    else block_internal_prompts(hooks, prompt, hw))
        if all(isinstance(h, FastBlockAdapters) and h.fuses_norms(z) for h in hooks):
            zn = None                                                    # inference, fused
            for i, (block, ipa_out) in enumerate(zip(self.blocks, internal)):
                # the last block hands on none: the next stage's patch merging normalises 2x2
                # neighbourhoods
                following = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else None
                z, zn = fused_eval_block(block, z, zn, hw, ipa_out, following)
            return z, prompt
        for block, ipa_out in zip(self.blocks, internal):
            z, prompt = block(z, hw, prompt, ipa_out)
        return z, prompt
