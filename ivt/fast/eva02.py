"""EVA02's rotary attention on the fast path: q and k rotated in one operation, the cls token
included with an identity rotation instead of being split off and put back."""
import torch
import torch.nn.functional as F

from ..models.vit import Attention, Rope, apply_rope


def with_cls_row(rope: Rope) -> Rope:
    """(N, d) sin and cos -> (1 + N, d) with an identity rotation (sin 0, cos 1) for the cls
    token first: `apply_rope` then leaves the cls token exactly as it is (x * 1 + r * 0 = x), so
    the whole sequence is rotated at once, without splitting the cls token off and back."""
    sin, cos = rope
    return (torch.cat([torch.zeros_like(sin[:1]), sin]), torch.cat([torch.ones_like(cos[:1]), cos]))


def attention_heads(attn: Attention, x: torch.Tensor, rope_cls: Rope) -> torch.Tensor:
    """`Attention.heads` (separate q/k/v projections, rotary, without extra_kv) with q and k
    rotated together, in one `apply_rope` over the whole sequence: x (B, 1 + N, C) normed
    tokens, rope_cls (1 + N, d) sin and cos from `with_cls_row`. Same result."""
    B, L, C = x.shape
    heads = lambda t: t.view(B, L, attn.num_heads, -1).transpose(1, 2)     # noqa: E731
    qk = torch.stack([heads(attn.q_proj(x)), heads(attn.k_proj(x))])       # (2, B, h, L, d)
    q, k = apply_rope(qk, *rope_cls).unbind(0)
    x = F.scaled_dot_product_attention(q, k, heads(attn.v_proj(x)))         # scale d^-0.5
    return x.transpose(1, 2).reshape(B, L, C)
