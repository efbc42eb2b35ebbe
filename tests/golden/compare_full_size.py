"""Compare this repository's full-size DINOv2 and MAE backbones with timm's on identical random
weights (a check run by hand, not a fixture: the sizes are too large to commit).

Runs in the throwaway environment of make_golden.py (README.md beside it), from the repository
root, which it puts on the import path:

    /tmp/timmenv/bin/python tests/golden/compare_full_size.py [--large]

For each model, timm's `VisionTransformer` gets seeded random weights (`randomise`), which are
saved in timm's layout and in the original release's (`release_layout`) and loaded from each file
by `load_pretrained` into ours, built with `tuning='full'` at timm's patch and position grid
(DINOv2: patch 14, 518 px; MAE: patch 16, 224 px). Printed per input: the largest relative
difference, max |ours - timm| / max |timm|, over the four feature blocks (timm's
`forward_intermediates`, norm=False) and over the four outputs (timm's blocks resampled by x4, x2,
x1, x0.5 as ours are).
"""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from make_golden import import_timm, randomise, release_layout  # noqa: E402

# ours, timm's, patch, stored image size, inputs (H, W): the stored grid and a smaller
# non-square one (the position embedding resized)
MODELS = [("dinov2_b", "vit_base_patch14_dinov2", 14, 518, [(518, 518), (224, 308)]),
          ("dinov2_b_reg", "vit_base_patch14_reg4_dinov2", 14, 518, [(224, 308)]),
          ("mae_b", "vit_base_patch16_224", 16, 224, [(224, 224), (256, 320)])]
LARGE = [("dinov2_l", "vit_large_patch14_dinov2", 14, 518, [(224, 308)]),
         ("dinov2_l_reg", "vit_large_patch14_reg4_dinov2", 14, 518, [(224, 308)]),
         ("mae_l", "vit_large_patch16_224", 16, 224, [(256, 320)])]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours_name: str, timm_name: str, patch: int, img: int, sizes, timm, folder: Path):
    from safetensors.torch import save_file

    from ivt.models import build_backbone
    from ivt.models.vit import FEATURE_SCALES

    theirs = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True,
                               num_classes=0).eval()
    randomise(theirs, seed=0)
    release = release_layout(ours_name.split("_")[0], theirs, seed=1)    # may set cls_token
    files = {"timm": folder / f"{ours_name}.safetensors",
             "release": folder / f"{ours_name}_release.pth"}
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(files["timm"]))
    torch.save(release, files["release"])
    for layout, file in files.items():
        ours = build_backbone(ours_name, tuning="full", img_size=img, patch_size=patch,
                              drop_path_rate=0.0).eval()
        ours.load_pretrained(str(file))
        for i, size in enumerate(sizes):
            x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(10 + i))
            with torch.no_grad():
                want = theirs.forward_intermediates(x, indices=ours.feature_blocks, norm=False,
                                                    intermediates_only=True)
                blocks, outs = ours.forward_blocks(x), ours(x)
            resampled = [w if s == 1 else F.interpolate(
                w, size=(math.ceil(w.shape[2] * s), math.ceil(w.shape[3] * s)),
                mode="bilinear", align_corners=False) for w, s in zip(want, FEATURE_SCALES)]
            err_blocks = max(relative(a, b) for a, b in zip(blocks, want))
            err_outs = max(relative(a, b) for a, b in zip(outs, resampled))
            print(f"{ours_name:<13} {timm_name:<30} {layout:<8} {size[0]}x{size[1]:<5} "
                  f"blocks {err_blocks:.2e}  outputs {err_outs:.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also the ViT-L models (slow on a CPU)")
    args = ap.parse_args()
    timm = import_timm()
    print(f"timm {timm.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        for case in MODELS + (LARGE if args.large else []):
            compare(*case, timm=timm, folder=Path(folder))


if __name__ == "__main__":
    main()
