"""The Internal Prompt Adapters that read one prompt, computed together (`internal_prompts`).

On Swin every block of a stage reads the same external prompt P, so a stage's 2 x depth IPAs
(Sec. 3.4) share their input; on EVA02 a block's two do. With n(P) the LayerNorm of P without
affine, IPA_i's first SFT and down-projection are one affine map of n(P):
down_i(n(P) * a_i + c_i) = n(P) @ (W_i * a_i)^T + (W_i c_i + b_i), with a_i = w_i * gamma_i,
c_i = b_i * gamma_i + beta_i (LN affine (w_i, b_i), Eq. 14's gamma_i, beta_i). So k IPAs are one
LayerNorm of P, one matmul against their k stacked folded down-projections (C -> k * d3), SimAM on
all k * d3 channels at once (it is per channel, Eq. 11-12), one GELU, one batched matmul for the k
up-projections with the second SFT (z * gamma' + beta') folded in, one GELU. The autograd
Functions below give the foldings (`_FoldDown`, `_FoldUp`), the LayerNorm + down-projection and
the up-projection + GELU their backward from less held memory than autograd's own (they recompute
a weight stack, a normalised prompt, a pre-activation), and the splits their gradients in fewer
operators.
"""
from itertools import islice
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from ..models.ivtuning import (BlockAdapters, Grid, InternalPromptAdapter, map_to_tokens,
                               tokens_to_map)


class FoldedIPAs(NamedTuple):
    """The weights of k IPAs with one configuration, folded for `internal_prompts`.

    With projections: in_w (k, d3, C) and in_b (k, d3), each first SFT folded into its
    down-projection; out_w (k, d3, C) and out_b (k, 1, C), each SFT' folded into its transposed
    up-projection. Without (Fig. 4(f)): in_w, in_b (k, C) the first SFTs' scale and shift on the
    normalised prompt; out_w, out_b (k, 1, C) the SFT's gamma and beta. Folded for the fused
    kernels (`fold_block_ipas` with `factored`), out_w and out_b are k-tuples of each IPA's
    (d3, C) and (C,) instead.
    """
    in_w: torch.Tensor
    in_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor


