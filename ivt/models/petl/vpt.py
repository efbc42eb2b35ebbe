"""VPT-deep (Jia et al., ECCV 2022): learnable prompt tokens in every block.

VPT-Deep (VPT Sec. 3.2): block i sees [x, P_i, E] and its output's prompt part is dropped, so
only the prompts' keys and values act on the image tokens: with P_i (p, C) per block,
    attention of E over [E, P_i]: the prompts are normed by the block's own norm1 and projected
    with its frozen k/v weights (`extra_kv` of the families' attention),
and the prompts' own outputs are never needed. Swin (VPT's Swin variant): the prompts join every
window, with zero relative-position bias and no shift mask on their columns. The ViTs: they join the
whole sequence without rotary position. Trainable parameters: p * C per block.

Prompts cannot be "zero" in the sense of leaving the frozen model unchanged: even all-zero prompts
are keys (norm1's bias) that take attention mass from the image tokens.
"""
import math

import torch
import torch.nn as nn


def init_prompts(length: int, dim: int, patch: int) -> nn.Parameter:
    """(length, dim) prompts, uniform in +-sqrt(6 / (3 * patch^2 + dim)) (VPT's xavier-style
    init over the patch embedding's fan-in and the token width)."""
    val = math.sqrt(6.0 / float(3 * patch * patch + dim))
    return nn.Parameter(torch.empty(length, dim).uniform_(-val, val))
