"""The IV-tuning modules (paper Sec. 3, spec `method.md` sections 1-4), backbone-agnostic.

Every module works in token layout: tokens `z` are (B, N, C) with an explicit grid `hw = (H, W)`,
N = H*W, ordered row-major (h, w). Where a module needs a map, `tokens_to_map` views the tokens as
a channels-last (B, C, H, W) tensor without copying, so the 1x1 convolutions are plain Linear
layers and only the depthwise convolution and SimAM look at the grid.

Modules, bottom-up:
  SimAM                  parameter-free attention (Eq. 11-12)
  HybridOperation  HO    partial depthwise conv + point-wise convs (Fig. 3, Eq. 10)
  SFT                    LN(z) * gamma + beta (Eq. 14), or z * gamma + beta without LN
  HybridAdapter    HA    z + up(dropout(gelu(HO(down(SFT(z)))))) (Eq. 5, 15)
  InternalPromptAdapter  gelu(SFT'(up(gelu(simam(down(SFT(P))))))) on the external prompt (Sec. 3.4)
  EMPG                   external modal prompt generator (Eq. 7-13)
  BlockAdapters          the four modules of one transformer block and their wiring (Eq. 5-6)
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels

Grid = Tuple[int, int]

VARIANTS = ("ivt", "empg_only", "empg_ha", "mhsa_only", "ffn_only", "parallel",
            "ipa_wo_projection", "ipa_deep", "wo_simam", "pe_ir", "ir_missing")


def tokens_to_map(z: torch.Tensor, hw: Grid) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) channels-last view (no copy for contiguous tokens)."""
    B, N, C = z.shape
    H, W = hw
    if N != H * W:
        raise ValueError(f"{N} tokens do not form a {H}x{W} grid")
    return z.reshape(B, H, W, C).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens, row-major (h, w)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


@dataclass
class IVTConfig:
    """Hyperparameters of IV-tuning. `variant` selects one of the paper's ablations (spec sec. 4)."""
    d1: int = 8                 # EMPG hidden width
    d2: int = 64                # Hybrid Adapter hidden width
    d3: int = 8                 # Internal Prompt Adapter hidden width
    variant: str = "ivt"
    layers: Optional[Sequence[int]] = None   # 0-based block indices with adapters; None = all
    dropout: float = 0.1        # inside the Hybrid Adapter
    lam: float = 1e-4           # SimAM's lambda
    zero_init_up: bool = False  # extra (not the paper): zero-init HA/IPA up-projections
    fused_adapters: bool = False  # implementation (needs fast=True): each Hybrid Adapter as
    #                               Triton kernels where they run (`kernels.hybrid_adapter`)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown IV-tuning variant {self.variant!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        for name in ("d1", "d2", "d3"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive width, got {getattr(self, name)}")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})

    # What each variant changes (spec sec. 4).
    @property
    def has_ha(self) -> bool:
        return self.variant != "empg_only"

    @property
    def has_ipa(self) -> bool:
        return self.variant not in ("empg_only", "empg_ha")

    @property
    def positions(self) -> Tuple[int, ...]:
        """Which {HA, IPA} pairs a block has: 0 after attention, 1 after the MLP."""
        return {"mhsa_only": (0,), "ffn_only": (1,)}.get(self.variant, (0, 1))

    @property
    def parallel(self) -> bool:       # Fig. 4(a)
        return self.variant == "parallel"

    @property
    def ipa_deep(self) -> bool:       # Fig. 4(e)
        return self.variant == "ipa_deep"

    @property
    def use_simam(self) -> bool:
        return self.variant != "wo_simam"

    @property
    def ipa_projection(self) -> bool:  # Fig. 4(f) removes it
        return self.variant != "ipa_wo_projection"

    @property
    def empg_visible(self) -> bool:   # Fig. 4(g): the prompt comes from infrared alone
        return self.variant != "pe_ir"

    @property
    def ir_from_visible(self) -> bool:  # Fig. 4(h)
        return self.variant == "ir_missing"

    def block_has_adapters(self, index: int) -> bool:
        return self.layers is None or index in self.layers


