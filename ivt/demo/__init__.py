"""`python -m ivt.demo --out runs/demo`: IV-tuning's point, end to end, on a 2-core CPU.

1. Data. Two synthetic datasets in MFNet's layout (`ivt.data.synthetic.write_mfnet`): a
   day-only one that stands in for the visible-light pre-training data, and the downstream
   infrared-visible one (half day, half night; night visible images are dark and noisy, the
   thermal channel still shows the warm objects, and lit "cold decoys" look like objects in the
   visible image but are background).
2. Pre-training. `train_seg.py --tuning full` trains swin_nano + Segformer head from scratch on
   the day-only visible images; its backbone weights become the "visible-light pre-trained
   model" (a timm-layout state dict, loaded with `--pretrained`).
3. Three fine-tunes of that model on the downstream training set, with `train_seg.py`:
     full_vis        --tuning full: every backbone weight trains, visible images only
     ivt             --tuning ivt: backbone frozen, IV-tuning's modules train, thermal input
     ivt_ir_missing  --tuning ivt --variant ir_missing: the same, with the visible image fed
                     where the thermal one would go (Fig. 4(h): no infrared at all)
4. Evaluation with `evaluate.py` on the held-out test scenes (mIoU over all, day and night
   images), a table on stdout, `<out>/summary.json` and `<out>/night_predictions.png`.

Everything is deterministic given --seed (data, initialisation, shuffling, augmentation).
`<out>/demo_info.json` records the settings, the stage timings and the night margin.
Run again into the same --out (after Ctrl-C, or another --task: they share the pre-training),
the demo continues the runs it finds there (`--resume`); `<out>/demo_settings.json` holds the
preset and seed they were made with, and a demo with others into that folder is refused.
"""
import argparse
import json
from pathlib import Path

import torch

from . import det, methods, seg, sod
from .stages import BACKBONE, PRESETS, RUNS, Settings

# --task -> the module whose `run(out, seed, preset)` is that task's demo.
TASKS = {"seg": seg, "sod": sod, "det": det}

__all__ = ["BACKBONE", "PRESETS", "RUNS", "Settings", "TASKS", "get_parser", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ivt.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="output folder: data, checkpoints, summary.json, night_predictions.png "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, initialisation, shuffling and augmentation "
                        "(default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", action="store_true",
                   help="half the data and iterations: a quicker, noisier look (default: off)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny images, a few iterations: checks the plumbing in seconds; the "
                        "numbers mean nothing (used by the tests) (default: off)")
    p.add_argument("--task", default=None, choices=tuple(TASKS),
                   help="seg: the MFNet-layout segmentation demo above; sod: the same argument "
                        "for salient object detection (VT layout, S-measure; ivt/demo/sod.py); "
                        "det: for detection (M3FD layout, COCO AP; ivt/demo/det.py) "
                        "(default: seg)")
    p.add_argument("--methods", action="store_true",
                   help="instead, compare IV-tuning with the PETL methods of the paper's "
                        "Table 4 (full, freeze, VPT, AdaptFormer, Bi-AdaptFormer, Rein) on the "
                        "segmentation scenes (ivt/demo/methods.py)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads. A fixed count keeps reruns identical (float "
                        "sums depend on it); one also avoids OpenMP's slowdown on a busy "
                        "machine (default: %(default)s)")
    return p


def claim_folder(out: Path, preset: str, seed: int) -> None:
    """Record the preset and seed of the demo in `out` (`demo_settings.json`), or check that
    the runs already there were made with them (they are continued, not redone)."""
    record, wanted = out / "demo_settings.json", {"preset": preset, "seed": seed}
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise SystemExit(f"error: {out} holds a demo made with {found}, not {wanted}: "
                             f"choose another --out, or delete {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted) + "\n")


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("error: --threads must be at least 1")
    if args.methods and args.task not in (None, "seg"):
        raise SystemExit(f"error: --methods compares the methods on the segmentation scenes; "
                         f"--task {args.task} does not apply")
    torch.set_num_threads(args.threads)
    preset = "smoke" if args.smoke else "fast" if args.fast else "default"
    claim_folder(Path(args.out), preset, args.seed)
    if args.methods:
        return methods.run(Path(args.out), args.seed, settings=PRESETS[preset])
    return TASKS[args.task or "seg"].run(Path(args.out), args.seed, preset)
