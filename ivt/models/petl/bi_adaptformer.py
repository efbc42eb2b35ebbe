"""Bi-AdaptFormer (Jie et al., "Binary Adapters", ICCV 2023): AdaptFormer with 1-bit weights.

Binary Adapters' AdaptFormer (its release's `adaptformer.py`): no biases, ReLU, dropout 0.1,
hidden width r = 32, in parallel with the MLP and scaled by s (release default 1):
    x_l = x'_l + MLP(LN(x'_l)) + s * Q(W_up) ReLU(Q(W_down) x'_l)
Q binarises a weight matrix in the forward pass (the paper's quantiser at 1 bit): standardise,
w^ = (w - mean) / (std + 1e-5); take sign(w^) * c with c = Phi^-1(3/4) = 0.6745, the 1-bit
code of a standard normal whose two levels split its mass in halves; de-standardise,
Q(w) = sign(w^) c std + mean. The backward pass is the straight-through estimator: the gradient
of sign(w^) c is taken as that of w^. W_up starts at trunc-normal(std 1e-3, +-2e-3) (all-zero
weights binarise to zero), W_down at nn.Linear's default.

Counting (Table 4's 1.16M): every 1-bit weight counts as one parameter, 2 C r per block (Swin-L,
r = 32: 1,155,072; with the IR patch embedding 1,164,864). Binary Adapters itself reports the
storage, not a reduced count: each weight costs 1 bit plus two fp32 numbers (mean, std) per matrix.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adaptformer import AdaptFormer

CODE = 0.6744897501960817          # Phi^-1(3/4): the 1-bit levels +-CODE of a standard normal


def binarize(w: torch.Tensor) -> torch.Tensor:
    """Q(w): (out, in) -> (out, in) with two values per matrix; straight-through gradient."""
    mean, std = w.mean(), w.std()
    w_hat = (w - mean) / (std + 1e-5)
    wb = (torch.sign(w_hat) * CODE).detach() + w_hat - w_hat.detach()
    return wb * std + mean


class BinaryLinear(nn.Linear):
    """Linear without bias whose weight is binarised by `binarize` in every forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, binarize(self.weight))


class BiAdaptFormer(AdaptFormer):
    """One block's Bi-AdaptFormer: AdaptFormer's hook and wiring with binarised, bias-free
    projections (Eq. 3 of AdaptFormer with Q(W) in place of W)."""

    def __init__(self, dim: int, bottleneck: int = 32, scale: float = 1.0, dropout: float = 0.1):
        nn.Module.__init__(self)
        self.scale = scale
        self.down = BinaryLinear(dim, bottleneck)
        self.drop = nn.Dropout(dropout)
        self.up = BinaryLinear(bottleneck, dim)
        nn.init.trunc_normal_(self.up.weight, std=0.001, a=-0.002, b=0.002)