class _FoldDown(torch.autograd.Function):
    """The k IPAs' first SFTs folded into their down-projections (the module docstring):
    in_w = W * a, in_b = b + W c, W (k, d3, C) the stacked weights. Keeps only its inputs (the
    weights are parameters) and stacks W again in the backward: autograd's own would hold the
    (k, d3, C) stack, the size of in_w, for the gradients of a and c. In the weights' dtype
    (float32) under autocast too.

    forward(a (k, C), c (k, C), *weights, *biases) with k (d3, C) weights and k (d3,) biases
    -> (in_w (k, d3, C), in_b (k, d3))."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, *tensors: torch.Tensor):
        k = len(tensors) // 2
        W, b = torch.stack(tensors[:k]), torch.stack(tensors[k:])           # (k, d3, C), (k, d3)
        ctx.save_for_backward(a, c, *tensors[:k])
        with torch.autocast(a.device.type, enabled=False):          # in the weights' dtype
            in_b = torch.baddbmm(b[:, :, None], W, c[:, :, None]).squeeze(2)
        return W * a[:, None, :], in_b

    @staticmethod
    def backward(ctx, d_in_w: torch.Tensor, d_in_b: torch.Tensor):
        a, c, *weights = ctx.saved_tensors
        W = torch.stack(weights)                                                 # (k, d3, C)
        d_a = (d_in_w * W).sum(1)                                                # (k, C)
        d_c = torch.bmm(d_in_b[:, None, :], W).squeeze(1)                        # (k, C)
        d_w = torch.baddbmm(d_in_w * a[:, None, :], d_in_b[:, :, None], c[:, None, :])
        return (d_a, d_c, *d_w.unbind(0), *d_in_b.unbind(0))


class _FoldUp(torch.autograd.Function):
    """The k IPAs' SFT' folded into their transposed up-projections (the module docstring):
    out_w = U^T * g, out_b = u * g + beta', with U (C, d3) the weights, u their biases, g and
    beta' the SFT's gamma' and beta'. Keeps only its inputs and stacks U^T again in the backward
    (autograd's own would hold the (k, d3, C) stack for g's gradient); the weights' gradients
    come back in their own (contiguous) layout, one transpose-copy for all k.

    forward(g, beta', u, *weights), g, beta', u (k, 1, C), k (C, d3) weights -> (out_w
    (k, d3, C), out_b (k, 1, C))."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, beta: torch.Tensor, u: torch.Tensor, *weights: torch.Tensor):
        ctx.save_for_backward(g, u, *weights)
        u_t = torch.stack([w.t() for w in weights])                              # (k, d3, C)
        return u_t * g, torch.addcmul(beta, u, g)

    @staticmethod
    def backward(ctx, d_out_w: torch.Tensor, d_out_b: torch.Tensor):
        g, u, *weights = ctx.saved_tensors
        u_t = torch.stack([w.t() for w in weights])                              # (k, d3, C)
        d_g = torch.addcmul((d_out_w * u_t).sum(1, keepdim=True), d_out_b, u)    # (k, 1, C)
        d_w = (d_out_w * g).transpose(1, 2).contiguous()                         # (k, C, d3)
        return (d_g, d_out_b, d_out_b * g, *d_w.unbind(0))


class _Unstack(torch.autograd.Function):
    """stacked.unbind(0): k (B, N, C) tensors from a (k, B, N, C) stack, with the backward
    stacking the k gradients in one operator (autograd's own unbind backward writes each
    gradient into a zero stack and sums the stacks: 2k - 1 operators). Unused outputs get zero
    gradients (autograd materialises them)."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor):
        return stacked.unbind(0)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        return torch.stack(grads)


class _Split(torch.autograd.Function):
    """Each of the given tensors split along `dim` into `sizes`; returns the pieces tensor by
    tensor. The backward concatenates each tensor's gradients in one operator (autograd's own
    split backward writes every piece into a zero tensor)."""

    @staticmethod
    def forward(ctx, sizes: Sequence[int], dim: int, *tensors: torch.Tensor):
        ctx.groups, ctx.dim = len(sizes), dim
        return tuple(piece for t in tensors for piece in t.split(list(sizes), dim))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        n = ctx.groups
        return (None, None) + tuple(torch.cat(grads[i:i + n], ctx.dim)
                                    for i in range(0, len(grads), n))


class _NormDown(torch.autograd.Function):
    """linear(n(P), W, b): the LayerNorm of P without affine and the k IPAs' stacked folded
    down-projections. P (B, N, C), W (k * d3, C), b (k * d3,) -> (B, N, k * d3). Keeps only P
    (which the block holds anyway) and W: the weight gradient needs n(P), a (B, N, C) tensor, so
    the backward recomputes it, with its row statistics, from P (one LayerNorm) instead of
    holding it. Under autocast the LayerNorm and the matmul run in the dtypes autocast gives
    them (float32, and its lower dtype), as `F.layer_norm` and `F.linear` would."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
                ) -> torch.Tensor:
        n = F.layer_norm(p, p.shape[-1:], eps=eps)                          # (B, N, C)
        h = F.linear(n, w, b)                                               # (B, N, k * d3)
        ctx.save_for_backward(p, w)
        ctx.eps, ctx.dtypes = eps, (n.dtype, h.dtype, b.dtype)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, w = ctx.saved_tensors
        (norm_dtype, t, bias_dtype), C = ctx.dtypes, p.shape[-1]
        with torch.autocast(grad.device.type, enabled=False):
            x = p.to(norm_dtype)
            n, mean, rstd = torch.native_layer_norm(x, (C,), None, None, ctx.eps)
            g = grad.reshape(-1, grad.shape[-1]).to(t)                      # (BN, k * d3)
            dw = g.t().mm(n.reshape(-1, C).to(t))                           # (k * d3, C)
            db = g.sum(0)
            dn = g.mm(w.to(t)).to(norm_dtype).view(x.shape)                  # (B, N, C)
            dp = torch.ops.aten.native_layer_norm_backward(
                dn, x, (C,), mean, rstd, None, None, [True, False, False])[0]
        return dp.to(p.dtype), dw.to(w.dtype), db.to(bias_dtype), None


