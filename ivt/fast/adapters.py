"""The fast forms of IV-tuning's modules, which `make_fast` gives a built model's modules by
switching their classes (same parameters and state dict):

  FastSimAM          SimAM through `kernels.simam` (Triton where it runs)
  FastHybridOperation  the partial conv through `kernels.partial_conv_residual`, and a BatchNorm
                     safe to recompute under a checkpoint (`memory.batch_norm`)
  FastHybridAdapter  SFT's affine folded into its LayerNorm's (`_FoldedSFT`), and the fused
                     kernels' training form (`fused_train`; `kernel_weights` gives their tensors)
  FastBlockAdapters  the block's wiring (Eq. 5-6) with its IPAs' outputs computed beforehand
                     (`block_internal_prompts`) and, with impl="fused", each Hybrid Adapter with
                     its residual and internal prompt as one `kernels.hybrid_adapter_*` call
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from ..models.ivtuning import (BlockAdapters, Grid, HybridAdapter, HybridOperation, SimAM,
                               map_to_tokens, tokens_to_map)
from .memory import batch_norm, recomputing
from .prompts import FoldedIPAs, batched_ipas, internal_prompts, unstack


class _FoldedSFT(torch.autograd.Function):
    """SFT with LayerNorm (Eq. 14), (n(z) * w + b) * gamma + beta, as one layer_norm with the
    folded affine (w * gamma, b * gamma + beta): one pass over z forward, one backward.

    The backward takes LayerNorm's own gradients of the folded affine (dw', db') and chains
    them to the four parameters: dw = dw' gamma, db = db' gamma, dgamma = dw' w + db' b,
    dbeta = db'. Computed in the parameters' precision (float32 under autocast, as the
    reference's LayerNorm)."""

    @staticmethod
    def forward(ctx, z, w, b, gamma, beta, eps):
        x = z if z.dtype == w.dtype else z.to(w.dtype)        # bf16 under autocast -> float32
        w_fold, b_fold = w * gamma, torch.addcmul(beta, b, gamma)
        out, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], w_fold, b_fold, eps)
        ctx.save_for_backward(x, mean, rstd, w, b, gamma, w_fold, b_fold)
        ctx.z_dtype = z.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, w, b, gamma, w_fold, b_fold = ctx.saved_tensors
        dx, dw_fold, db_fold = torch.ops.aten.native_layer_norm_backward(
            grad.to(x.dtype), x, x.shape[-1:], mean, rstd, w_fold, b_fold,
            [ctx.needs_input_grad[0], True, True])
        dgamma = torch.addcmul(dw_fold * w, db_fold, b)
        dz = None if dx is None else dx.to(ctx.z_dtype)
        return dz, dw_fold * gamma, db_fold * gamma, dgamma, db_fold, None


def kernel_weights(ha: HybridAdapter) -> kernels.HybridAdapterWeights:
    """A Hybrid Adapter's tensors for `kernels.hybrid_adapter_eval` / `hybrid_adapter_train`."""
    sft, ho = ha.sft, ha.ho
    return kernels.HybridAdapterWeights(
        sft.norm.weight, sft.norm.bias, sft.gamma, sft.beta, ha.down.weight, ha.down.bias,
        ho.dwconv.weight, ho.dwconv.bias, ho.pw1.weight, ho.pw1.bias, ho.bn.running_mean,
        ho.bn.running_var, ho.bn.weight, ho.bn.bias, ho.pw2.weight, ho.pw2.bias,
        ha.up.weight, ha.up.bias, sft.norm.eps, ho.bn.eps, ho.cp)