def fast_options(tuning: str, fast: bool, checkpoint_blocks: Union[bool, int],
                 ivt_cfg: Optional[IVTConfig] = None, recompute_frozen: bool = False
                 ) -> Tuple[bool, float, bool]:
    """Validate the build options `fast`, `checkpoint_blocks`, `recompute_frozen` and
    `fused_adapters`; returns whether the fast path runs (IV-tuning only: other tunings have
    nothing it changes), how many blocks, counted from the input, it checkpoints, and whether the
    other blocks recompute their frozen sub-layers (`recomputed`).

    `checkpoint_blocks=True` checkpoints all blocks (`math.inf`), an integer n the first n (a
    hierarchical backbone keeps most of its activations in its first, high-resolution blocks, so
    a few of them buy most of the memory for a fraction of the recomputation), False or 0 none."""
    if isinstance(checkpoint_blocks, bool):
        count = math.inf if checkpoint_blocks else 0
    elif isinstance(checkpoint_blocks, int) and checkpoint_blocks >= 0:
        count = checkpoint_blocks
    else:
        raise ValueError(f"checkpoint_blocks={checkpoint_blocks!r}: expected True, False or a "
                         f"number of blocks >= 0")
    for name, value in (("checkpoint_blocks", checkpoint_blocks),
                        ("recompute_frozen", recompute_frozen)):
        if value and not (fast and tuning == "ivt"):
            raise ValueError(f"{name}={value!r} needs fast=True and tuning='ivt' (got "
                             f"fast={fast}, tuning={tuning!r})")
    if ivt_cfg is not None and ivt_cfg.fused_adapters and not fast:
        raise ValueError("fused_adapters=True needs fast=True")
    return bool(fast) and tuning == "ivt", count, bool(recompute_frozen)


class _Recomputation:
    """Whether a checkpoint is recomputing its forward (`checkpointed` sets it)."""
    active = False


@contextmanager
def _recomputing():
    previous, _Recomputation.active = _Recomputation.active, True
    try:
        yield
    finally:
        _Recomputation.active = previous


