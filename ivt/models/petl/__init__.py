"""The PETL methods IV-tuning is compared with (paper Sec. 4.5, Table 4), as tuning modes.

    vpt             deep visual prompts in every block (`vpt.py`)
    adaptformer     a scaled bottleneck in parallel with every MLP (`adaptformer.py`)
    bi_adaptformer  AdaptFormer with 1-bit weights (`bi_adaptformer.py`)
    rein            learnable tokens refining every block's output (`rein.py`)

Each also gets the independent infrared patch embedding of Sec. 4.5 ("we insert an independent
infrared patch embedding layer in PVMs and add the infrared tokens to the visible tokens"):
Z0 = PE_vis(vis) + PE_ir(ir) (`ir_embed.py`); `full` and `freeze` get it with `ir_embed=True`.

Every method plugs into what the families already provide: a block's `adapters` hook
`(pos, z_in, z_out, prompt, hw) -> (z, prompt)` (pos 0 after attention, 1 after the MLP; z_in is
the sub-layer's input, z_out = z_in + sublayer(z_in)) and, for VPT, a block's `prompts`
parameter whose normed tokens join the attention as extra keys and values (on the ViTs the hook
sees the patch tokens only; the cls and register tokens pass it unchanged). `attach` adds the
modules to a built visible model and returns the names (prefixes) of what it added; the backbone
trains exactly those (`IVTBackbone.apply_tuning`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.nn as nn

from .adaptformer import AdaptFormer
from .bi_adaptformer import BiAdaptFormer
from .ir_embed import independent_ir_embed
from .rein import Rein, ReinHook
from .vpt import init_prompts

METHODS = ("vpt", "adaptformer", "bi_adaptformer", "rein")
# The build options (PETLConfig fields) each method takes.
METHOD_OPTIONS = {"vpt": ("prompt_length",), "adaptformer": ("bottleneck", "scale"),
                  "bi_adaptformer": ("bottleneck", "scale"), "rein": ("rein_tokens", "rein_rank")}

# Defaults (Table 4 reproduction, see `python -m ivt.summary --methods`): each method's own
# paper/code default where one exists.
DEFAULT_BOTTLENECK = {"adaptformer": 64, "bi_adaptformer": 32}   # AdaptFormer; Binary Adapters
DEFAULT_SCALE = {"adaptformer": 0.1, "bi_adaptformer": 1.0}      # AdaptFormer's s; Bi- release's


@dataclass
class PETLConfig:
    """Hyperparameters of the compared methods; `method` None means only the IR embedding."""
    method: Optional[str] = None
    ir_embed: bool = True
    prompt_length: int = 10             # VPT: prompt tokens per block
    bottleneck: Optional[int] = None    # (Bi-)AdaptFormer hidden width; None: the method's default
    scale: Optional[float] = None       # (Bi-)AdaptFormer's s; None: the method's default
    dropout: float = 0.1                # inside the (Bi-)AdaptFormer bottleneck
    rein_tokens: int = 100              # Rein: m learnable tokens per block
    rein_rank: int = 16                 # Rein: rank r of the token factorisation T = A B

    def __post_init__(self):
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown PETL method {self.method!r}; expected one of "
                             f"{', '.join(METHODS)}")
        for name in ("prompt_length", "rein_tokens", "rein_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rein_tokens < 2:
            raise ValueError("rein_tokens must be at least 2 (Rein's first token only normalises)")
        if self.method in DEFAULT_BOTTLENECK:
            if self.bottleneck is None:
                self.bottleneck = DEFAULT_BOTTLENECK[self.method]
            if self.scale is None:
                self.scale = DEFAULT_SCALE[self.method]
            if self.bottleneck < 1:
                raise ValueError(f"bottleneck must be positive, got {self.bottleneck}")

    def describe(self) -> str:
        """The hyperparameters that matter for `method`, as one short string."""
        return {None: "",
                "vpt": f"prompt length {self.prompt_length}",
                "adaptformer": f"bottleneck {self.bottleneck}, s {self.scale}",
                "bi_adaptformer": f"bottleneck {self.bottleneck}, s {self.scale}, 1-bit",
                "rein": f"m {self.rein_tokens} tokens, rank {self.rein_rank}"}[self.method]


def attach(backbone: nn.Module, cfg: PETLConfig) -> List[str]:
    """Add `cfg.method`'s modules (and the IR patch embedding) to a built visible `backbone`.

    The backbone provides `patch_embed`, `block_stages()` (its blocks grouped by stage; one group
    for a plain ViT) and blocks with `norm1`, an `adapters` hook slot and a `prompts` slot.
    Returns the names of the added modules and parameters.
    """
    names = []
    if cfg.ir_embed:
        backbone.ir_patch_embed = independent_ir_embed(backbone.patch_embed)
        names.append("ir_patch_embed")
    if cfg.method is None:
        return names
    block_name: Dict[int, str] = {id(m): n for n, m in backbone.named_modules()}
    patch = backbone.patch_embed.patch
    stages = backbone.block_stages()
    if cfg.method == "rein":
        backbone.rein = nn.ModuleList(
            Rein(stage[0].norm1.normalized_shape[0], len(stage), cfg.rein_tokens, cfg.rein_rank)
            for stage in stages)
        for rein, stage in zip(backbone.rein, stages):
            for layer, block in enumerate(stage):
                block.adapters = ReinHook(rein, layer)
        return names + ["rein"]
    for stage in stages:
        for block in stage:
            dim = block.norm1.normalized_shape[0]
            if cfg.method == "vpt":
                block.prompts = init_prompts(cfg.prompt_length, dim, patch)
                names.append(block_name[id(block)] + ".prompts")
            else:
                cls = AdaptFormer if cfg.method == "adaptformer" else BiAdaptFormer
                block.adapters = cls(dim, cfg.bottleneck, cfg.scale, cfg.dropout)
                names.append(block_name[id(block)] + ".adapters")
    return names