class FastSimAM(SimAM):
    """SimAM (Eq. 11-12) by `kernels.simam`: Triton where it runs, else the same PyTorch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.simam(x, self.lam)


class FastHybridOperation(HybridOperation):
    """HO (Eq. 10) with the partial conv by `kernels.partial_conv_residual`, safe to recompute
    under `memory.checkpointed` (`memory.batch_norm`)."""

    def forward(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        y = kernels.partial_conv_residual(tokens_to_map(z, hw), self.dwconv.weight,
                                          self.dwconv.bias, self.cp)
        y = map_to_tokens(y)                                           # (B, N, c)
        h = batch_norm(self.bn, self.pw1(y).flatten(0, 1)).view_as(y)
        return y + self.pw2(F.relu(h))


class FastHybridAdapter(HybridAdapter):
    """HA (Eq. 5, 15) with SFT folded into its LayerNorm, and its fused training kernels."""

    def branch(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        """psi(z) of Eq. 15 with SFT's affine folded into its LayerNorm's (`_FoldedSFT`)."""
        sft = self.sft
        s = _FoldedSFT.apply(z, sft.norm.weight, sft.norm.bias, sft.gamma, sft.beta,
                             sft.norm.eps)                              # Eq. 14
        h = F.gelu(self.ho(self.down(s), hw))                           # (B, N, d2)
        if self.training and self.drop.p > 0:
            # F.dropout's CUDA operator, here on every device: one operator, not four on the
            # CPU, with the same mask and values (tests/test_fast_path.py)
            h = torch.native_dropout(h, self.drop.p, True)[0]
        return self.up(h)

    def fused_train(self, x: torch.Tensor, residual: torch.Tensor, extra, hw: Grid,
                    lead: int = 0) -> torch.Tensor:
        """residual + psi(x) (+ extra: None, tokens or a `kernels.LowRankExtra`) in training
        mode as Triton kernels (`kernels.hybrid_adapter_train`): BatchNorm on the batch's
        statistics, updating its running statistics and num_batches_tracked except inside a
        checkpoint's recomputation, and the dropout mask drawn by the kernels' wrapper from
        torch's generator (so a recomputation draws it again identically). With lead > 0, x
        and residual are (B, lead + N, C), whose first `lead` rows the kernels pass on."""
        bn = self.ho.bn
        update = bn.track_running_stats and not recomputing()
        return kernels.hybrid_adapter_train(x, residual, extra, hw, kernel_weights(self), None,
                                            self.drop.p, bn.momentum, update,
                                            bn.num_batches_tracked, lead)


class FastBlockAdapters(BlockAdapters):
    """`BlockAdapters` (Eq. 5-6) taking its IPAs' outputs computed beforehand, for all the IPAs
    that read the same prompt at once (`block_internal_prompts`); with `fused` (impl="fused",
    set by `make_fast`) each Hybrid Adapter, both residual adds and the internal prompt are one
    kernel call (`fused_kernels`)."""

    fused = False

    def forward(self, pos: int, z_in: torch.Tensor, z_out: torch.Tensor, prompt: torch.Tensor,
                hw: Grid, p_internal=None, lead: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """`BlockAdapters.forward` with this position's IPA output `p_internal` (B, N, C) (for
        the fused kernels, its `kernels.LowRankExtra` factors), computed here where not given
        (`ipa_deep`'s chain, Fig. 4(e), or a call on its own). With lead > 0, z_in, z_out and
        the result are (B, lead + N, C): the adapters act on the N tokens after the first
        `lead` (EVA02's cls token), which pass unchanged (the training kernels copy them; the
        other forms concatenate them back)."""
        ha, ipa = (self.ha1, self.ipa1) if pos == 0 else (self.ha2, self.ipa2)
        if ipa is not None and p_internal is None:
            p_internal = internal_prompts([ipa], prompt, hw)[0]
            prompt = p_internal if self.cfg.ipa_deep else prompt
        z = z_out
        x = z_in if self.cfg.parallel else z_out
        fused = self.fused_kernels(pos, x)
        if fused == "train":
            return ha.fused_train(x, z, p_internal, hw, lead), prompt
        if lead:                                  # one view where x is z (one slice backward)
            z = z[:, lead:]
            x = z if x is z_out else x[:, lead:]
        if fused == "eval":
            z = kernels.hybrid_adapter_eval(x, z, p_internal, hw, kernel_weights(ha))
        else:
            if isinstance(p_internal, kernels.LowRankExtra):    # factors, but no fused kernel
                p_internal = p_internal.dense(z.shape)
            if ha is not None:
                z = z + ha.branch(x, hw)                                # Eq. 5
            if p_internal is not None:
                z = z + p_internal.to(z.dtype)                          # Eq. 6
        return (torch.cat([z_out[:, :lead], z], dim=1) if lead else z), prompt

    def fused_kernels(self, pos: int, x: torch.Tensor) -> Optional[str]:
        """Which fused kernels `forward` runs the Hybrid Adapter at `pos` as, for tokens on x's
        device: "eval" (`kernels.hybrid_adapter_eval`: adapters in eval mode, no autograd),
        "train" (`FastHybridAdapter.fused_train`: in training mode, BatchNorm on batch
        statistics with a momentum, where Triton runs, over more than one token: one is refused
        by `branch`'s BatchNorm as by the reference's) or None (`FastHybridAdapter.branch`)."""
        ha = self.ha1 if pos == 0 else self.ha2
        if ha is None or not self.fused:
            return None
        if not torch.is_grad_enabled() and all(not a.training for a in (self.ha1, self.ha2)
                                               if a is not None):
            return "eval"
        bn = ha.ho.bn
        if (ha.training and bn.training and bn.momentum is not None and kernels.use_triton(x)
                and x.numel() > x.shape[-1]):
            return "train"
        return None

    def fuses_norms(self, x: torch.Tensor) -> bool:
        """Whether `fused_eval` applies to tokens like x: the sequential form (not parallel, not
        `ipa_deep`) with both Hybrid Adapters, each run as the fused inference kernels."""
        return (not self.cfg.parallel and not self.cfg.ipa_deep
                and self.ha1 is not None and self.ha2 is not None
                and self.fused_kernels(0, x) == self.fused_kernels(1, x) == "eval")

    def fused_eval(self, pos: int, z_out: torch.Tensor, hw: Grid,
                   p_internal: Optional[kernels.LowRankExtra], norm: Optional[nn.LayerNorm],
                   lead: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`forward` at inference where `fuses_norms`: z = z_out + HA branch(z_out) + IPA output
        in one `kernels.hybrid_adapter_eval` call, which, given the LayerNorm `norm` that the
        next sub-layer applies to z, also returns norm(z), made while the kernel holds z, in the
        dtype the next Linear computes in (autocast's, else z's). -> (z, norm(z) or None).
        With `lead` > 0, z_out is (B, lead + N, C) and its first `lead` tokens (EVA02's cls
        token) pass the adapter unchanged: the kernel writes the other N over z_out's own (each
        token read before it is written; at inference z_out is the block's own new tensor),
        and their LayerNorm into a (B, lead + N, C) tensor, so nothing is concatenated."""
        ha = self.ha1 if pos == 0 else self.ha2
        patches = z_out[:, lead:]
        next_norm = normed = None
        if norm is not None:
            device = z_out.device.type
            dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else z_out.dtype)
            normed = torch.empty(z_out.shape, device=z_out.device, dtype=dtype) if lead else None
            next_norm = kernels.NextNorm(norm.weight, norm.bias, norm.eps, dtype,
                                         None if normed is None else normed[:, lead:])
        result = kernels.hybrid_adapter_eval(patches, patches, p_internal, hw,
                                             kernel_weights(ha), next_norm,
                                             patches if lead else None)
        z, zn = result if next_norm is not None else (result, None)
        if not lead:
            return z, zn
        if normed is not None:
            normed[:, :lead] = norm(z_out[:, :lead])
        return z_out, normed


