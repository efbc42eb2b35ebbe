"""Triton kernels for IV-tuning's memory-bound operations, with PyTorch references.

`simam`, `partial_conv_residual` and `hybrid_adapter_eval` (a whole Hybrid Adapter at inference,
`ivt.fast.make_fast(model, "fused")`) pick an implementation per call; `hybrid_adapter_train`
(the same in training, forward and backward) is Triton only, and its callers check `use_triton`.
* `IVT_KERNELS=torch` forces the PyTorch references (`kernels/reference.py`);
* `IVT_KERNELS=triton` forces Triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 with
  Triton >= 3.5, `INTERPRETER_MIN_TRITON`);
* unset (`auto`): Triton for CUDA tensors when Triton imports, the reference otherwise;
* an empty tensor always takes the reference (no launch to make), and so does, under `auto`, one
  of 2**31 elements or more (`INDEX_LIMIT`: the kernels address with 32-bit offsets); `triton`
  refuses it.
Triton is optional: the kernel files are imported only when it is installed and imports. The
scripts' `--kernels {auto,torch,triton}` calls `set_backend`, and refuses before any work a forced
backend that cannot run on the device (`check_backend`). Layout and design: docs/kernels.md.
"""
import importlib.util
import os
import warnings
from typing import Optional, Tuple

import torch

from .reference import (HybridAdapterWeights, LowRankExtra, NextNorm,
                        hybrid_adapter_eval_reference, hybrid_adapter_train_reference,
                        partial_conv_residual_reference, simam_reference)

# Whether Triton is installed and imports (one that is installed but does not import, e.g. built
# for another torch or CUDA, is warned about once and the references are used).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_IMPORT_ERROR = ""
if TRITON_INSTALLED:
    try:
        # Imported before `simam` below is defined: the function, not the submodule of the same
        # name, is what `kernels.simam` means.
        from .hybrid_adapter import hybrid_adapter_eval_triton, hybrid_adapter_train_triton
        from .partial_conv import partial_conv_residual_triton
        from .simam import simam_triton
    except Exception as error:         # ImportError, or whatever a broken build raises
        TRITON_INSTALLED, TRITON_IMPORT_ERROR = False, f"{type(error).__name__}: {error}"
        warnings.warn(f"Triton is installed but does not import ({TRITON_IMPORT_ERROR}): "
                      "the kernels' PyTorch references run instead", stacklevel=2)

__all__ = ["simam", "partial_conv_residual", "hybrid_adapter_eval", "hybrid_adapter_train",
           "HybridAdapterWeights", "LowRankExtra", "NextNorm", "backend", "set_backend", "BACKENDS",
           "use_triton", "check_backend",
           "simam_reference", "partial_conv_residual_reference", "hybrid_adapter_eval_reference",
           "hybrid_adapter_train_reference"]

BACKENDS = ("auto", "torch", "triton")
INDEX_LIMIT = 2 ** 31           # the kernels' offsets are 32-bit: tensors must have fewer elements


