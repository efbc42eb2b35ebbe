"""`python -m ivt.summary`: trainable and total backbone parameters, per component, and the paper's
#TP values beside ours (Tables 2, 5, 6 and 8); `--methods`: the compared PETL methods (Table 4).

Models are built on the meta device, so even EVA02-L is counted in a couple of seconds without
allocating its weights.
"""
import argparse
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .models import (BACKBONES, TUNINGS, VARIANTS, VIT_BACKBONES, PETLConfig, build_backbone,
                     count_parameters)
from .models.petl import METHOD_OPTIONS

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
    (r"\.prompts$", "VPT prompts"),
    (r"\.adapters\.(down|up)\.", "(Bi-)AdaptFormer linears (down, up)"),
    (r"^rein\.\d+\.tokens_", "Rein tokens (A, B)"),
    (r"^rein\.", "Rein MLPs and scale"),
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
  parameters, which still rounds to 6.06M; no construction of Sec. 3 gives 6.05M.
* The supplement's 6.01M matches no variant."""


# Table 4 (Swin-L): the compared methods with the options that build them (defaults).
METHOD_ROWS: List[Tuple[str, str, dict, float]] = [
    ("Full fine-tuning", "full", dict(), 192.50),
    ("Freeze", "freeze", dict(), 0.00),
    ("VPT", "vpt", dict(), 0.20),
    ("AdaptFormer", "adaptformer", dict(), 2.34),
    ("Bi-AdaptFormer", "bi_adaptformer", dict(), 1.16),
    ("Rein", "rein", dict(), 14.72),
    ("IV-tuning", "ivt", dict(), 6.06),
]

METHOD_NOTES = """Notes on Table 4 (Swin-L):
* Every PETL method has the independent IR patch embedding of Sec. 4.5 (9,792 parameters: conv
  4x4 3->192 with bias, LayerNorm), counted in "ours". AdaptFormer's 2.34M needs it
  (2,329,728 without it = 2.33M), so the paper counts it; both round to 1.16M for Bi-AdaptFormer.
  The paper's Freeze (0.00M) has none; `freeze`/`full` get it with ir_embed=True (+9,792).
* Full: 192.50M matches no Swin-L count (195,195,444 here; 195.20M in Table 5(a)).
* VPT: p prompts per block cost p x 18,048 (the 24 blocks' widths). With the IR embedding,
  p = 10 gives 190,272 (0.19M, -4.9%) and p = 11 gives 208,320 (0.21M, +4.2%): no prompt length
  lands within 2%. Without it, p = 11 gives 198,528 = 0.20M. Default p = 10.
* Bi-AdaptFormer: Binary Adapters reports storage, not a reduced parameter count; 1.16M counts
  each 1-bit weight as one parameter: 2 C r per block, r = 32, no biases, s fixed = 1,155,072
  (+ IR embedding). Stored at 1 bit plus fp32 mean and std per matrix: 144,768 bytes.
* Rein: Rein's defaults (m = 100 tokens of rank 16 per block, the two MLPs and alpha shared by
  the blocks of a stage, as the release does for ConvNeXt; no Mask2Former query link with a
  Segformer head) give 6,609,604. 14.72M is not reached by any natural variant: full-rank tokens
  8,087,236; plus the Mask2Former link (transform, merge) per stage 9,612,996; MLPs per block
  instead of per stage 31,781,188 (all with the IR embedding)."""


def methods_table(backbone: str = "swin_l", overrides: Optional[dict] = None
                  ) -> List[Dict[str, object]]:
    """Table 4's rows: our trainable count (IR embedding included where the mode has one), the
    IR embedding's share, the paper's value and the hyperparameters. `overrides`: PETL options
    (`prompt_length`, `bottleneck`, `scale`, `rein_tokens`, `rein_rank`) for the methods that
    take them, e.g. {'prompt_length': 11}."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    rows = []
    for setting, tuning, options, paper in METHOD_ROWS:
        own = {k: v for k, v in overrides.items() if k in METHOD_OPTIONS.get(tuning, ())}
        options = {**options, **own}
        c = count(backbone, img_size=_default_size(backbone), tuning=tuning, **options)
        ir = sum(n for label, n in c["components"].items() if label.startswith("IR patch"))
        if tuning == "ivt":
            hyper = "d1-d2-d3 8-64-8"
        elif tuning in ("full", "freeze"):
            hyper = "visible model only"
        else:
            hyper = PETLConfig(method=tuning, **own).describe()
        paper = paper if backbone == "swin_l" else None       # Table 4 is Swin-L
        rows.append({"setting": setting, "tuning": tuning, "hyperparameters": hyper,
                     "ours": c["trainable"], "ir_embed": ir, "paper_M": paper,
                     "ratio": c["trainable"] / (paper * 1e6) if paper else None})
    return rows


def print_methods(backbone: str = "swin_l", overrides: Optional[dict] = None) -> None:
    print(f"Table 4: trainable backbone parameters of the compared methods ({backbone})")
    print(f"{'method':<18}{'tuning':<16}{'hyperparameters':<34}{'ours':>13}{'of which IR':>13}"
          f"{'paper':>9}{'ours/paper':>12}")
    for r in methods_table(backbone, overrides):
        ratio = "" if r["ratio"] is None else f"{100 * (r['ratio'] - 1):+.1f}%"
        paper = "-" if r["paper_M"] is None else f"{r['paper_M']:.2f}M"
        print(f"{r['setting']:<18}{r['tuning']:<16}{r['hyperparameters']:<34}{r['ours']:>13,}"
              f"{r['ir_embed']:>13,}{paper:>9}{ratio:>12}")
    print()
    print(METHOD_NOTES if backbone == "swin_l" else "(Table 4 reports Swin-L only.)")


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
    visible = sum(p.numel() for n, p in bb.named_parameters() if not bb.is_added_name(n))
    return {"trainable": count_parameters(bb, trainable_only=True), "total": count_parameters(bb),
            "visible": visible,
            "components": {k: v for k, v in parts.items() if v}}


def _default_size(name: str):
    """512 for the ViTs (their position embedding grows with the input), as the paper's EVA02-L."""
    return 512 if name in VIT_BACKBONES else None


