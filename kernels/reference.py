"""Pure-PyTorch references for the IV-tuning operations that have Triton kernels.

These are the ground truth the Triton kernels are tested against, and the path the product takes
wherever Triton or a GPU is missing. SimAM and the partial conv accept contiguous or channels-last
(B, C, H, W) maps; the inference Hybrid Adapter works on (B, N, C) tokens.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .utils import destination


def simam_reference(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (Eq. 11-12): parameter-free attention, per sample and channel.

    x: (B, C, H, W). With mu = mean_hw(x), d = (x - mu)^2, v = sum_hw(d) / n, n = H*W - 1,
    e = d / (4 (v + lam)) + 0.5 (this e is 1/e* of Eq. 12), returns x * sigmoid(e).
    Edge case H*W == 1: n is taken as 1 (not 0), so d = v = 0, e = 0.5 and the output is
    x * sigmoid(0.5) instead of NaN.
    """
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
    v = d.sum(dim=(2, 3), keepdim=True) / n
    e = d / (4 * (v + lam)) + 0.5
    return x * torch.sigmoid(e)


def partial_conv_residual_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                    cp: int) -> torch.Tensor:
    """First step of the Hybrid Operation (Fig. 3): x + concat(dwconv3x3(x[:, :cp]), x[:, cp:]).

    x: (B, C, H, W); weight: (cp, 1, 3, 3); bias: (cp,). The depthwise 3x3 convolution (padding 1)
    touches only the first cp channels; the other C - cp channels pass through, so after the outer
    residual they come out doubled. cp == 0 (no conv channels) returns 2x.
    """
    if cp == 0:
        return x + x
    conv = F.conv2d(x[:, :cp], weight, bias, padding=1, groups=cp)
    return x + torch.cat([conv, x[:, cp:]], dim=1)


class LowRankExtra(NamedTuple):
    """A term added to a Hybrid Adapter's output, gelu(h w + b), given by its factors instead of
    as (B, N, C) tokens: h (B*N, r) (rows of any stride), w (r, C), b (C,). An internal prompt
    (Sec. 3.4, r = d3 = 8) is of this form; the fused adapter's kernels make it (and in
    training its gradients) in registers, chunk by chunk of C, instead of reading B*N*C tokens."""
    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    def dense(self, shape) -> torch.Tensor:
        """The term as tokens of `shape` (B, N, C): the matmul in autocast's dtype where autocast
        is on (as a Linear's), the GELU in the promoted dtype of that and w's (float32 for
        bfloat16 activations and float32 weights, as the reference IPA's SFT' makes it)."""
        pre = torch.addmm(self.b, self.h, self.w)
        return F.gelu(pre.to(torch.promote_types(pre.dtype, self.w.dtype))).view(shape)


class NextNorm(NamedTuple):
    """The LayerNorm that the next sub-layer applies to a Hybrid Adapter's output, for the fused
    inference kernel to make as well while it holds that output (`hybrid_adapter_eval`): weight
    and bias (C,), eps, the dtype the normalised tokens are wanted in (autocast's, where the
    next layer is a Linear under autocast: it would cast them to that dtype itself), and `out`,
    where to write them (as `hybrid_adapter_eval`'s `out`), else a new tensor."""
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    dtype: torch.dtype
    out: Optional[torch.Tensor] = None


class HybridAdapterWeights(NamedTuple):
    """A Hybrid Adapter's tensors for `hybrid_adapter_eval` (18 tensors, then 3 numbers)."""
    ln_weight: torch.Tensor      # (C,)  SFT's LayerNorm affine
    ln_bias: torch.Tensor
    gamma: torch.Tensor          # (C,)  SFT's gamma, beta (Eq. 14)
    beta: torch.Tensor
    down_weight: torch.Tensor    # (d2, C)
    down_bias: torch.Tensor
    conv_weight: torch.Tensor    # (cp, 1, 3, 3)  the partial depthwise conv
    conv_bias: torch.Tensor
    pw1_weight: torch.Tensor     # (d2, d2)
    pw1_bias: torch.Tensor
    bn_mean: torch.Tensor        # (d2,)  BatchNorm running statistics and affine
    bn_var: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    pw2_weight: torch.Tensor     # (d2, d2)
    pw2_bias: torch.Tensor
    up_weight: torch.Tensor      # (C, d2)
    up_bias: torch.Tensor
    ln_eps: float
    bn_eps: float
    cp: int


