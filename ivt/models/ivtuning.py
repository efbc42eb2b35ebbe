"""The IV-tuning modules (paper Sec. 3), backbone-agnostic, in the paper's order.

Every module works in token layout: tokens `z` are (B, N, C) with an explicit grid `hw = (H, W)`,
N = H*W, ordered row-major (h, w). Where a module needs a map, `tokens_to_map` views the tokens as
a channels-last (B, C, H, W) tensor without copying, so the 1x1 convolutions are plain Linear
layers and only the depthwise convolution and SimAM look at the grid.

  IVTConfig              the widths d1, d2, d3 and the variants of Sec. 4.6 (Tab. 5-6, Fig. 4)
  SimAM                  parameter-free attention (Eq. 11-12)
  HybridOperation  HO    partial depthwise conv + point-wise convs (Fig. 3, Eq. 10)
  SFT                    LN(z) * gamma + beta (Eq. 14), or z * gamma + beta without LN
  HybridAdapter    HA    z + up(dropout(gelu(HO(down(SFT(z)))))) (Eq. 5, 15)
  InternalPromptAdapter  gelu(SFT'(up(gelu(simam(down(SFT(P))))))) on the external prompt (Sec. 3.4)
  EMPG                   external modal prompt generator (Eq. 7-13)
  BlockAdapters          the four modules of one transformer block and their wiring (Eq. 5-6)

This is the reference: plain PyTorch, one forward per module. `ivt.fast` gives a built model
faster forwards of the same modules (same parameters, equal results).
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """Hyperparameters of IV-tuning. `variant` selects one of the ablations of Sec. 4.6."""
    d1: int = 8                 # EMPG hidden width
    d2: int = 64                # Hybrid Adapter hidden width
    d3: int = 8                 # Internal Prompt Adapter hidden width
    variant: str = "ivt"
    layers: Optional[Sequence[int]] = None   # 0-based block indices with adapters; None = all
    dropout: float = 0.1        # inside the Hybrid Adapter
    lam: float = 1e-4           # SimAM's lambda (Eq. 12)
    zero_init_up: bool = False  # extra (not the paper): zero-init HA/IPA up-projections

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown IV-tuning variant {self.variant!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        for name in ("d1", "d2", "d3"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive width, got {getattr(self, name)}")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
            if self.layers and self.layers[0] < 0:
                raise ValueError(f"layers={self.layers}: block indices count from 0")

    # What each variant changes: Tab. 5 (a), (c), Tab. 6, Fig. 4.
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
    def use_simam(self) -> bool:      # Tab. 6, wo-simAM
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


class SimAM(nn.Module):
    """SimAM (Eq. 11-12) on a (B, C, H, W) map, per sample and channel.

    With mu = mean_hw(x), d = (x - mu)^2, v = sum_hw(d) / n, n = H*W - 1: e = d / (4 (v + lam))
    + 0.5, which is 1 / e* of Eq. 12, and out = x * sigmoid(e) (Eq. 11). For H*W == 1, n is taken
    as 1, so d = v = 0 and the output is x * sigmoid(0.5) instead of NaN.
    """

    def __init__(self, lam: float = 1e-4):
        super().__init__()
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / n
        e = d / (4 * (v + self.lam)) + 0.5
        return x * torch.sigmoid(e)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class HybridOperation(nn.Module):
    """HO(c), g_h of Eq. 10 (Fig. 3), in token layout. Parameters: 10*cp + 2*c*c + 4*c, cp = c // 4.

    1. y = x + concat(dwconv3x3(x[:, :cp]), x[:, cp:])   partial depthwise conv, residual (the
       C - cp untouched channels come out doubled)
    2. out = y + pw2(relu(bn(pw1(y))))                    1x1 convs as Linear layers
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
        x, cp = tokens_to_map(z, hw), self.cp                            # (B, c, H, W)
        y = map_to_tokens(x + torch.cat([self.dwconv(x[:, :cp]), x[:, cp:]], dim=1))
        h = self.bn(self.pw1(y).flatten(0, 1)).view_as(y)              # BN over all B*N tokens
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
    """An adapter's Linear: trunc-normal std 0.02 and zero bias (the paper states no init; this
    is timm's for Linear layers), or all zeros with `zero`."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


class HybridAdapter(nn.Module):
    """HA (Eq. 5, 15): z + psi(z), psi(z) = up(dropout(gelu(HO(down(SFT(z)))))), hidden width d2."""

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
        return z + self.branch(z, hw)                                  # Eq. 5


class InternalPromptAdapter(nn.Module):
    """IPA (Sec. 3.4) on the external prompt P: gelu(SFT'(up(gelu(simam(down(SFT(P))))))).

    SFT' has no LayerNorm. No residual: the output P_I is added to the block stream (Eq. 6).
    `projection=False` is Fig. 4(f): no down/up, SimAM runs on all C channels.
    `use_simam=False` is the wo-simAM ablation (Tab. 6).
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
        h = self.down(self.sft_in(p))                   # (B, N, d3); (B, N, C) without projection
        if self.simam is not None:
            h = map_to_tokens(self.simam(tokens_to_map(h, hw)))
        return F.gelu(self.sft_out(self.up(F.gelu(h))))


class EMPG(nn.Module):
    """External Modal Prompt Generator (Eq. 7-13), hidden width d1.

    Zv, Zi: (B, N, C0) visible and infrared patch tokens. One LayerNorm, shared by both streams,
    then s1, s2 (1x1 conv C0 -> d1, Eq. 8-9), HO on the visible stream (Eq. 10), SimAM on the
    infrared stream (Eq. 11-12), and s3 (1x1 conv d1 -> C0) on their sum (Eq. 13). Parameters:
    EMPG(192) = 4,996 plus the shared LayerNorm's 2*C0. `use_visible=False` is Fig. 4(g) (P_E
    from infrared alone).
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
        # The paper states no init: xavier-uniform on every weight with dim > 1; biases, BN and
        # LayerNorm at PyTorch's defaults.
        for p in self.parameters():
            if p.dim() > 1:
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
    """HA1, IPA1 (after attention) and HA2, IPA2 (after the MLP) of one block: four separate
    modules (Sec. 3.1).

    Sequential form (Eq. 5-6), for the sub-layer at `pos` (0 attention, 1 MLP):
        z = z_in + sublayer(z_in);  z = HA(z);  z = z + IPA(P)
    Parallel form (Fig. 4(a)):
        z = z_in + sublayer(z_in) + psi(z_in) + IPA(P)
    The block stream z keeps its dtype: under autocast IPA(P) is float32 (SFT' scales and
    shifts by float32 parameters) and is added in z's dtype, as the frozen sub-layers' results
    (autocast's) are, so the adapters never widen the stream the frozen model runs on.
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
        That chain runs through all blocks of a ViT; a Swin starts it again from each stage's
        external prompt, as the width changes between stages.
        """
        ha, ipa = (self.ha1, self.ipa1) if pos == 0 else (self.ha2, self.ipa2)
        z = z_out
        if ha is not None:
            z = z + ha.branch(z_in if self.cfg.parallel else z_out, hw)   # Eq. 5
        if ipa is not None:
            p_internal = ipa(prompt, hw)
            z = z + p_internal.to(z.dtype)                              # Eq. 6
            if self.cfg.ipa_deep:
                prompt = p_internal
        return z, prompt
