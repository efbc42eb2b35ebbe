"""The independent infrared patch embedding of the compared methods (paper Sec. 4.5).

"We insert an independent infrared patch embedding layer in PVMs and add the infrared tokens to
the visible tokens": Z0 = PE_vis(vis) + PE_ir(ir). PE_ir has the visible embedding's architecture
(Swin: conv k = s = 4 and LayerNorm, 9,792 parameters at C = 192; the ViTs: conv k = s = 16) and is
freshly initialised and trainable, exactly like IV-tuning's own IR patch embedding (Sec. 3.1).
"""
import copy

import torch.nn as nn


def independent_ir_embed(patch_embed: nn.Module) -> nn.Module:
    """A copy of the visible patch embedding's architecture with fresh default-initialised
    weights (PyTorch's `reset_parameters`: the init a newly built embedding gets)."""
    ir = copy.deepcopy(patch_embed)
    for m in ir.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return ir