def _adapter_hidden(x: torch.Tensor, hw: Tuple[int, int], w: HybridAdapterWeights,
                    batch_norm) -> torch.Tensor:
    """gelu(HO(down(SFT(x)))): (B, N, d2) from (B, N, C) tokens; `batch_norm` maps pw1's output
    (B*N, d2) to the BatchNorm's output."""
    B, N, C = x.shape
    s = F.layer_norm(x, (C,), w.ln_weight, w.ln_bias, w.ln_eps) * w.gamma + w.beta   # Eq. 14
    h = F.linear(s, w.down_weight, w.down_bias)                                     # (B, N, d2)
    d2 = h.shape[-1]
    y = partial_conv_residual_reference(h.reshape(B, *hw, d2).permute(0, 3, 1, 2),
                                        w.conv_weight, w.conv_bias, w.cp)
    y = y.permute(0, 2, 3, 1).reshape(B, N, d2)                                     # Eq. 10
    p = batch_norm(F.linear(y, w.pw1_weight, w.pw1_bias).reshape(B * N, d2))
    return F.gelu(y + F.linear(F.relu(p).reshape(B, N, d2), w.pw2_weight, w.pw2_bias))


def hybrid_adapter_eval_reference(x: torch.Tensor, residual: torch.Tensor,
                                  extra, hw: Tuple[int, int],
                                  w: HybridAdapterWeights, norm: Optional[NextNorm] = None,
                                  out: Optional[torch.Tensor] = None):
    """residual + up(gelu(HO(down(SFT(x))))) (+ extra): a Hybrid Adapter at inference (Eq. 15,
    dropout off, BatchNorm on its running statistics) with the block's residual and the internal
    prompt (Eq. 6) added. x, residual: (B, N, C) tokens on an (H, W) grid; extra: None, (B, N, C)
    tokens or a `LowRankExtra`; the sum in residual's dtype (the block stream's, which the
    float32 internal prompt under autocast does not widen). With `norm` (a `NextNorm`): (that,
    its LayerNorm in norm.dtype). `out`: a (B, N, C) tensor to write the result into
    (`destination`), else a new one; `norm.out` likewise."""
    hidden = _adapter_hidden(x, hw, w, lambda q: F.batch_norm(
        q, w.bn_mean, w.bn_var, w.bn_weight, w.bn_bias, False, 0.0, w.bn_eps))
    y = residual + F.linear(hidden, w.up_weight, w.up_bias)
    if isinstance(extra, LowRankExtra):
        extra = extra.dense(y.shape)
    y = y if extra is None else y + extra.to(y.dtype)         # in the stream's dtype
    if out is not None:
        y = destination(out, y.shape, y.dtype, "out").copy_(y)
    if norm is None:
        return y
    normed = F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps).to(norm.dtype)
    if norm.out is not None:
        normed = destination(norm.out, y.shape, norm.dtype, "norm.out").copy_(normed)
    return y, normed


def hybrid_adapter_train_reference(x: torch.Tensor, residual: torch.Tensor,
                                   extra, hw: Tuple[int, int],
                                   w: HybridAdapterWeights, keep: Optional[torch.Tensor], p: float,
                                   momentum: float, update: bool,
                                   batches: Optional[torch.Tensor] = None,
                                   lead: int = 0) -> torch.Tensor:
    """`hybrid_adapter_eval_reference` in training mode: BatchNorm on the batch's statistics
    over all B*N tokens (its running statistics, w.bn_mean and w.bn_var, take the batch in place
    when `update`, and then the count `batches`, BatchNorm's num_batches_tracked, if given, goes
    up by one), dropout with the mask `keep` (B*N, d2) of kept units scaled by 1 / (1 - p)
    (None: drawn when p > 0, each unit kept with probability 1 - p, from torch's generator);
    extra: None, (B, N, C) tokens or a `LowRankExtra`. With lead > 0, x and residual are
    (B, lead + N, C) (EVA02's cls token first): the adapter reads and adds to the N tokens
    after the first `lead`, and the result, (B, lead + N, C) too, keeps residual's first `lead`
    rows as they are."""
    if lead:
        tokens = hybrid_adapter_train_reference(x[:, lead:], residual[:, lead:], extra, hw, w,
                                                keep, p, momentum, update, batches)
        return torch.cat([residual[:, :lead], tokens], dim=1)
    if update and batches is not None:
        batches.add_(1)
    B, N, _ = x.shape
    if keep is None and p > 0:
        keep = torch.empty(B * N, w.down_weight.shape[0], dtype=torch.bool,
                           device=x.device).bernoulli_(1 - p)
    running = (w.bn_mean, w.bn_var) if update else (w.bn_mean.clone(), w.bn_var.clone())
    hidden = _adapter_hidden(x, hw, w, lambda q: F.batch_norm(
        q, *running, w.bn_weight, w.bn_bias, True, momentum, w.bn_eps))
    if keep is not None:
        hidden = hidden * keep.reshape(B, N, -1).to(hidden.dtype) / (1.0 - p)
    out = residual + F.linear(hidden, w.up_weight, w.up_bias)
    if isinstance(extra, LowRankExtra):
        extra = extra.dense(out.shape)
    return out if extra is None else out + extra.to(out.dtype)  # in the stream's dtype
