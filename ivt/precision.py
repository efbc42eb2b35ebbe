"""Frozen matmul weights stored in the autocast dtype: the same results, less work and memory.

Under bf16 autocast, a Linear or convolution casts its float32 weight and bias to bfloat16 before
it multiplies. For a weight that trains, autocast keeps that copy for the rest of the forward pass
(its cast cache holds leaf tensors that require grad); for a frozen weight it does not, so every
call casts again: a read of 4 bytes and a write of 2 per weight every forward pass, once more
where `memory="recompute"` or a checkpoint reruns the frozen sub-layers in backward, and the
bfloat16 copy is what autograd keeps for the input gradient (dx = dy W). On Swin-L (196 M frozen
weights in IV-tuning) that is about 1.2 GB of traffic and 0.4 GB of held copies a training step.

`store_frozen_weights(model, torch.bfloat16)` casts, once, the weight and bias of every Linear and
convolution whose parameters are all frozen. Autocast then finds them already in its dtype and
casts nothing; the cast it would have made rounds the same way (round to nearest even), so every
output and gradient is bit for bit the one the float32 weights give under autocast
(`tests/test_precision.py`). The frozen float32 weights, 0.78 GB on Swin-L, are not kept: only the
trainable parameters need float32 masters, for the optimizer.

The price: the model then runs only under autocast with that dtype (outside it, a float32 input
meets a bfloat16 weight and the Linear raises). The train scripts call it with `--amp` (bf16
autocast for training and evaluation); `full` fine-tuning has no frozen weight and is unchanged.
Normalisation layers, position tables and every trainable parameter stay float32, as autocast
computes with them in float32.
"""
import torch
from torch import nn

# The layers autocast runs in its lower precision, on CUDA and on the CPU (torch.amp autocast op
# lists: linear and the convolutions).
MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the parameters of every frozen Linear/convolution of `model` to `dtype` in place
    (see the module docstring); returns how many parameter values were cast."""
    cast = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if (isinstance(module, MATMUL_LAYERS) and params
                and not any(p.requires_grad for p in params)):
            for p in params:
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    cast += p.numel()
    return cast
