"""Evaluate a checkpoint written by a training script (the task comes from the checkpoint).

    python evaluate.py --data data/MFNet --checkpoint runs/seg/best.pt --split test
    python evaluate.py --data VT5000/Test --data VT1000 --data VT821 --checkpoint runs/sod/best.pt
    python evaluate.py --data data/M3FD --checkpoint runs/det/best.pt --split test

The model is rebuilt from the configuration saved in the checkpoint; the pretrained visible model
(if the run used one) is loaded from the path recorded there (or the release name or URL recorded
there, from the download cache) or from --pretrained, its SHA-256 is checked against the
checkpoint's, then the saved tensors are loaded on top. Inputs are normalised as in training (the
normalisation saved in the checkpoint).

seg: MFNet/MSRS at native resolution (stride-4 logits upsampled bilinearly before the argmax);
     mIoU, mAcc and per-class IoU over the split and its day and night images (docs/data.md).
sod: each --data folder (RGB/, T/, GT/) in turn: S, adp/mean/max F, wF, adp/mean/max E, MAE at
     ground-truth size (paper Table 1's columns).
det: M3FD --split: COCO mAP, AP50, AP75, APs/m/l and per-class AP (paper Table 3's columns).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import kernels
from ivt import engine
from ivt.models import CheckpointError
from ivt.precision import store_frozen_weights
from ivt.tasks import (TASK_NAMES, add_kernels_flag, config_normalization, load_trained,
                       task_module)
from ivt.trainer import given_flags, short_error


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, choices=TASK_NAMES,
                   help="what the checkpoint was trained for; checked against the checkpoint "
                        "(default: read from the checkpoint)")
    p.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="dataset root folder; SOD accepts several (--data A --data B), each "
                        "reported on its own")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="last.pt or best.pt written by the training script")
    p.add_argument("--pretrained", default=None, metavar="FILE|NAME|URL",
                   help="the pretrained visible-model weights, overriding those saved in the "
                        "checkpoint's configuration: a file, a released checkpoint's name or a "
                        "URL (downloaded once into $IVT_CACHE); its SHA-256 must match the "
                        "checkpoint's (default: the saved file, or the saved name or URL when "
                        "that file is not on this machine)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the metrics as JSON to FILE")
    p.add_argument("--save-vis", default=None, metavar="DIR",
                   help="write per-image visualisations into DIR (seg: visible | thermal | "
                        "prediction | ground truth; sod: 8-bit saliency PNGs at ground-truth size "
                        "plus side-by-side figures; det: boxes on visible and thermal)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda or cuda:N (default: %(default)s)")
    add_kernels_flag(p)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, as training's --amp (the frozen Linear and conv weights "
                        "are then stored in bf16, which autocast casts them to anyway); --no-amp: "
                        "float32 (default: as the checkpoint was trained, so the numbers are "
                        "those its training logged)")
    p.add_argument("--workers", type=int, default=2,
                   help="data-loading worker processes (default: %(default)s)")
    p.add_argument("--no-verify-images", dest="verify_images", action="store_false",
                   help="skip decoding every image before evaluating (by default a corrupt "
                        "file is named before any prediction is made)")
    g = p.add_argument_group("segmentation and detection")
    g.add_argument("--split", default="test",
                   help="split list to evaluate, e.g. test, test_day, test_night, val; never "
                        "select checkpoints on test (default: %(default)s)")
    g.add_argument("--dataset", default=None,
                   help="segmentation: on-disk layout of --data, mfnet or msrs (default: the one "
                        "the checkpoint trained on)")
    g.add_argument("--split-dir", default=None, metavar="DIR",
                   help="detection: folder holding train.txt, val.txt, test.txt of M3FD image "
                        "ids (default: the one the checkpoint trained with)")
    g.add_argument("--max-dets", type=int, default=100,
                   help="detection: detections per image and class scored, 100 as "
                        "pycocotools; mmdet-based papers (the paper's AP50/AP75) use up to 1000. "
                        "They are taken from the detector's 300 best per image (DINO's, mmdet's) "
                        "(default: %(default)s)")
    return p


# The flags only some tasks read: given for a checkpoint of another task, they are ignored (said).
TASK_FLAGS = {"split": ("seg", "det"), "dataset": ("seg",), "split_dir": ("det",),
              "max_dets": ("det",)}


def main(argv=None) -> dict:
    """Parse `argv` (default: sys.argv), evaluate, return the metrics dict. Bad data, a missing
    file or a checkpoint that does not fit exits with status 2 and an `error:` line."""
    parser = get_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    kernels.set_backend(args.kernels)
    try:
        if args.json:
            engine.check_output(args.json, "--json", folder=False)
        if args.save_vis:
            engine.check_output(args.save_vis, "--save-vis", folder=True)
        kernels.check_backend(engine.select_device(args.device))
        task, model, ckpt = load_trained(args.checkpoint, args.pretrained)
        if args.task is not None and args.task != task:
            raise ValueError(f"{args.checkpoint} was trained for --task {task}, not {args.task}")
        for dest, tasks in TASK_FLAGS.items():
            if dest in given and task not in tasks:
                print(f"warning: --{dest.replace('_', '-')} applies to {' and '.join(tasks)} "
                      f"checkpoints; ignored for this {task} one", file=sys.stderr)
        dist = engine.setup_distributed(args.device)
        if args.amp is None:
            args.amp = bool(ckpt["config"].get("amp"))
        try:
            model.to(dist.device)
            if args.amp:
                store_frozen_weights(model, torch.bfloat16)
            module = task_module(task)
            metrics = module.evaluate_checkpoint(args, model, ckpt, dist,
                                                 config_normalization(ckpt["config"]))
            is_main = dist.is_main
        finally:
            engine.cleanup_distributed()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {short_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except engine.TrainingDiverged as e:                 # the model's outputs are not finite
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if not is_main:                          # under torchrun every rank holds the same metrics
        return metrics
    module.print_report(metrics)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(engine.jsonable(metrics), indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
