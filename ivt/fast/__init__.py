"""The speed-ups, applied to a built model: `make_fast(model, impl, memory)`.

impl   "reference"  the readable paper path (`ivt.models.ivtuning`, one forward per module)
       "fast"       the same modules with faster forwards: the IPAs that read one prompt computed
                    together (`prompts.py`), SFT folded into its LayerNorm, SimAM and the partial
                    conv through `kernels` (Triton where it runs) (`adapters.py`), and the
                    backbones' blocks that use them (`swin.py`, `vit.py` for EVA02, DINOv2
                    and MAE, with EVA02's rotary attention in `eva02.py`)
       "fused"      fast, with every Hybrid Adapter, its residual and its internal prompt as the
                    Triton kernels of `kernels.hybrid_adapter` where Triton runs
memory "keep"             every activation kept for backward
       "recompute"        the frozen attention and MLP sub-layers keep only their inputs and are
                          recomputed in backward (`memory.recomputed`)
       "checkpoint"       every block keeps only its inputs and is recomputed in backward
       "checkpoint:N"     the first N blocks, in forward order (`memory.checkpointed`)
       "checkpoint:N+recompute"  that, and the other blocks recompute their frozen sub-layers

`make_fast` switches the classes of the model's modules to the subclasses defined here, which
override `forward` only: parameters, buffers, state dict and `named_modules` stay as they are, and
the outputs and gradients equal the reference path's (tests/test_fast_path.py). Full fine-tuning
and the frozen model ("full", "freeze") take the backbones' fast forwards too, where one differs
from the reference without adapters: EVA02's rotary attention (`eva02.py`), so that IV-tuning's
speed-ups are measured against full fine-tuning's own best. The PETL methods, whose modules may
act inside the attention, keep the reference forward.
"""
import math
from typing import Dict, Tuple

import torch.nn as nn

from ..models.backbone import IVTBackbone
from ..models.dinov2 import DINOv2Backbone
from ..models.eva02 import EVA02Backbone
from ..models.ivtuning import BlockAdapters, HybridAdapter, HybridOperation, SimAM
from ..models.mae import MAEBackbone
from ..models.swin import SwinBlock, SwinStage
from ..models.vit import ViTBackbone, ViTBlock
from .adapters import FastBlockAdapters, FastHybridAdapter, FastHybridOperation, FastSimAM
from .swin import FastSwinBlock, FastSwinStage
from .vit import (FastDINOv2Backbone, FastEVA02Backbone, FastMAEBackbone, FastViTBackbone,
                  FastViTBlock)

__all__ = ["make_fast", "parse_memory", "IMPLS", "MEMORY"]

IMPLS = ("reference", "fast", "fused")
FAST_TUNINGS = ("ivt", "full", "freeze")          # those `make_fast` gives the fast forwards
MEMORY = ("keep", "recompute", "checkpoint", "checkpoint:N", "checkpoint:N+recompute")

# reference class -> the class its modules take on the fast path
FAST: Dict[type, type] = {
    SimAM: FastSimAM, HybridOperation: FastHybridOperation, HybridAdapter: FastHybridAdapter,
    BlockAdapters: FastBlockAdapters, SwinStage: FastSwinStage, SwinBlock: FastSwinBlock,
    ViTBlock: FastViTBlock, ViTBackbone: FastViTBackbone, EVA02Backbone: FastEVA02Backbone,
    DINOv2Backbone: FastDINOv2Backbone, MAEBackbone: FastMAEBackbone}


def parse_memory(memory: str) -> Tuple[float, bool]:
    """`memory` -> (how many blocks, counted from the input, are checkpointed (math.inf: all),
    whether the others recompute their frozen sub-layers)."""
    text, recompute = memory, memory == "recompute"
    if memory.endswith("+recompute") and memory.startswith("checkpoint:"):
        text, recompute = memory[:-len("+recompute")], True
    if text in ("keep", "recompute"):
        return 0, recompute
    if text == "checkpoint":
        return math.inf, recompute
    count = text[len("checkpoint:"):] if text.startswith("checkpoint:") else ""
    if count.isdigit() and int(count) >= 1:
        return int(count), recompute
    raise ValueError(f"memory={memory!r}: expected one of {', '.join(MEMORY)}, N a number of "
                     f"blocks >= 1")


def _backbone(model: nn.Module) -> IVTBackbone:
    found = [m for m in model.modules() if isinstance(m, IVTBackbone)]
    if len(found) != 1:
        raise ValueError(f"make_fast needs a model with one IV-tuning backbone, found {len(found)}")
    return found[0]


def make_fast(model: nn.Module, impl: str = "fast", memory: str = "keep") -> nn.Module:
    """Give `model` (a backbone, or a task model holding one) the forwards of `impl` with the
    memory option `memory` (see the module docstring), in place; returns the model.

    memory other than "keep" needs impl "fast" or "fused" and tuning "ivt" (ValueError); the
    PETL tunings are left as they are."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
    checkpoint, recompute = parse_memory(memory)
    backbone = _backbone(model)
    if memory != "keep" and (impl == "reference" or backbone.tuning != "ivt"):
        raise ValueError(f"memory={memory!r} needs impl 'fast' or 'fused' and tuning 'ivt' "
                         f"(got impl={impl!r}, tuning={backbone.tuning!r})")
    if backbone.tuning not in FAST_TUNINGS:
        return model                                  # a PETL method's modules: as built
    for module in model.modules():
        base = next((c for c in type(module).__mro__ if c in FAST), None)
        if base is not None:
            module.__class__ = base if impl == "reference" else FAST[base]
            module.__dict__.pop("checkpoint", None)
            module.__dict__.pop("recompute", None)
            module.__dict__.pop("fused", None)
    blocks = [block for stage in backbone.block_stages() for block in stage]
    for index, block in enumerate(blocks if impl != "reference" else []):
        block.checkpoint, block.recompute = index < checkpoint, recompute
        if isinstance(block.adapters, FastBlockAdapters):
            block.adapters.fused = impl == "fused"
    return model
