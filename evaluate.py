"""Evaluate a checkpoint written by a training script on a dataset split.

    python evaluate.py --task seg --data data/MFNet --checkpoint runs/seg/best.pt --split test

The model is rebuilt from the configuration saved in the checkpoint; the pretrained visible model
(if the run used one) is loaded from the path recorded there or from --pretrained, its SHA-256 is
checked against the checkpoint's, then the saved tensors are loaded on top.

seg: MFNet/MSRS at native resolution (stride-4 logits upsampled bilinearly before the argmax);
prints mIoU, mAcc and per-class IoU over the whole split and over its day and night images (one
confusion matrix each, data.md).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ivt import engine
from ivt.tasks.seg import evaluate_seg
from ivt.checkpoint import check_pretrained, load_checkpoint, load_model_state
from ivt.data import CLASSES, PALETTE, SEG_DATASETS, build_seg_dataset
from ivt.data.mfnet import parse_name
from ivt.models import CheckpointError
from ivt.models.segmentor import build_from_config

IGNORE_COLOUR = (255, 255, 255)     # label 255 (padding) in visualisations


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="seg", choices=sorted(TASKS),
                   help="what the checkpoint was trained for (default: %(default)s)")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset root folder")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="last.pt or best.pt written by the training script")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="the pretrained visible-model file, overriding the path saved in the "
                        "checkpoint's configuration (its SHA-256 must match the checkpoint's)")
    p.add_argument("--split", default="test",
                   help="split to evaluate, e.g. test, test_day, test_night, val "
                        "(default: %(default)s)")
    p.add_argument("--dataset", default=None, choices=sorted(SEG_DATASETS),
                   help="on-disk layout of --data (default: the one the checkpoint trained on)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the metrics as JSON to FILE")
    p.add_argument("--save-vis", default=None, metavar="DIR",
                   help="write one PNG per image into DIR: visible | thermal | prediction | "
                        "ground truth (MFNet palette), side by side")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default: float32)")
    p.add_argument("--workers", type=int, default=2,
                   help="data-loading worker processes (default: %(default)s)")
    return p


# -- segmentation -------------------------------------------------------------------------------
def colourise(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the MFNet palette (255 = white)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(PALETTE)] = np.asarray(PALETTE, np.uint8)
    lut[255] = IGNORE_COLOUR
    return lut[label]


def panel(vis: np.ndarray, ir: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> Image.Image:
    """visible (H, W, 3), thermal (H, W), prediction and ground truth (H, W) -> (H, 4W, 3)."""
    thermal = np.repeat(ir[..., None], 3, axis=2)
    return Image.fromarray(np.concatenate(
        [vis.astype(np.uint8), thermal.astype(np.uint8), colourise(pred), colourise(gt)], axis=1))


def metric_summary(metric) -> dict:
    r = metric.compute()
    return {"num_pixels": int(metric.confusion.sum()), "mIoU": r["mIoU"], "mAcc": r["mAcc"],
            "aAcc": r["aAcc"], "IoU": dict(zip(CLASSES, r["IoU"])),
            "Acc": dict(zip(CLASSES, r["Acc"]))}


def print_seg_report(m: dict) -> None:
    print(f"{m['checkpoint']} on {m['split']} ({m['num_images']} images: "
          f"{m['num_day']} day, {m['num_night']} night)")
    print(f"{'class':<12}" + "".join(f"{k:>9}" for k in ("all", "day", "night")))
    for c in CLASSES:
        print(f"{c:<12}" + "".join(f"{m[k]['IoU'][c]:9.2f}" for k in ("all", "day", "night")))
    for name in ("mIoU", "mAcc"):
        print(f"{name:<12}" + "".join(f"{m[k][name]:9.2f}" for k in ("all", "day", "night")))


def evaluate_seg_checkpoint(args, ckpt: dict, dist: engine.DistInfo) -> dict:
    cfg = ckpt["config"]
    dataset = build_seg_dataset(args.dataset or cfg["dataset"], args.data, args.split,
                                train=False, seed=cfg["seed"])
    pretrained = args.pretrained or cfg.get("pretrained")
    check_pretrained(ckpt, pretrained, args.checkpoint)
    model = build_from_config(cfg, dataset.num_classes, pretrained if ckpt["delta"] else None)
    load_model_state(model, ckpt["model"], ckpt["delta"], args.checkpoint)
    model.to(dist.device).eval()

    on_prediction = None
    if args.save_vis:
        out = Path(args.save_vis)
        out.mkdir(parents=True, exist_ok=True)

        def on_prediction(index: int, pred: torch.Tensor, label: torch.Tensor) -> None:
            sample = dataset.samples[index]
            vis, ir = dataset.read_pair(sample)            # uint8 (H, W, 3), (H, W)
            panel(vis, ir, pred.numpy().astype(np.uint8),
                  label.numpy().astype(np.uint8)).save(out / f"{sample.name}.png")

    metrics = evaluate_seg(model, dataset, dist,
                                  engine.autocast_context(dist.device, args.amp),
                                  args.workers, on_prediction)
    night = sum(parse_name(s.name, s.label)[0] for s in dataset.samples)
    result = {"task": "seg", "checkpoint": args.checkpoint, "split": args.split,
              "iter": ckpt["iter"], "num_images": len(dataset),
              "num_day": len(dataset) - night, "num_night": night,
              **{k: metric_summary(m) for k, m in metrics.items()}}
    for k in ("all", "day", "night"):
        result[f"miou_{k}"] = result[k]["mIoU"]
    print_seg_report(result)
    return result


TASKS = {"seg": evaluate_seg_checkpoint}


def main(argv=None) -> dict:
    """Parse `argv` (default: sys.argv), evaluate, return the metrics dict. Bad data, a missing
    file or a checkpoint that does not fit exits with status 2 and an `error:` line."""
    args = get_parser().parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        trained_for = ckpt.get("task", "seg")
        if trained_for != args.task:
            raise ValueError(f"{args.checkpoint} was trained for --task {trained_for}, "
                             f"not {args.task}")
        dist = engine.setup_distributed(args.device)
        try:
            metrics = TASKS[args.task](args, ckpt, dist)
        finally:
            engine.cleanup_distributed()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(engine.jsonable(metrics), indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
