"""`python -m ivt.summary`: trainable and total backbone parameters, per component, and the paper's
#TP values beside ours (Tables 2, 5, 6 and 8).

Models are built on the meta device, so even EVA02-L is counted in a couple of seconds without
allocating its weights.
"""
import argparse
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .models import BACKBONES, TUNINGS, VARIANTS, build_backbone

# Component of a trainable parameter, from its name (first match wins).
_COMPONENTS = [
    (r"^ir_patch_embed\.proj\.", "IR patch embedding conv"),
    (r"^ir_patch_embed\.", "IR patch embedding LayerNorm"),
    (r"^empg\.norm\.", "EMPG shared LayerNorm"),
    (r"^empg\.", "EMPG (s1, HO, s2, s3)"),
    (r"\.ha\d\.sft\.norm\.", "HA LayerNorm affine"),
    (r"\.ha\d\.sft\.", "HA SFT gamma/beta"),
    (r"\.ha\d\.(down|up)\.", "HA linears (down, up)"),
    (r"\.ha\d\.ho\.", "HA Hybrid Operation"),
    (r"\.ipa\d\.sft_in\.norm\.", "IPA LayerNorm affine"),
    (r"\.ipa\d\.sft_in\.", "IPA SFT1 gamma/beta"),
    (r"\.ipa\d\.sft_out\.", "IPA SFT2 gamma/beta"),
    (r"\.ipa\d\.(down|up)\.", "IPA linears (down, up)"),
    (r"", "visible model"),
]

# The paper's #TP (in millions) for every setting it reports, with the build options that
# reproduce it. EVA02-L's "1->9" etc. are off by one in the paper: 4.18/5.87/7.55M are
# adapters in 10/15/20 blocks ("6->24" is 20 blocks as well: blocks 5-24, 1-based).
PAPER_ROWS: List[Tuple[str, str, str, dict, Optional[float]]] = [
    ("Table 5(a)", "Full fine-tuning", "swin_l", dict(tuning="full"), 195.20),
    ("Table 5(a)", "Freeze", "swin_l", dict(tuning="freeze"), 0.00),
    ("Table 5(a)", "EMPG", "swin_l", dict(variant="empg_only"), 0.02),
    ("Table 5(a)", "EMPG + HA", "swin_l", dict(variant="empg_ha"), 5.23),
    ("Table 5(a)", "EMPG + HA + IPA", "swin_l", dict(), 6.06),
    ("Table 5(b)", "1->9 (10 blocks)", "eva02_l", dict(layers=range(10)), 4.18),
    ("Table 5(b)", "1->14 (15 blocks)", "eva02_l", dict(layers=range(15)), 5.87),
    ("Table 5(b)", "1->19 (20 blocks)", "eva02_l", dict(layers=range(20)), 7.55),
    ("Table 5(b)", "6->24 (20 blocks)", "eva02_l", dict(layers=range(4, 24)), 7.55),
    ("Table 5(b)", "1->24", "eva02_l", dict(), 8.90),
    ("Table 5(c)", "Parallel", "swin_l", dict(variant="parallel"), 6.06),
    ("Table 5(c)", "EMPG-Only", "swin_l", dict(variant="empg_only"), 0.02),
    ("Table 5(c)", "MHSA-Only", "swin_l", dict(variant="mhsa_only"), 3.04),
    ("Table 5(c)", "FFN-Only", "swin_l", dict(variant="ffn_only"), 3.04),
    ("Table 5(c)", "IV-tuning", "swin_l", dict(), 6.06),
    ("Table 6", "IPA-wo-Projection", "swin_l", dict(variant="ipa_wo_projection"), 5.45),
    ("Table 6", "IPA-Deep", "swin_l", dict(variant="ipa_deep"), 6.06),
    ("Table 6", "wo-simAM", "swin_l", dict(variant="wo_simam"), 6.06),
    ("Table 6", "P_E-IR", "swin_l", dict(variant="pe_ir"), 6.05),
    ("Table 6", "IR-Missing", "swin_l", dict(variant="ir_missing"), 6.06),
    ("Table 8", "8-16-8", "swin_l", dict(d2=16), 2.21),
    ("Table 8", "8-32-8", "swin_l", dict(d2=32), 3.45),
    ("Table 8", "8-64-8", "swin_l", dict(), 6.06),
    ("Table 8", "16-64-16", "swin_l", dict(d1=16, d3=16), 6.65),
    ("Table 8", "32-64-32", "swin_l", dict(d1=32, d3=32), 7.81),
    ("Table 2", "EVA02-L Segformer baseline (full)", "eva02_l", dict(tuning="full"), 304.24),
]