def checkpointed(fn: Callable[..., Any], *args) -> Any:
    """fn(*args) under activation checkpointing when grad is enabled: only the inputs are kept
    and fn is recomputed in backward, with dropout/drop-path RNG state replayed (so exactly)
    and BatchNorm running statistics left alone during the recomputation (`batch_norm`)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _recomputing()))


def recomputed(sublayer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               enabled: bool = True) -> torch.Tensor:
    """sublayer(x) for a frozen sub-layer of the backbone (LayerNorm + attention, or LayerNorm +
    MLP), keeping only its input x (B, N, C) for backward when `enabled` and grad is on: its
    intermediates (the LayerNorm's statistics, q, k, v and the attention output, or the MLP's
    4C hidden layer) are recomputed in backward.

    A frozen sub-layer needs no weight gradients, so backward only needs what its input-gradient
    chain reads; recomputing that costs the sub-layer's forward once more (a few operators: no
    adapter, no dropout inside, so no RNG state to replay), while the adapters keep their own
    activations."""
    if not (enabled and torch.is_grad_enabled()):
        return sublayer(x)
    return torch.utils.checkpoint.checkpoint(sublayer, x, use_reentrant=False,
                                             preserve_rng_state=False)


def batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """bn(x); inside a checkpoint's recomputation the same batch statistics, with copies of the
    running statistics absorbing the second update."""
    if bn.training and _Recomputation.active:
        return F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                            bn.bias, True, 0.0, bn.eps)
    return bn(x)


class SimAM(nn.Module):
    """SimAM (Eq. 11-12) on a (B, C, H, W) map; Triton-fused on GPU (see `kernels`)."""

    def __init__(self, lam: float = 1e-4):
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.simam(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class HybridOperation(nn.Module):
    """HO(c) (Fig. 3, Eq. 10) in token layout. Parameters: 10*cp + 2*c*c + 4*c, cp = c // 4.

    1. y = x + concat(dwconv3x3(x[:, :cp]), x[:, cp:])        partial depthwise conv, residual
    2. out = y + pw2(relu(bn(pw1(y))))                         1x1 convs as Linear layers
    """

    def __init__(self, c: int):
        super().__init__()
        if c < 4:
            raise ValueError(f"the Hybrid Operation needs at least 4 channels, got {c}")
        self.cp = c // 4
        self.dwconv = nn.Conv2d(self.cp, self.cp, 3, padding=1, groups=self.cp)
        self.pw1 = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)
        self.pw2 = nn.Linear(c, c)

    def forward(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        """z: (B, N, c) -> (B, N, c)."""
        y = kernels.partial_conv_residual(tokens_to_map(z, hw), self.dwconv.weight,
                                          self.dwconv.bias, self.cp)
        y = map_to_tokens(y)                                           # (B, N, c)
        h = self.bn(self.pw1(y).flatten(0, 1)).view_as(y)              # BN over all B*N tokens
        return y + self.pw2(F.relu(h))

    def fast(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        """`forward`, safe to recompute under `checkpointed` (`batch_norm`)."""
        y = kernels.partial_conv_residual(tokens_to_map(z, hw), self.dwconv.weight,
                                          self.dwconv.bias, self.cp)
        y = map_to_tokens(y)                                           # (B, N, c)
        h = batch_norm(self.bn, self.pw1(y).flatten(0, 1)).view_as(y)
        return y + self.pw2(F.relu(h))


class SFT(nn.Module):
    """Simple feature transform (Eq. 14): LN(z) * gamma + beta, or z * gamma + beta (no LN)."""

    def __init__(self, dim: int, with_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if with_norm else nn.Identity()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z) * self.gamma + self.beta


def _init_linear(linear: nn.Linear, zero: bool = False) -> nn.Linear:
    """Adapter Linear init (spec sec. 2): trunc-normal std 0.02, zero bias."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


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


