"""Make the timm golden fixtures of tests/test_timm_golden.py and tests/test_vit.py (run once; the
outputs are committed).

timm is not a dependency of the project; this script runs in a throwaway environment (see
README.md beside it for the exact commands and versions). It builds a tiny Swin, a tiny EVA02
and tiny plain ViTs (DINOv2 with and without registers, MAE) with timm, gives them seeded random
weights (larger than timm's init, so that attention is far from uniform and a wrong window,
shift or padding shows in the outputs), runs them on seeded non-square inputs, and writes:

    swin_tiny.safetensors, eva02_tiny.safetensors, dinov2_tiny.safetensors,
    dinov2_reg_tiny.safetensors, mae_tiny.safetensors
        the weights, in timm's state-dict layout (final norm included; no classifier head)
    dinov2_tiny_release.pth, dinov2_reg_tiny_release.pth, mae_tiny_release.pth
        the same weights in the original releases' layouts (`release_layout`)
    swin_tiny_io.safetensors, eva02_tiny_<H>x<W>_io.safetensors
        `input` (1, 3, H, W) and the expected outputs `out.<i>` (NCHW): Swin's stage i, EVA02's
        block i (patch tokens, before any final norm)
    dinov2_tiny_io.safetensors, dinov2_reg_tiny_io.safetensors, mae_tiny_io.safetensors
        for two input sizes, `input.<H>x<W>` and `out.<H>x<W>.<i>`: block i's patch tokens
        (NCHW; no cls, no registers, before any final norm)

Each .safetensors file's metadata records the timm and torch versions and the architecture.

Usage (from the repository root):  /tmp/timmenv/bin/python tests/golden/make_golden.py
"""
import json
import math
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Tiny Swin: window 3 (shift 1) divides every stage grid, 24x36, 12x18, 6x9 (input 96x144, patch
# 4), so no block pads: where a block pads, timm shifts before it pads, which lets tokens from
# opposite edges attend to each other (timm issue #2438); ivt pads first, as the mmseg/mmdet
# Swin, and tests/test_swin.py checks padded grids against attention written out token by
# token. Two limits of timm shape the sizes: it fixes each stage's window at construction from
# floor(grid / 2^stage), so the grids are even before every patch merging (floor = ceil); and a
# grid no larger than the window would make timm build a smaller relative position table, so
# every grid is larger than the window.
SWIN = dict(img_size=(96, 144), patch_size=4, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4),
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

# Tiny plain ViTs (timm's VisionTransformer: fused biased qkv, GELU MLP, LayerNorm eps 1e-6) at
# width 16, depth 3, as the releases are built: DINOv2 (vit_*_patch14_dinov2: patch 14,
# LayerScale) with its position embedding stored for 56 x 56 (4 x 4), and with 4 registers as
# timm builds the `_reg4` models (`no_embed_class`: no position entry for cls and registers);
# MAE (vit_*_patch16_224.mae: patch 16) stored for 64 x 64 (4 x 4). The inputs are non-square
# grids larger (5 x 7) and smaller (3 x 2) than the stored one, so both resize.
DINOV2 = dict(img_size=56, patch_size=14, embed_dim=16, depth=3, num_heads=2, mlp_ratio=4.0,
              init_values=1e-5, dynamic_img_size=True, num_classes=0)
DINOV2_REG = dict(DINOV2, reg_tokens=4, no_embed_class=True)
MAE = dict(img_size=64, patch_size=16, embed_dim=16, depth=3, num_heads=2, mlp_ratio=4.0,
           dynamic_img_size=True, num_classes=0)
VITS = {"dinov2_tiny": (DINOV2, [(70, 98), (42, 28)]),
        "dinov2_reg_tiny": (DINOV2_REG, [(70, 98), (42, 28)]),
        "mae_tiny": (MAE, [(80, 112), (48, 32)])}
VIT_BLOCKS = [0, 1, 2]


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


TOKENS = ("pos_embed", "cls_token", "reg_token")       # drawn N(0, 0.5^2), not as matrices


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights: matrices N(0, 1/fan_in), vectors N(0, 0.5^2) (+1 for norm weights),
    relative position tables N(0, 1), position embedding, cls and register tokens N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and not any(t in name for t in TOKENS):
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                if "norm" in name and name.endswith("weight"):
                    p.add_(1.0)


def release_layout(family: str, model: torch.nn.Module, seed: int) -> dict:
    """The timm model's weights as the original release of `family` ('dinov2' or 'mae') stores
    them (what the test loads, besides timm's file): DINOv2's plain state dict with `mask_token`
    (and `register_tokens` with a cls entry in the position embedding), MAE's `{'model': ...}`
    (the same names as timm's).

    timm's register model keeps no position entry for cls: its cls token is the release's cls
    token plus that entry. Drawing both (seeded) and setting timm's cls token to their sum makes
    the release forward's cls + pos[0] the same number as timm's cls token, bit for bit."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if family == "mae":
        return {"model": sd}
    C = sd["cls_token"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    sd["mask_token"] = torch.randn((1, C), generator=g) * 0.5
    if "reg_token" in sd:
        cls, entry = torch.randn((2, 1, 1, C), generator=g) * 0.5
        with torch.no_grad():
            model.cls_token.copy_(cls + entry)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = cls
        sd["pos_embed"] = torch.cat([entry, sd["pos_embed"]], dim=1)
    return sd


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
    write_vits(versions)


def write_vits(versions: dict) -> None:
    """The plain ViTs' fixtures: weights in timm's and the release's layout, inputs, outputs."""
    from timm.models.vision_transformer import VisionTransformer
    for seed, (name, (config, sizes)) in enumerate(VITS.items(), start=10):
        vit = VisionTransformer(**config).eval()
        randomise(vit, seed=seed)
        release = release_layout(name.split("_")[0], vit, seed=seed + 100)   # may set cls
        meta = dict(versions, model="timm.models.vision_transformer.VisionTransformer",
                    config=json.dumps(config), blocks=json.dumps(VIT_BLOCKS))
        save(f"{name}.safetensors", vit.state_dict(), meta)
        torch.save(release, HERE / f"{name}_release.pth")
        io = {}
        for i, size in enumerate(sizes):
            key = f"{size[0]}x{size[1]}"
            x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(seed + 20 + i))
            with torch.no_grad():
                outs = vit.forward_intermediates(x, indices=VIT_BLOCKS, norm=False,
                                                 intermediates_only=True)
            io[f"input.{key}"] = x
            io.update({f"out.{key}.{b}": o for b, o in zip(VIT_BLOCKS, outs)})
            print(name, key, [tuple(o.shape) for o in outs])
        save(f"{name}_io.safetensors", io, meta)


if __name__ == "__main__":
    main()