def paper_table() -> List[Dict[str, object]]:
    rows = []
    for table, setting, backbone, options, paper in PAPER_ROWS:
        ours = count(backbone, img_size=_default_size(backbone), **options)["trainable"]
        rows.append({"table": table, "setting": setting, "backbone": backbone,
                     "paper_M": paper, "ours": ours,
                     "match": paper is None or round(ours / 1e6, 2) == paper})
    return rows


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ivt.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="swin_l", choices=BACKBONES, help="backbone name")
    ap.add_argument("--tuning", default="ivt", choices=TUNINGS,
                    help="full: all trainable; freeze: nothing; ivt: IV-tuning modules only; "
                         "vpt, adaptformer, bi_adaptformer, rein: the compared PETL methods "
                         "(their modules and an IR patch embedding)")
    ap.add_argument("--variant", default="ivt", choices=VARIANTS, help="IV-tuning ablation")
    ap.add_argument("--d1", type=int, default=8, help="EMPG hidden width")
    ap.add_argument("--d2", type=int, default=64, help="Hybrid Adapter hidden width")
    ap.add_argument("--d3", type=int, default=8, help="Internal Prompt Adapter hidden width")
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="0-based block indices that get adapters (default: all)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="input size (matters for the ViTs' position embedding: EVA02, DINOv2, "
                         "MAE; default 512 for them)")
    ap.add_argument("--methods", action="store_true",
                    help="print the compared PETL methods' counts beside Table 4's (with the "
                         "options below where given) and exit")
    ap.add_argument("--prompt-length", type=int, default=None, help="vpt: prompts per block (10)")
    ap.add_argument("--bottleneck", type=int, default=None,
                    help="adaptformer / bi_adaptformer: hidden width (64 / 32)")
    ap.add_argument("--adapter-scale", type=float, default=None,
                    help="adaptformer / bi_adaptformer: the branch's scale s (0.1 / 1)")
    ap.add_argument("--rein-tokens", type=int, default=None, help="rein: tokens per block (100)")
    ap.add_argument("--rein-rank", type=int, default=None, help="rein: token rank (16)")
    ap.add_argument("--ir-embed", action="store_true",
                    help="full / freeze: add the independent IR patch embedding of Sec. 4.5")
    ap.add_argument("--paper", action="store_true",
                    help="also print every #TP row of the paper's Tables 2, 5, 6 and 8 beside ours")
    return ap


def print_paper_table() -> None:
    print(f"{'table':<12}{'setting':<36}{'backbone':<10}{'paper':>9}{'ours':>14}  match")
    for r in paper_table():
        print(f"{r['table']:<12}{r['setting']:<36}{r['backbone']:<10}{r['paper_M']:>8.2f}M"
              f"{r['ours']:>14,}  {'yes' if r['match'] else 'NO'}")
    print()
    print(NOTES)


def main(argv=None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    petl = dict(prompt_length=args.prompt_length, bottleneck=args.bottleneck,
                scale=args.adapter_scale, rein_tokens=args.rein_tokens, rein_rank=args.rein_rank)
    if args.methods:
        print_methods(args.backbone, petl)
        return

    # every option given goes to the model, which refuses those of another tuning
    options = {k: v for k, v in petl.items() if v is not None}
    options.update(variant=args.variant, d1=args.d1, d2=args.d2, d3=args.d3, layers=args.layers)
    if args.ir_embed:
        options["ir_embed"] = True
    try:
        c = count(args.backbone, img_size=args.img_size or _default_size(args.backbone),
                  tuning=args.tuning, **options)
    except ValueError as error:
        parser.error(str(error))
    options = {k: v for k, v in petl.items() if v is not None}
    detail = ""
    if args.tuning == "ivt":
        detail = f", variant={args.variant}, d1-d2-d3={args.d1}-{args.d2}-{args.d3}"
    elif args.tuning in METHOD_OPTIONS:
        detail = ", " + PETLConfig(method=args.tuning, **options).describe()
    print(f"{args.backbone}, tuning={args.tuning}{detail}")
    print(f"{'component':<32}{'trainable':>14}")
    for label, n in c["components"].items():
        print(f"{label:<32}{n:>14,}")
    print(f"{'trainable (#TP)':<32}{c['trainable']:>14,}")
    print(f"{'visible model':<32}{c['visible']:>14,}")
    print(f"{'total':<32}{c['total']:>14,}")
    print(f"#TP / visible model: {100 * c['trainable'] / c['visible']:.2f}%")
    if args.paper:
        print()
        print_paper_table()


if __name__ == "__main__":
    main()