class HybridAdapter(nn.Module):
    """HA (Eq. 5, 15): z + up(dropout(gelu(HO(down(SFT(z)))))), hidden width d2."""

    def __init__(self, dim: int, hidden: int = 64, dropout: float = 0.1,
                 zero_init_up: bool = False):
        super().__init__()
        self.sft = SFT(dim)
        self.down = _init_linear(nn.Linear(dim, hidden))
        self.ho = HybridOperation(hidden)
        self.drop = nn.Dropout(dropout)
        self.up = _init_linear(nn.Linear(hidden, dim), zero=zero_init_up)

    def branch(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        """psi(z) of Eq. 15, without the residual. z: (B, N, C) -> (B, N, C)."""
        h = self.ho(self.down(self.sft(z)), hw)                        # (B, N, d2)
        return self.up(self.drop(F.gelu(h)))

    def forward(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        return z + self.branch(z, hw)

    def kernel_weights(self) -> kernels.HybridAdapterWeights:
        """This adapter's tensors for `kernels.hybrid_adapter_eval` / `hybrid_adapter_train`."""
        sft, ho = self.sft, self.ho
        return kernels.HybridAdapterWeights(
            sft.norm.weight, sft.norm.bias, sft.gamma, sft.beta, self.down.weight, self.down.bias,
            ho.dwconv.weight, ho.dwconv.bias, ho.pw1.weight, ho.pw1.bias, ho.bn.running_mean,
            ho.bn.running_var, ho.bn.weight, ho.bn.bias, ho.pw2.weight, ho.pw2.bias,
            self.up.weight, self.up.bias, sft.norm.eps, ho.bn.eps, ho.cp)

    def fused_train(self, x: torch.Tensor, residual: torch.Tensor, extra, hw: Grid
                    ) -> torch.Tensor:
        """residual + psi(x) (+ extra: None, tokens or a `kernels.LowRankExtra`) in training
        mode as Triton kernels (`kernels.hybrid_adapter_train`): BatchNorm on the batch's
        statistics, updating its running statistics and num_batches_tracked except inside a
        checkpoint's recomputation, and the dropout mask drawn from torch's generator (so a
        recomputation draws it again identically)."""
        bn, p = self.ho.bn, self.drop.p
        keep = None
        if p > 0:
            keep = torch.empty(x.shape[0] * x.shape[1], self.down.out_features, dtype=torch.bool,
                               device=x.device).bernoulli_(1 - p)
        update = bn.track_running_stats and not _Recomputation.active
        return kernels.hybrid_adapter_train(x, residual, extra, hw, self.kernel_weights(), keep,
                                            p, bn.momentum, update, bn.num_batches_tracked)

    def fast_branch(self, z: torch.Tensor, hw: Grid) -> torch.Tensor:
        """`branch` with SFT's affine folded into its LayerNorm's (`_FoldedSFT`), and the
        Hybrid Operation's `fast` form (safe to recompute under `checkpointed`)."""
        sft = self.sft
        s = _FoldedSFT.apply(z, sft.norm.weight, sft.norm.bias, sft.gamma, sft.beta,
                             sft.norm.eps)                              # Eq. 14
        h = F.gelu(self.ho.fast(self.down(s), hw))                      # (B, N, d2)
        if self.training and self.drop.p > 0:
            # F.dropout's CUDA operator, here on every device: one operator, not four on the
            # CPU, with the same mask and values (tests/test_fast_path.py)
            h = torch.native_dropout(h, self.drop.p, True)[0]
        return self.up(h)


class InternalPromptAdapter(nn.Module):
    """IPA (Sec. 3.4) on the external prompt P: gelu(SFT'(up(gelu(simam(down(SFT(P))))))).

    SFT' has no LayerNorm. No residual: the output P_I is added to the block stream (Eq. 6).
    `projection=False` is Fig. 4(f): no down/up, SimAM runs on all C channels.
    `use_simam=False` is the wo-simAM ablation.
    """

    def __init__(self, dim: int, hidden: int = 8, use_simam: bool = True, projection: bool = True,
                 lam: float = 1e-4, zero_init_up: bool = False):
        super().__init__()
        self.sft_in = SFT(dim)
        self.down = _init_linear(nn.Linear(dim, hidden)) if projection else nn.Identity()
        self.simam = SimAM(lam) if use_simam else None
        self.up = (_init_linear(nn.Linear(hidden, dim), zero=zero_init_up) if projection
                   else nn.Identity())
        self.sft_out = SFT(dim, with_norm=False)

    def forward(self, p: torch.Tensor, hw: Grid) -> torch.Tensor:
        """p: (B, N, C) external prompt -> (B, N, C) internal prompt P_I."""
        h = self.down(self.sft_in(p))                                  # (B, N, d3)
        if self.simam is not None:
            h = map_to_tokens(self.simam(tokens_to_map(h, hw)))
        return F.gelu(self.sft_out(self.up(F.gelu(h))))


class _StackTransposed(torch.autograd.Function):
    """torch.stack([w.t() for w in weights]): (k, in, out) from k (out, in) weights, with the
    backward returning each weight's gradient already in the weight's own (contiguous) layout,
    one transpose-copy for all k instead of one copy per weight."""

    @staticmethod
    def forward(ctx, *weights: torch.Tensor) -> torch.Tensor:
        return torch.stack([w.t() for w in weights])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.transpose(1, 2).contiguous().unbind(0)


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


class FoldedIPAs(NamedTuple):
    """The weights of k IPAs with one configuration, folded for `internal_prompts` (see there).

    With projections: in_w (k, d3, C) and in_b (k, d3), each first SFT folded into its
    down-projection; out_w (k, d3, C) and out_b (k, 1, C), each SFT' folded into its transposed
    up-projection. Without (Fig. 4(f)): in_w, in_b (k, C) the first SFTs' scale and shift on the
    normalised prompt; out_w, out_b (k, 1, C) the SFT's gamma and beta.
    """
    in_w: torch.Tensor
    in_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor


def fold_ipas(ipas: Sequence[InternalPromptAdapter]) -> FoldedIPAs:
    """Fold k IPAs' SFTs into their projections (`FoldedIPAs`), one operator per parameter kind
    for all k: `internal_prompts` explains the algebra."""
    first = ipas[0]

    def stacked(get):
        return torch.stack([get(m) for m in ipas])

    gamma = stacked(lambda m: m.sft_in.gamma)                                         # (k, C)
    a = stacked(lambda m: m.sft_in.norm.weight) * gamma                               # (k, C)
    c = torch.addcmul(stacked(lambda m: m.sft_in.beta), stacked(lambda m: m.sft_in.norm.bias),
                      gamma)                                                          # (k, C)
    g_out = stacked(lambda m: m.sft_out.gamma)[:, None, :]                            # (k, 1, C)
    b_out = stacked(lambda m: m.sft_out.beta)[:, None, :]
    if not isinstance(first.down, nn.Linear):
        return FoldedIPAs(a, c, g_out, b_out)
    W = stacked(lambda m: m.down.weight)                                              # (k, d3, C)
    in_b = torch.baddbmm(stacked(lambda m: m.down.bias)[:, :, None], W, c[:, :, None]).squeeze(2)
    u_t = _StackTransposed.apply(*[m.up.weight for m in ipas])                        # (k, d3, C)
    u_bias = stacked(lambda m: m.up.bias)[:, None, :]                                 # (k, 1, C)
    return FoldedIPAs(W * a[:, None, :], in_b, u_t * g_out, u_bias * g_out + b_out)


class _Split(torch.autograd.Function):
    """Each of the given tensors split along dim 0 into `sizes`; returns the pieces tensor by
    tensor. The backward concatenates each tensor's gradients in one operator (autograd's own
    split backward writes every piece into a zero tensor)."""

    @staticmethod
    def forward(ctx, sizes: Sequence[int], *tensors: torch.Tensor):
        ctx.groups = len(sizes)
        return tuple(piece for t in tensors for piece in t.split(list(sizes)))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        n = ctx.groups
        return (None,) + tuple(torch.cat(grads[i:i + n]) for i in range(0, len(grads), n))


def fold_block_ipas(hooks: Sequence[Optional[nn.Module]]) -> List[Optional[FoldedIPAs]]:
    """`fold_ipas` for the IPAs of many blocks at once, split into one `FoldedIPAs` per block (for
    `block_internal_prompts([hook], ..., folded)`; None where a block has no batched IPA): used
    where each block reads its own prompt (EVA02), so a step folds its weights once, not block by
    block."""
    groups = [[ipa for _, ipa in _batched_ipas(hook)] for hook in hooks]
    sizes = [len(g) for g in groups if g]
    if not sizes:
        return [None] * len(hooks)
    folded = fold_ipas([ipa for g in groups for ipa in g])
    pieces = _Split.apply(sizes, *folded)                       # field by field, group by group
    per_group = iter([FoldedIPAs(*pieces[i::len(sizes)]) for i in range(len(sizes))])
    return [next(per_group) if g else None for g in groups]


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


def internal_prompts(ipas: Sequence[InternalPromptAdapter], p: torch.Tensor, hw: Grid,
                     folded: Optional[FoldedIPAs] = None, factored: bool = False
                     ) -> Union[torch.Tensor, List[kernels.LowRankExtra]]:
    """k IPAs that read the same prompt P, computed together: (k, B, N, C), equal (up to
    rounding) to `torch.stack([ipa(p, hw) for ipa in ipas])`. With `factored` (and the
    projections) the last step is left undone: k `kernels.LowRankExtra` factors (h_i, W_i, b_i)
    of gelu(h_i W_i + b_i), which the fused adapter's kernels compute as they add them (and in
    training make their gradients from).

    With n(P) the LayerNorm of P without affine, IPA_i's first SFT and down-projection are one
    affine map of n(P): down_i(n(P) * a_i + c_i) = n(P) @ (W_i * a_i)^T + (W_i c_i + b_i), where
    a_i = w_i * gamma_i, c_i = b_i * gamma_i + beta_i (LN affine (w_i, b_i), Eq. 14's gamma_i,
    beta_i). So: one LayerNorm of P, one matmul against the k stacked folded down-projections
    (C -> k * d3), SimAM on all k * d3 channels at once (it is per channel, Eq. 11-12), one GELU,
    one batched matmul for the k up-projections with the second SFT (z * gamma' + beta') folded
    in, one GELU. Without projections (Fig. 4(f)) the k SFTs give a (k, B, N, C) stack that
    SimAM treats as k*B samples. All IPAs must share one configuration. `folded`: the IPAs'
    `fold_ipas`, if already computed.
    """
    first = ipas[0]
    k, (B, N, C) = len(ipas), p.shape
    in_w, in_b, out_w, out_b = fold_ipas(ipas) if folded is None else folded
    n = F.layer_norm(p, (C,), eps=first.sft_in.norm.eps)                              # (B, N, C)
    if isinstance(first.down, nn.Linear):
        d3 = in_w.shape[1]
        h = F.linear(n, in_w.reshape(k * d3, C), in_b.reshape(k * d3))                # (B, N, k*d3)
        if first.simam is not None:
            h = map_to_tokens(first.simam(tokens_to_map(h, hw)))
        h = F.gelu(h).view(B * N, k, d3).transpose(0, 1)                              # (k, BN, d3)
        if factored:                        # (one operator each for the k factors' gradients)
            return [kernels.LowRankExtra(*f) for f in zip(
                _Unstack.apply(h), _Unstack.apply(out_w), _Unstack.apply(out_b.view(k, C)))]
        return _UpGelu.apply(out_b, h, out_w).view(k, B, N, C)
    e = torch.addcmul(in_b[:, None, None, :], n, in_w[:, None, None, :])             # (k, B, N, C)
    if first.simam is not None:
        e = map_to_tokens(first.simam(tokens_to_map(e.view(k * B, N, C), hw))).view(k, B, N, C)
    e = F.gelu(e).view(k, B * N, C)
    return F.gelu(torch.addcmul(out_b, e, out_w)).view(k, B, N, C)


def adapt_fast(hook: nn.Module, pos: int, z_in: torch.Tensor, z_out: torch.Tensor,
               prompt: Optional[torch.Tensor], hw: Grid, p_internal: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A block hook on the fast path: `BlockAdapters.fast` with the precomputed IPA output, any
    other module through its usual call `hook(pos, z_in, z_out, prompt, hw)`."""
    if isinstance(hook, BlockAdapters):
        return hook.fast(pos, z_in, z_out, prompt, hw, p_internal)
    return hook(pos, z_in, z_out, prompt, hw)


def _batched_ipas(hook: Optional[nn.Module]) -> List[Tuple[int, InternalPromptAdapter]]:
    """(position, IPA) of a block hook's IPAs that `internal_prompts` batches: those of
    `BlockAdapters` without `ipa_deep` (whose IPAs form a chain)."""
    if not isinstance(hook, BlockAdapters) or hook.cfg.ipa_deep:
        return []
    return [(pos, ipa) for pos, ipa in enumerate((hook.ipa1, hook.ipa2)) if ipa is not None]


def block_internal_prompts(adapters: Sequence[Optional[nn.Module]], p: Optional[torch.Tensor],
                           hw: Grid, folded: Optional[FoldedIPAs] = None
                           ) -> List[List[Optional[torch.Tensor]]]:
    """IPA1(P), IPA2(P) of every block in `adapters` (their `block.adapters` hooks), all read
    from the same external prompt P and computed together by `internal_prompts`; `folded`: their
    weights already folded (`fold_block_ipas`).

    Returns per block [IPA1 output or None, IPA2 output or None], each (B, N, C), or, where
    every IPA's output goes to a Hybrid Adapter that runs as fused kernels
    (`BlockAdapters.fused_kernels`), as the `kernels.LowRankExtra` factors those kernels take.
    Hooks that are not `BlockAdapters`, absent IPAs and `ipa_deep` (whose IPAs form a chain)
    give None.
    """
    out: List[List[Optional[torch.Tensor]]] = [[None, None] for _ in adapters]
    slots = [(j, pos, ipa) for j, hook in enumerate(adapters) for pos, ipa in _batched_ipas(hook)]
    if slots:
        factored = all(adapters[j].fused_kernels(pos, p) is not None for j, pos, _ in slots)
        stacked = internal_prompts([ipa for _, _, ipa in slots], p, hw, folded, factored)
        for (j, pos, _), p_internal in zip(slots, stacked if isinstance(stacked, list)
                                           else _Unstack.apply(stacked)):  # (k, B, N, C)
            out[j][pos] = p_internal
    return out


class EMPG(nn.Module):
    """External Modal Prompt Generator (Eq. 7-13), hidden width d1.

    Zv, Zi: (B, N, C0) visible and infrared patch tokens. One LayerNorm, shared by both streams,
    then s1, s2 (1x1 conv C0 -> d1), HO on the visible stream (Eq. 10), SimAM on the infrared stream
    (Eq. 11), and s3 (1x1 conv d1 -> C0) on their sum (Eq. 13). Parameters: EMPG(192) = 4,996
    plus the shared LayerNorm's 2*C0. `use_visible=False` is Fig. 4(g) (P_E from infrared alone).
    """

    def __init__(self, dim: int, hidden: int = 8, use_simam: bool = True, use_visible: bool = True,
                 lam: float = 1e-4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)                                  # shared by both streams
        self.s1 = nn.Linear(dim, hidden) if use_visible else None       # Eq. 8
        self.ho = HybridOperation(hidden) if use_visible else None      # Eq. 10
        self.s2 = nn.Linear(dim, hidden)                                # Eq. 9
        self.simam = SimAM(lam) if use_simam else None                  # Eq. 11
        self.s3 = nn.Linear(hidden, dim)                                # Eq. 13
        for p in self.parameters():                     # spec sec. 1: xavier on every weight
            if p.dim() > 1:                             # with dim > 1; biases, BN, LN as default
                nn.init.xavier_uniform_(p)

    def forward(self, zv: torch.Tensor, zi: torch.Tensor, hw: Grid) -> torch.Tensor:
        """-> P_E: (B, N, C0)."""
        mi = self.s2(self.norm(zi))                                     # (B, N, d1)
        if self.simam is not None:
            mi = map_to_tokens(self.simam(tokens_to_map(mi, hw)))
        if self.s1 is None:
            return self.s3(mi)
        mv = self.ho(self.s1(self.norm(zv)), hw)                        # (B, N, d1)
        return self.s3(mv + mi)


class BlockAdapters(nn.Module):
    """HA1, IPA1 (after attention) and HA2, IPA2 (after the MLP) of one block: four separate modules.

    Sequential form (Eq. 5-6), for the sub-layer at `pos` (0 attention, 1 MLP):
        z = z_in + sublayer(z_in);  z = HA(z);  z = z + IPA(P)
    Parallel form (Fig. 4(a)):
        z = z_in + sublayer(z_in) + psi(z_in) + IPA(P)
    """

    def __init__(self, dim: int, cfg: IVTConfig):
        super().__init__()
        self.cfg = cfg
        ha = lambda: HybridAdapter(dim, cfg.d2, cfg.dropout, cfg.zero_init_up)  # noqa: E731
        ipa = lambda: InternalPromptAdapter(dim, cfg.d3, cfg.use_simam,  # noqa: E731
                                            cfg.ipa_projection, cfg.lam, cfg.zero_init_up)
        on = cfg.positions
        self.ha1 = ha() if cfg.has_ha and 0 in on else None
        self.ipa1 = ipa() if cfg.has_ipa and 0 in on else None
        self.ha2 = ha() if cfg.has_ha and 1 in on else None
        self.ipa2 = ipa() if cfg.has_ipa and 1 in on else None

    def forward(self, pos: int, z_in: torch.Tensor, z_out: torch.Tensor, prompt: torch.Tensor,
                hw: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adapt one sub-layer's result.

        z_in: (B, N, C) the sub-layer's input; z_out = z_in + sublayer(z_in), (B, N, C);
        prompt: (B, N, C) this block's external prompt. Returns (z, prompt for the next IPA): the
        prompt is unchanged, except for `ipa_deep` (Fig. 4(e)) where it becomes this IPA's output.
        """
        ha, ipa = (self.ha1, self.ipa1) if pos == 0 else (self.ha2, self.ipa2)
        z = z_out
        if ha is not None:
            z = z + ha.branch(z_in if self.cfg.parallel else z_out, hw)
        if ipa is not None:
            p_internal = ipa(prompt, hw)
            z = z + p_internal                                          # Eq. 6
            if self.cfg.ipa_deep:
                prompt = p_internal
        return z, prompt

    def fused_kernels(self, pos: int, x: torch.Tensor) -> Optional[str]:
        """Which fused kernels `fast` runs the Hybrid Adapter at `pos` as, for tokens on x's
        device: "eval" (`kernels.hybrid_adapter_eval`: adapters in eval mode, no autograd),
        "train" (`HybridAdapter.fused_train`: in training mode, BatchNorm on batch statistics
        with a momentum, where Triton runs) or None (the PyTorch `fast_branch`)."""
        ha = self.ha1 if pos == 0 else self.ha2
        if ha is None or not self.cfg.fused_adapters:
            return None
        if not torch.is_grad_enabled() and all(not a.training for a in (self.ha1, self.ha2)
                                               if a is not None):
            return "eval"
        bn = ha.ho.bn
        if ha.training and bn.training and bn.momentum is not None and kernels.use_triton(x):
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
        """`fast` at inference where `fuses_norms`: z = z_out + HA branch(z_out) + IPA output in
        one `kernels.hybrid_adapter_eval` call, which, given the LayerNorm `norm` that the next
        sub-layer applies to z, also returns norm(z), made while the kernel holds z, in the dtype
        the next Linear computes in (autocast's, else z's). -> (z, norm(z) or None).
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
                                             ha.kernel_weights(), next_norm,
                                             patches if lead else None)
        z, zn = result if next_norm is not None else (result, None)
        if not lead:
            return z, zn
        if normed is not None:
            normed[:, :lead] = norm(z_out[:, :lead])
        return z_out, normed

    def fast(self, pos: int, z_in: torch.Tensor, z_out: torch.Tensor, prompt: torch.Tensor,
             hw: Grid, p_internal: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """`forward` with HA's `fast_branch` and, unless `ipa_deep`, this position's IPA output
        `p_internal` (B, N, C) already computed by `internal_prompts` for all IPAs that read
        `prompt` (for the fused kernels, as their `kernels.LowRankExtra` factors). With
        `ipa_deep` the IPA chain is sequential and runs here, as in `forward`.
        With `fused_adapters` the HA, both residual adds and the internal prompt are one call
        (`fused_kernels`): `kernels.hybrid_adapter_eval` at inference, and in training, where
        Triton runs, `HybridAdapter.fused_train`."""
        ha, ipa = (self.ha1, self.ipa1) if pos == 0 else (self.ha2, self.ipa2)
        if ipa is not None and self.cfg.ipa_deep:
            p_internal = internal_prompts([ipa], prompt, hw)[0]
            prompt = p_internal
        z = z_out
        x = z_in if self.cfg.parallel else z_out
        fused = self.fused_kernels(pos, x)
        if fused == "eval":
            return kernels.hybrid_adapter_eval(x, z, p_internal, hw, ha.kernel_weights()), prompt
        if fused == "train":
            return ha.fused_train(x, z, p_internal, hw), prompt
        if isinstance(p_internal, kernels.LowRankExtra):        # factors, but no fused kernel
            p_internal = p_internal.dense(z.shape)
        if ha is not None:
            z = z + ha.fast_branch(x, hw)
        if p_internal is not None:
            z = z + p_internal                                          # Eq. 6
        return z, prompt