class _UpGelu(torch.autograd.Function):
    """gelu(baddbmm(b, h, W)): the k IPAs' up-projections with SFT' folded in, and their GELU.
    b (k, 1, C), h (k, BN, d3), W (k, d3, C) -> (k, BN, C). Keeps only its inputs: GELU's
    backward needs the (k, BN, C) pre-activation, C / d3 = 24-192 times the size of h, so the
    backward recomputes it (one batched matmul) instead of holding it (for Swin-L at 384, batch
    8, about 0.9 GB of the step's activations). Under autocast the matmul runs in its autocast
    dtype and, as the reference's SFT' (bf16 * fp32 gamma) does, the GELU in float32."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        pre = torch.baddbmm(b, h, w)                                    # (k, BN, C)
        ctx.matmul_dtype = pre.dtype
        if pre.dtype != w.dtype:
            pre = pre.to(torch.result_type(pre, w))
        ctx.save_for_backward(b, h, w)
        return F.gelu(pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        b, h, w = ctx.saved_tensors
        t = ctx.matmul_dtype
        with torch.autocast(grad.device.type, enabled=False):
            pre = torch.baddbmm(b.to(t), h.to(t), w.to(t)).to(grad.dtype)
            g = torch.ops.aten.gelu_backward(grad, pre).to(t)               # (k, BN, C)
            dh = torch.bmm(g, w.to(t).transpose(1, 2))                      # (k, BN, d3)
            dw = torch.bmm(h.to(t).transpose(1, 2), g)                      # (k, d3, C)
            db = g.sum(1, keepdim=True)                                     # (k, 1, C)
        return db.to(b.dtype), dh.to(h.dtype), dw.to(w.dtype)


def fold_ipas(ipas: Sequence[InternalPromptAdapter]) -> FoldedIPAs:
    """Fold k IPAs' SFTs into their projections (`FoldedIPAs`), one operator per parameter kind
    for all k, the C-wide vectors of all k in one (the module docstring gives the algebra)."""
    k, first = len(ipas), ipas[0]
    linear = isinstance(first.down, nn.Linear)

    def vectors(m: InternalPromptAdapter) -> List[torch.Tensor]:
        own = [m.sft_in.gamma, m.sft_in.norm.weight, m.sft_in.beta, m.sft_in.norm.bias,
               m.sft_out.gamma, m.sft_out.beta]
        return own + [m.up.bias] if linear else own

    per_ipa = torch.stack([v for m in ipas for v in vectors(m)])         # (7k, C); 6k without up
    per_ipa = per_ipa.view(k, -1, per_ipa.shape[-1])                                  # (k, 7, C)
    gamma, w, beta, bias, g_out, b_out, *up_bias = per_ipa.unbind(1)                  # (k, C)
    a = w * gamma                                                                     # (k, C)
    c = torch.addcmul(beta, bias, gamma)                                              # (k, C)
    g_out, b_out = g_out[:, None, :], b_out[:, None, :]                               # (k, 1, C)
    if not linear:
        return FoldedIPAs(a, c, g_out, b_out)
    in_w, in_b = _FoldDown.apply(a, c, *[m.down.weight for m in ipas],
                                 *[m.down.bias for m in ipas])              # (k, d3, C), (k, d3)
    out_w, out_b = _FoldUp.apply(g_out, b_out, up_bias[0][:, None, :],
                                 *[m.up.weight for m in ipas])           # (k, d3, C), (k, 1, C)
    return FoldedIPAs(in_w, in_b, out_w, out_b)


def batched_ipas(hook: Optional[nn.Module]) -> List[Tuple[int, InternalPromptAdapter]]:
    """(position, IPA) of a block hook's IPAs that `internal_prompts` batches: those of
    `BlockAdapters` without `ipa_deep` (whose IPAs form a chain)."""
    if not isinstance(hook, BlockAdapters) or hook.cfg.ipa_deep:
        return []
    return [(pos, ipa) for pos, ipa in enumerate((hook.ipa1, hook.ipa2)) if ipa is not None]


def fold_block_ipas(hooks: Sequence[Optional[nn.Module]], factored: bool = False
                    ) -> List[Optional[FoldedIPAs]]:
    """`fold_ipas` for the IPAs of many blocks at once, split into one `FoldedIPAs` per block
    (None where a block has no batched IPA): where each block reads its own prompt (EVA02), a
    step folds its weights once, not block by block. With `factored` (the IPAs' outputs go to
    the fused kernels as factors, `internal_prompts`), the up-projections are split IPA by IPA
    here, their gradients stacked in one operator per field for all blocks."""
    groups = [[ipa for _, ipa in batched_ipas(hook)] for hook in hooks]
    sizes = [len(g) for g in groups if g]
    if not sizes:
        return [None] * len(hooks)
    ipas = [ipa for g in groups for ipa in g]
    folded = fold_ipas(ipas)
    per_group = _per_group(folded, sizes, factored and isinstance(ipas[0].down, nn.Linear))
    return [next(per_group) if g else None for g in groups]


def _per_group(folded: FoldedIPAs, sizes: List[int], factored: bool) -> Iterator[FoldedIPAs]:
    """`folded` (of sum(sizes) IPAs) as one `FoldedIPAs` per group of `sizes` IPAs, the
    up-projections split IPA by IPA where `factored`."""
    n = len(sizes)
    if not factored:
        pieces = _Split.apply(sizes, 0, *folded)                # field by field, group by group
        return iter([FoldedIPAs(*pieces[i::n]) for i in range(n)])
    pieces = _Split.apply(sizes, 0, folded.in_w, folded.in_b)
    out_w = iter(_Unstack.apply(folded.out_w))                                  # (d3, C) each
    out_b = iter(_Unstack.apply(folded.out_b.squeeze(1)))                    # (C,) each
    return iter([FoldedIPAs(pieces[i], pieces[n + i], tuple(islice(out_w, size)),
                            tuple(islice(out_b, size))) for i, size in enumerate(sizes)])


def unstack(stacked: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(k, B, N, C) -> k (B, N, C) tensors, their gradients stacked in one operator."""
    return _Unstack.apply(stacked)


