"""EVA02's rotary attention on the fast path: q and k rotated in one operation, as complex
numbers, the cls token included with an identity rotation instead of being split off and put
back.

Rotary embedding turns each interleaved pair (x0, x1) of a head's channels by an angle theta:
(x0 cos - x1 sin, x1 cos + x0 sin) (`apply_rope`). That is the product of the complex number
x0 + i x1 with e^(i theta), so one complex multiplication rotates a whole head, where the
reference's x * cos + rotate_half(x) * sin is several operators each way. A rotation's adjoint is
its inverse, so the gradient is the incoming gradient turned by e^(-i theta): one multiplication
again (`_Turn`)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.vit import Attention, Rope


class Turns(NamedTuple):
    """The rotary angles as unit complex numbers, (1 + N, d / 2) each: e^(i theta) (`forward`)
    and e^(-i theta) (`inverse`), the cls token's row first with theta = 0."""
    forward: torch.Tensor
    inverse: torch.Tensor


def with_cls_row(rope: Rope) -> Turns:
    """(N, d) sin and cos, each angle repeated for its pair (`rope_sin_cos`) -> `Turns` with an
    identity rotation (1 + 0i) for the cls token first: `attention_heads` then leaves the cls
    token exactly as it is, so the whole sequence is rotated at once, without splitting the cls
    token off and back."""
    sin, cos = rope[0][:, ::2], rope[1][:, ::2]                                   # (N, d / 2)
    turns = torch.complex(torch.cat([torch.ones_like(cos[:1]), cos]),
                          torch.cat([torch.zeros_like(sin[:1]), sin]))           # (1 + N, d / 2)
    return Turns(turns, turns.conj().resolve_conj())


def _turn(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x (..., L, d) with each pair (x[2j], x[2j+1]) read as x[2j] + i x[2j+1] and multiplied by
    turns (L, d / 2); computed in the promoted real dtype (float32 for bf16 x, as `apply_rope`),
    returned in x's."""
    double = torch.float64 in (x.dtype, turns.real.dtype)     # (not torch.promote_types: an
    work = torch.float64 if double else torch.float32          # operator call of its own)
    pairs = torch.view_as_complex(x.to(work).contiguous().unflatten(-1, (-1, 2)))  # (..., L, d/2)
    return torch.view_as_real(pairs * turns).flatten(-2).to(x.dtype)


class _Turn(torch.autograd.Function):
    """x turned by `Turns.forward`; the backward turns the gradient back by `Turns.inverse`
    (one operator, where autograd's complex multiplication would conjugate the table again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, turns: Turns) -> torch.Tensor:
        ctx.inverse = turns.inverse
        return _turn(x, turns.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _turn(grad, ctx.inverse), None


def attention_heads(attn: Attention, x: torch.Tensor, turns: Turns) -> torch.Tensor:
    """`Attention.heads` (separate q/k/v projections, rotary, without extra_kv) with q and k
    rotated together, in one complex multiplication over the whole sequence: x (B, 1 + N, C)
    normed tokens, turns from `with_cls_row`. Same result (up to rounding)."""
    B, L, C = x.shape
    heads = lambda t: t.view(B, L, attn.num_heads, -1).transpose(1, 2)     # noqa: E731
    qk = torch.stack([heads(attn.q_proj(x)), heads(attn.k_proj(x))])       # (2, B, h, L, d)
    q, k = _Turn.apply(qk, turns).unbind(0)
    x = F.scaled_dot_product_attention(q, k, heads(attn.v_proj(x)))         # scale d^-0.5
    return x.transpose(1, 2).reshape(B, L, C)