def backend() -> str:
    """The requested backend: 'auto', 'torch' or 'triton' (from IVT_KERNELS)."""
    choice = os.environ.get("IVT_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"IVT_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    return choice


def set_backend(name: str) -> None:
    """Select the backend for this process (and its children): the `--kernels` flag's action."""
    if name not in BACKENDS:
        raise ValueError(f"kernels backend {name!r}: expected one of {', '.join(BACKENDS)}")
    os.environ["IVT_KERNELS"] = name


def triton_interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks Triton to run kernels on the CPU, as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when this package is imported:
# the kernels are interpreted (CPU tensors) or compiled (CUDA tensors) from then on.
KERNELS_INTERPRETED = TRITON_INSTALLED and triton_interpreter_on()


# The first Triton whose CPU interpreter runs these kernels: 3.0 and 3.1 leave CPU tensors
# unwritten, 3.2 to 3.4 have no float64 `tl.dot` (the precision the tests compare in).
INTERPRETER_MIN_TRITON = (3, 5)
INTERPRETER_NEEDS = "TRITON_INTERPRET=1 and Triton >= {}.{}".format(*INTERPRETER_MIN_TRITON)


def triton_missing() -> str:
    """Why the Triton kernels cannot run here (when TRITON_INSTALLED is False)."""
    if TRITON_IMPORT_ERROR:
        return f"Triton does not import ({TRITON_IMPORT_ERROR})"
    return "Triton is not installed (pip install triton)"


def triton_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the installed Triton, None without one."""
    if not TRITON_INSTALLED:
        return None
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def interpreter_ready() -> bool:
    """Whether the kernels run on CPU tensors here: TRITON_INTERPRET=1 when `kernels` was
    imported, with a Triton whose interpreter runs them (INTERPRETER_MIN_TRITON)."""
    return (TRITON_INSTALLED and KERNELS_INTERPRETED
            and triton_version() >= INTERPRETER_MIN_TRITON)


def check_backend(device: torch.device) -> None:
    """ValueError naming `--kernels` when the backend asked for cannot run the kernels on
    `device`: the scripts check it before any work, `use_triton` at each call."""
    try:
        use_triton(torch.empty(1, device=device))
    except RuntimeError as error:
        raise ValueError(f"--kernels {backend()}: {error}") from None


def use_triton(x: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernels, by the rules in the module docstring."""
    choice = backend()
    if choice == "torch" or x.numel() == 0:         # nothing to launch for an empty tensor
        return False
    if x.numel() >= INDEX_LIMIT:
        if choice == "auto":
            return False
        raise RuntimeError(f"IVT_KERNELS=triton: a tensor of {x.numel()} elements is beyond the "
                           f"kernels' 32-bit offsets (fewer than 2**31); use IVT_KERNELS=auto "
                           f"(which takes the reference for it) or a smaller batch")
    if choice == "auto":
        return x.is_cuda and TRITON_INSTALLED
    if not TRITON_INSTALLED:
        raise RuntimeError(f"IVT_KERNELS=triton, but {triton_missing()}")
    if not x.is_cuda and not interpreter_ready():
        here = "{}.{}".format(*triton_version())
        raise RuntimeError(f"IVT_KERNELS=triton on a {x.device.type} tensor needs a CUDA tensor, "
                           f"or Triton's CPU interpreter: {INTERPRETER_NEEDS} (here Triton "
                           f"{here}), TRITON_INTERPRET set before `kernels` is imported")
    return True


def simam(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (Eq. 11-12) of a (B, C, H, W) map; see `kernels.reference.simam_reference`."""
    if use_triton(x):
        return simam_triton(x, lam)
    return simam_reference(x, lam)


def partial_conv_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          cp: int) -> torch.Tensor:
    """x + concat(dwconv3x3(x[:, :cp]), x[:, cp:]); see `kernels.reference`."""
    if use_triton(x):
        return partial_conv_residual_triton(x, weight, bias, cp)
    return partial_conv_residual_reference(x, weight, bias, cp)


def hybrid_adapter_eval(x: torch.Tensor, residual: torch.Tensor, extra, hw,
                        weights: HybridAdapterWeights, norm: Optional[NextNorm] = None,
                        out: Optional[torch.Tensor] = None):
    """residual + Hybrid Adapter branch(x) (+ extra) at inference, (B, N, C) tokens in
    residual's dtype (the block stream's), extra None, tokens or a `LowRankExtra`, and with
    `norm` the next sub-layer's LayerNorm of it too, into `out` (and `norm.out`) where given,
    which may be `residual` itself (each token is read before it is written); see
    `kernels.reference.hybrid_adapter_eval_reference` (two Triton launches on a GPU)."""
    if use_triton(x):
        return hybrid_adapter_eval_triton(x, residual, extra, hw, weights, norm, out)
    return hybrid_adapter_eval_reference(x, residual, extra, hw, weights, norm, out)


def hybrid_adapter_train(x: torch.Tensor, residual: torch.Tensor, extra, hw,
                         weights: HybridAdapterWeights, keep, p: float, momentum: float,
                         update: bool, batches: Optional[torch.Tensor] = None,
                         lead: int = 0) -> torch.Tensor:
    """The same in training mode, differentiable: Triton kernels only (callers check
    `use_triton`); see `kernels.hybrid_adapter` and `hybrid_adapter_train_reference`, which
    also says what `lead` does."""
    if not TRITON_INSTALLED:
        raise RuntimeError(f"the fused Hybrid Adapter's training kernels need Triton, but "
                           f"{triton_missing()}")
    return hybrid_adapter_train_triton(x, residual, extra, hw, weights, keep, p, momentum, update,
                                       batches, lead)