def internal_prompts(ipas: Sequence[InternalPromptAdapter], p: torch.Tensor, hw: Grid,
                     folded: Optional[FoldedIPAs] = None, factored: bool = False
                     ) -> Union[torch.Tensor, List[kernels.LowRankExtra]]:
    """k IPAs that read the same prompt P (B, N, C), computed together: (k, B, N, C), equal (up
    to rounding) to `torch.stack([ipa(p, hw) for ipa in ipas])`. With `factored` (and the
    projections) the last step is left undone: k `kernels.LowRankExtra` factors (h_i, W_i, b_i)
    of gelu(h_i W_i + b_i), which the fused adapter's kernels compute as they add them (and in
    training make their gradients from). Without projections (Fig. 4(f)) the k SFTs give a
    (k, B, N, C) stack that SimAM treats as k*B samples. All IPAs must share one configuration;
    `folded`: their `fold_ipas`, if already computed."""
    first = ipas[0]
    k, (B, N, C) = len(ipas), p.shape
    in_w, in_b, out_w, out_b = fold_ipas(ipas) if folded is None else folded
    eps = first.sft_in.norm.eps
    if isinstance(first.down, nn.Linear):
        d3 = in_w.shape[1]
        h = _NormDown.apply(p, in_w.reshape(k * d3, C), in_b.reshape(k * d3), eps)    # (B, N, k*d3)
        if first.simam is not None:
            h = map_to_tokens(first.simam(tokens_to_map(h, hw)))
        h = F.gelu(h).view(B * N, k * d3)
        if factored:                        # (one operator each for the k factors' gradients)
            if not isinstance(out_w, tuple):                    # not yet split IPA by IPA
                out_w, out_b = _Unstack.apply(out_w), _Unstack.apply(out_b.view(k, C))
            return [kernels.LowRankExtra(*f) for f in zip(
                _Split.apply([d3] * k, 1, h), out_w, out_b)]                  # k (BN, d3) views
        h = h.view(B * N, k, d3).transpose(0, 1)                                      # (k, BN, d3)
        return _UpGelu.apply(out_b, h, out_w).view(k, B, N, C)
    n = F.layer_norm(p, (C,), eps=eps)                                                # (B, N, C)
    e = torch.addcmul(in_b[:, None, None, :], n, in_w[:, None, None, :])             # (k, B, N, C)
    if first.simam is not None:
        e = map_to_tokens(first.simam(tokens_to_map(e.view(k * B, N, C), hw))).view(k, B, N, C)
    e = F.gelu(e).view(k, B * N, C)
    return F.gelu(torch.addcmul(out_b, e, out_w)).view(k, B, N, C)