def takes_factors(adapters: Sequence[Optional[nn.Module]], x: torch.Tensor) -> bool:
    """Whether every IPA of these block hooks that `internal_prompts` batches feeds a Hybrid
    Adapter run as fused kernels (`FastBlockAdapters.fused_kernels`) on tokens like x, which
    then take the IPA's output as its `kernels.LowRankExtra` factors."""
    slots = [(hook, pos) for hook in adapters for pos, _ in batched_ipas(hook)]
    return bool(slots) and all(hook.fused_kernels(pos, x) is not None for hook, pos in slots)


def block_internal_prompts(adapters: Sequence[Optional[nn.Module]], p: Optional[torch.Tensor],
                           hw: Grid, folded: Optional[FoldedIPAs] = None
                           ) -> List[List[Optional[torch.Tensor]]]:
    """IPA1(P), IPA2(P) of every block in `adapters` (their `block.adapters` hooks), all read
    from the same external prompt P and computed together by `internal_prompts`; `folded`: their
    weights already folded (`prompts.fold_block_ipas`).

    Returns per block [IPA1 output or None, IPA2 output or None], each (B, N, C), or, where
    every IPA's output goes to a Hybrid Adapter that runs as fused kernels
    (`FastBlockAdapters.fused_kernels`), as the `kernels.LowRankExtra` factors those kernels
    take. Hooks that are not `BlockAdapters`, absent IPAs and `ipa_deep` (whose IPAs form a
    chain) give None.
    """
    out: List[List[Optional[torch.Tensor]]] = [[None, None] for _ in adapters]
    slots = [(j, pos, ipa) for j, hook in enumerate(adapters) for pos, ipa in batched_ipas(hook)]
    if slots:
        stacked = internal_prompts([ipa for _, _, ipa in slots], p, hw, folded,
                                   takes_factors(adapters, p))
        for (j, pos, _), p_internal in zip(slots, stacked if isinstance(stacked, list)
                                           else unstack(stacked)):          # (k, B, N, C)
            out[j][pos] = p_internal
    return out


def adapt(hook: nn.Module, pos: int, z_in: torch.Tensor, z_out: torch.Tensor,
          prompt: Optional[torch.Tensor], hw: Grid, p_internal: Optional[torch.Tensor],
          lead: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A block hook on the fast path: `FastBlockAdapters` with the IPA output computed
    beforehand, any other module (a PETL method's) through its usual call on the tokens after
    the first `lead` (z_in, z_out and the result: (B, lead + N, C))."""
    if isinstance(hook, FastBlockAdapters):
        return hook(pos, z_in, z_out, prompt, hw, p_internal, lead)
    if not lead:
        return hook(pos, z_in, z_out, prompt, hw)
    patches, prompt = hook(pos, z_in[:, lead:], z_out[:, lead:], prompt, hw)
    return torch.cat([z_out[:, :lead], patches], dim=1), prompt