NOTES = """Notes on the paper's numbers:
* Swin-L's backbone has 195,195,444 parameters here; the checkpoint's final LayerNorm (3,072),
  which feeds only the classifier, makes 195,198,516 = Table 5(a)'s 195.20M. The 192.50M used as
  the denominator elsewhere in the paper matches no Swin-L count.
* EVA02-L's 304.24M is the model at 512 input (its position embedding grows with the input).
* Table 5(b)'s layer labels are off by one: 4.18/5.87/7.55M are adapters in 10/15/20 blocks.
* P_E-IR (Table 6, 6.05M): removing the visible branch of EMPG (s1 and its HO) saves 1,724
  parameters, which still rounds to 6.06M; no construction in the spec gives 6.05M.
* The supplement's 6.01M matches no variant."""


def component_of(name: str) -> str:
    return next(label for pattern, label in _COMPONENTS if re.search(pattern, name))


def count(name: str, img_size=None, **options) -> Dict[str, object]:
    """Build `name` on the meta device; return trainable, total and per-component counts."""
    with torch.device("meta"):
        bb = build_backbone(name, img_size=img_size, **options)
    parts: Dict[str, int] = OrderedDict((label, 0) for _, label in _COMPONENTS)
    for pname, p in bb.named_parameters():
        if p.requires_grad:
            parts[component_of(pname)] += p.numel()
    trainable = sum(parts.values())
    total = sum(p.numel() for p in bb.parameters())
    visible = sum(p.numel() for n, p in bb.named_parameters() if not bb.is_ivt_name(n))
    return {"trainable": trainable, "total": total, "visible": visible,
            "components": {k: v for k, v in parts.items() if v}}


def _default_size(name: str):
    return 512 if name.startswith("eva02") else None


def paper_table() -> List[Dict[str, object]]:
    rows = []
    for table, setting, backbone, options, paper in PAPER_ROWS:
        ours = count(backbone, img_size=_default_size(backbone), **options)["trainable"]
        rows.append({"table": table, "setting": setting, "backbone": backbone,
                     "paper_M": paper, "ours": ours,
                     "match": paper is None or round(ours / 1e6, 2) == paper})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ivt.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="swin_l", choices=BACKBONES, help="backbone name")
    ap.add_argument("--tuning", default="ivt", choices=TUNINGS,
                    help="full: all trainable; freeze: nothing; ivt: IV-tuning modules only")
    ap.add_argument("--variant", default="ivt", choices=VARIANTS, help="IV-tuning ablation")
    ap.add_argument("--d1", type=int, default=8, help="EMPG hidden width")
    ap.add_argument("--d2", type=int, default=64, help="Hybrid Adapter hidden width")
    ap.add_argument("--d3", type=int, default=8, help="Internal Prompt Adapter hidden width")
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="0-based block indices that get adapters (default: all)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="input size (matters for EVA02's position embedding; default 512 for EVA02)")
    ap.add_argument("--paper", action="store_true",
                    help="also print every #TP row of the paper's Tables 2, 5, 6 and 8 beside ours")
    args = ap.parse_args(argv)

    options = {}
    if args.tuning == "ivt":
        options = dict(variant=args.variant, d1=args.d1, d2=args.d2, d3=args.d3, layers=args.layers)
    c = count(args.backbone, img_size=args.img_size or _default_size(args.backbone),
              tuning=args.tuning, **options)
    print(f"{args.backbone}, tuning={args.tuning}" +
          (f", variant={args.variant}, d1-d2-d3={args.d1}-{args.d2}-{args.d3}"
           if args.tuning == "ivt" else ""))
    print(f"{'component':<32}{'trainable':>14}")
    for label, n in c["components"].items():
        print(f"{label:<32}{n:>14,}")
    print(f"{'trainable (#TP)':<32}{c['trainable']:>14,}")
    print(f"{'visible model':<32}{c['visible']:>14,}")
    print(f"{'total':<32}{c['total']:>14,}")
    print(f"#TP / visible model: {100 * c['trainable'] / c['visible']:.2f}%")
    if args.paper:
        print()
        print(f"{'table':<12}{'setting':<36}{'backbone':<10}{'paper':>9}{'ours':>14}  match")
        for r in paper_table():
            print(f"{r['table']:<12}{r['setting']:<36}{r['backbone']:<10}{r['paper_M']:>8.2f}M"
                  f"{r['ours']:>14,}  {'yes' if r['match'] else 'NO'}")
        print()
        print(NOTES)


if __name__ == "__main__":
    main()
