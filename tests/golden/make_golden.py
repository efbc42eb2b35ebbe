"""Make the timm golden fixtures of tests/test_timm_golden.py (run once; the outputs are committed).

timm is not a dependency of the project; this script runs in a throwaway environment (see
README.md beside it for the exact commands and versions). It builds a tiny Swin and a tiny EVA02
with timm, gives them seeded random weights (larger than timm's init, so that attention is far
from uniform and a wrong window, shift or padding shows in the outputs), runs them on seeded
non-square inputs, and writes:

    swin_tiny.safetensors, eva02_tiny.safetensors
        the weights, in timm's state-dict layout (final norm included; no classifier head)
    swin_tiny_io.safetensors, eva02_tiny_<H>x<W>_io.safetensors
        `input` (1, 3, H, W) and the expected outputs `out.<i>` (NCHW): Swin's stage i, EVA02's
        block i (patch tokens, before any final norm)

Each file's metadata records the timm and torch versions and the architecture.

Usage (from the repository root):  /tmp/timmenv/bin/python tests/golden/make_golden.py
"""
import json
import math
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Tiny Swin: window 3 (shift 1) divides none of the stage grids 16x20, 8x10, 4x5 (input 64x80,
# patch 4), so every block pads, and every second block shifts before it pads (the order that
# differs from mmseg's Swin). Two limits of timm shape the sizes: it fixes each stage's window
# at construction from floor(grid / 2^stage), so the grids are even before every patch merging
# (floor = ceil); and a grid no larger than the window would make timm build a smaller relative
# position table, so every grid is larger than the window.
SWIN = dict(img_size=(64, 80), patch_size=4, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4),
            window_size=3, mlp_ratio=4.0, drop_path_rate=0.0, num_classes=0)

# Tiny EVA02: the eva02_*_patch14_224 recipe (separate q/k/v, SwiGLU with its "subln" norm,
# 2-D rotary embedding with a 16 x 16 reference grid, LayerNorm eps 1e-6) at width 32, depth 3,
# patch 16, position embedding stored for 64 x 64 (a 4 x 4 grid). The inputs are non-square
# grids larger (5 x 7) and smaller (3 x 2) than the stored one: the position embedding is
# resized both ways and the rotary angles are scaled to the reference grid.
EVA = dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, qkv_fused=False,
           mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
           ref_feat_shape=(16, 16), dynamic_img_size=True, num_classes=0)
EVA_INPUTS = {"eva02_tiny_80x112": (80, 112), "eva02_tiny_48x32": (48, 32)}   # (H, W)
EVA_BLOCKS = [0, 1, 2]   # ivt's feature blocks for depth 3 are 0, 0, 1, 2


def import_timm():
    """Import timm on a CPU-only torch.

    timm imports torchvision at import time (for data transforms and FrozenBatchNorm2d, neither
    used by these models). PyPI's torchvision wheel for torch 2.13 is built against CUDA torch:
    on the CPU build its C++ operators fail to load and `import torchvision` then stops at
    registering a fake kernel for `torchvision::nms`. Declaring the two operator schemas that
    torchvision registers unconditionally lets its pure-Python part import.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_timm.lib = lib                      # keep the definitions alive
        import torchvision  # noqa: F401
    import timm
    return timm


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights: matrices N(0, 1/fan_in), vectors N(0, 0.5^2) (+1 for norm weights),
    relative position tables N(0, 1), position embedding and cls token N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "pos_embed" not in name and "cls_token" not in name:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                if "norm" in name and name.endswith("weight"):
                    p.add_(1.0)


def save(file: str, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / file), metadata=meta)


def main() -> None:
    timm = import_timm()
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    versions = {"timm": timm.__version__, "torch": torch.__version__}

    swin = SwinTransformer(**SWIN).eval()
    randomise(swin, seed=0)
    x = torch.randn((1, 3) + SWIN["img_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = swin.forward_intermediates(x, intermediates_only=True)
    meta = dict(versions, model="timm.models.swin_transformer.SwinTransformer",
                config=json.dumps(SWIN))
    save("swin_tiny.safetensors", swin.state_dict(), meta)
    save("swin_tiny_io.safetensors", {"input": x, **{f"out.{i}": o for i, o in enumerate(outs)}},
         meta)
    print("swin_tiny", [tuple(o.shape) for o in outs])

    eva = Eva(**EVA).eval()
    randomise(eva, seed=2)
    meta = dict(versions, model="timm.models.eva.Eva", config=json.dumps(EVA),
                blocks=json.dumps(EVA_BLOCKS))
    save("eva02_tiny.safetensors", eva.state_dict(), meta)
    for seed, (name, size) in enumerate(EVA_INPUTS.items(), start=3):
        x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            outs = eva.forward_intermediates(x, indices=EVA_BLOCKS, intermediates_only=True)
        save(f"{name}_io.safetensors",
             {"input": x, **{f"out.{i}": o for i, o in zip(EVA_BLOCKS, outs)}}, meta)
        print(name, [tuple(o.shape) for o in outs])


if __name__ == "__main__":
    main()
