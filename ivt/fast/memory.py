"""Memory for compute on the fast path: whole blocks checkpointed, frozen sub-layers recomputed,
and a BatchNorm that a checkpoint's recomputation does not update a second time.

`checkpointed(fn, *args)` keeps only fn's inputs and reruns fn in backward (`memory="checkpoint"`
or "checkpoint:N"); `recomputed(sublayer, x)` does the same for one frozen sub-layer, LayerNorm +
attention or LayerNorm + MLP up to its last Linear (`memory="recompute"`), whose recomputation
needs no RNG state: it has no dropout. A frozen Linear keeps nothing for backward (dx = dy W), so
ending the recomputed part before it leaves nothing of the sub-layer held.
"""
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


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


def recomputing() -> bool:
    """Whether the code running now is a checkpoint's recomputation (in backward)."""
    return _Recomputation.active


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
    """sublayer(x) for a frozen sub-layer of the backbone, keeping only its input x (B, N, C) for
    backward when `enabled` and grad is on: its intermediates (the LayerNorm's statistics, q, k,
    v and the attention output, or the MLP's hidden layer) are recomputed in backward, one more
    forward of a few operators, while the adapters keep their own activations."""
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
