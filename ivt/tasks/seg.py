"""Segmentation (MFNet, MSRS): the Segformer-head model, cross-entropy, mIoU at native size.

What the task adds to the shared trainer (`ivt.trainer`): its flags, datasets, model, loss and
evaluation. Recipe: SGD lr 1e-3, momentum 0.9, weight decay 1e-2, 160k iterations, batch 2,
512x512 crops (the paper); the paper ran mmsegmentation's Segformer, so the rest is mmseg's: its
SegformerHead (`ivt.models.heads.segformer`), its 160k schedule (poly, power 0.9, decaying to
1e-4) and its CrossEntropyLoss default (ignore index 255, averaged over all pixels, ignored ones
included).
"""
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import CLASSES, NUM_CLASSES, SEG_DATASETS, build_seg_dataset
from ..data.mfnet import parse_name
from ..engine import (DistInfo, all_reduce_sum_, autocast_context, check_finite_output,
                      evaluation_mode, shard)
from ..metrics import SegMetric
from ..trainer import Recipe, Task, backbone_kwargs
from ..visualize import colourise

DESCRIPTION = """Train a segmentation model (IV-tuning backbone + Segformer head) on MFNet or MSRS.

    python train_seg.py --data data/MFNet --backbone swin_l
    torchrun --nproc_per_node=4 train_seg.py --data data/MFNet ...        # DDP, same flags
    python train_seg.py --data data/MFNet ... --resume                    # continue <out>/last.pt

Defaults are the paper's recipe (SGD lr 1e-3, weight decay 1e-2, momentum 0.9, 160k iterations,
batch 2, 512x512 crops) with what the paper took from mmsegmentation: its SegformerHead, its 160k
schedule (poly, power 0.9, lr decaying to 1e-4) and its cross-entropy (ignore index 255, averaged
over all pixels of the batch, --loss-average). The paper trains on train+val (--train-split
train+val, 1176 MFNet images) and reports on test; the default here keeps val held out to select
best.pt. Writes to --out: log.jsonl (configuration, training steps, evaluations), last.pt
(resumable; every --eval-every and --save-every iterations, at the end and on Ctrl-C) and
best.pt (best validation mIoU).
With --pretrained, checkpoints hold only the trained tensors plus the pretrained file's SHA-256.
"""


IGNORE_INDEX = 255                  # padding, or 255 in a label file; class 0 is scored


def seg_loss(logits: torch.Tensor, label: torch.Tensor, average: str = "all") -> torch.Tensor:
    """Pixel-wise cross-entropy, ignore index 255: logits (B, K, H, W), label (B, H, W) int64.

    average 'all' (mmseg's CrossEntropyLoss default, avg_non_ignore=False): the sum over the
    non-ignored pixels divided by all B*H*W pixels, so ignored pixels count as 0 in the mean.
    average 'valid' (mmseg's avg_non_ignore=True, F.cross_entropy's ignore_index mean): divided by
    the number of non-ignored pixels. A batch with every pixel ignored gives 0 either way.
    """
    total = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum")
    if average == "all":
        return total / label.numel()
    if average == "valid":
        return total / (label != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"loss average {average!r}: expected 'all' or 'valid'")


@torch.no_grad()
def evaluate_seg(model: nn.Module, dataset: Dataset, dist: DistInfo, autocast: Callable,
                 workers: int = 0, on_prediction: Optional[Callable] = None
                 ) -> Dict[str, SegMetric]:
    """Segmentation metrics at native resolution: {'all', 'day', 'night'} -> SegMetric.

    Each process predicts every world_size-th image (batch 1, so sizes may differ); the confusion
    matrices are then summed over processes, so every rank returns the whole set's metrics.
    `model` (or the module inside DDP) must provide `logits_at_input_size(vis, ir)` (B, K, H, W).
    `on_prediction(index, pred (H, W), label (H, W))` is called per image on its process.
    """
    metrics = {k: SegMetric(dataset.num_classes) for k in ("all", "day", "night")}
    with evaluation_mode(model) as net:
        for index, item in shard(dataset, dist, workers):
            vis = item["vis"].to(dist.device, non_blocking=True)
            ir = item["ir"].to(dist.device, non_blocking=True)
            with autocast():
                logits = net.logits_at_input_size(vis, ir)       # (1, K, H, W)
            check_finite_output(logits, dataset, index, "class scores")
            pred = logits.float().argmax(dim=1).cpu()             # (1, H, W)
            label = item["label"]                                 # (1, H, W)
            metrics["all"].update(pred, label)
            metrics["night" if bool(item["is_night"][0]) else "day"].update(pred, label)
            if on_prediction is not None:
                on_prediction(index, pred[0], label[0])
    for m in metrics.values():
        m.confusion[:] = all_reduce_sum_(torch.from_numpy(m.confusion.copy())).numpy()
    return metrics


def build_model(config: dict, pretrained: Optional[str] = None) -> nn.Module:
    """The Segmentor a `train_seg.py` configuration describes (backbone + Segformer head)."""
    from ..models.segmentor import build_segmentor
    return build_segmentor(config["backbone"], config.get("num_classes", NUM_CLASSES),
                           tuning=config["tuning"], pretrained=pretrained,
                           img_size=config["size"], head_dim=config["head_dim"],
                           **backbone_kwargs(config))


class SegTask(Task):
    name = "seg"
    metric = "mIoU"
    recipe = Recipe(optimizer="sgd", lr=1e-3, weight_decay=1e-2, batch_size=2, size=512,
                    iters=160_000, schedule="poly", momentum=0.9, eval_every=8000,
                    poly_power=0.9, min_lr=1e-4)          # mmseg's schedule_160k.py
    description = DESCRIPTION
    size_help = ("square training crop in pixels (--crop is the same flag); evaluation runs at "
                 "the images' native size")
    size_aliases = ("--crop",)
    model_keys = ("head_dim",)
    validation_keys = ("data", "val_split")
    loss_average = "all"                # `seg_loss`'s average, the run's --loss-average

    def add_arguments(self, p) -> None:
        g = p.add_argument_group("segmentation")
        g.add_argument("--head-dim", type=int, default=256,
                       help="width of the Segformer head (mmseg's SegformerHead `channels`); the "
                            "paper does not state it, 256 follows mmseg's Segformer configs "
                            "(default: %(default)s)")
        g.add_argument("--loss-average", default="all", choices=("all", "valid"),
                       help="cross-entropy (ignore index 255) averaged over all pixels of the "
                            "batch, the ignored ones counting 0 (mmseg's CrossEntropyLoss "
                            "default), or over the non-ignored pixels only (mmseg's "
                            "avg_non_ignore=True, PyTorch's ignore_index mean) "
                            "(default: %(default)s)")
        g.add_argument("--dataset", default="mfnet", choices=sorted(SEG_DATASETS),
                       help="on-disk layout of --data (default: %(default)s)")
        g.add_argument("--data", metavar="DIR",
                       help="dataset root folder (required, except with --resume: the run's)")
        g.add_argument("--train-split", default="train",
                       help="training split; the paper's protocol trains on 'train+val' (1176 "
                            "MFNet images) and reports on 'test' with evaluate.py. The default "
                            "keeps 'val' held out for checkpoint selection (default: %(default)s)")
        g.add_argument("--val-split", default="val",
                       help="split evaluated every --eval-every iterations to pick best.pt; "
                            "never select on the test split. MSRS ships only train and test: "
                            "hold out your own, a folder val/{vi,ir,Segmentation_labels} or a "
                            "list split/val.txt (docs/training.md) (default: %(default)s)")

    def build_datasets(self, args, norm, out: Path, is_main: bool):
        crop = (args.size, args.size)
        train = build_seg_dataset(args.dataset, args.data, args.train_split, train=True,
                                  crop=crop, seed=args.seed, norm=norm)
        val = build_seg_dataset(args.dataset, args.data, args.val_split, train=False,
                                seed=args.seed, norm=norm)
        return train, val

    def build_model(self, config, pretrained):
        self.loss_average = config["loss_average"]
        return build_model(config, pretrained)

    def loss(self, model, batch, device) -> torch.Tensor:
        """`seg_loss` of the logits upsampled from stride 4 to the crop size."""
        vis = batch["vis"].to(device, non_blocking=True)               # (B, 3, H, W)
        ir = batch["ir"].to(device, non_blocking=True)                 # (B, 3, H, W)
        label = batch["label"].to(device, non_blocking=True)           # (B, H, W)
        logits = model(vis, ir)                                        # (B, K, H/4, W/4)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
        return seg_loss(logits.float(), label, self.loss_average)

    def evaluate(self, model, dataset, dist, autocast, workers) -> dict:
        r = evaluate_seg(model, dataset, dist, autocast, workers)["all"].compute()
        return {"mIoU": r["mIoU"], "mAcc": r["mAcc"], "aAcc": r["aAcc"],
                "IoU": dict(zip(CLASSES, r["IoU"]))}

    def format_eval(self, r: dict) -> str:
        return f"mIoU {r['mIoU']:.2f}  mAcc {r['mAcc']:.2f}"


# -- evaluate.py ---------------------------------------------------------------------------------
def panel(vis: np.ndarray, ir: np.ndarray, pred: np.ndarray, gt: np.ndarray):
    """visible (H, W, 3), thermal (H, W), prediction and ground truth (H, W) -> (H, 4W, 3) image."""
    from PIL import Image
    thermal = np.repeat(ir[..., None], 3, axis=2)
    return Image.fromarray(np.concatenate(
        [vis.astype(np.uint8), thermal.astype(np.uint8), colourise(pred), colourise(gt)], axis=1))


def metric_summary(metric: SegMetric) -> dict:
    """mIoU (mmseg convention: classes absent from both prediction and ground truth skipped),
    mIoU_nan0 (RTFNet convention: they count as 0) where the metric reports it, mAcc, aAcc and
    the per-class IoU and accuracy."""
    r = metric.compute()
    out = {"num_pixels": int(metric.confusion.sum()), "mIoU": r["mIoU"]}
    if "mIoU_nan0" in r:
        out["mIoU_nan0"] = r["mIoU_nan0"]
    return {**out, "mAcc": r["mAcc"], "aAcc": r["aAcc"], "IoU": dict(zip(CLASSES, r["IoU"])),
            "Acc": dict(zip(CLASSES, r["Acc"]))}


def print_report(m: dict) -> None:
    """Print `evaluate_checkpoint`'s result: IoU per class, mIoU and mAcc, all / day / night."""
    print(f"{m['checkpoint']} on {m['split']} ({m['num_images']} images: "
          f"{m['num_day']} day, {m['num_night']} night)")
    print(f"{'class':<12}" + "".join(f"{k:>9}" for k in ("all", "day", "night")))
    for c in CLASSES:
        print(f"{c:<12}" + "".join(f"{m[k]['IoU'][c]:9.2f}" for k in ("all", "day", "night")))
    names = ["mIoU"] + (["mIoU_nan0"] if "mIoU_nan0" in m["all"] else []) + ["mAcc"]
    for name in names:
        print(f"{name:<12}" + "".join(f"{m[k][name]:9.2f}" for k in ("all", "day", "night")))
    if "mIoU_nan0" in m["all"]:
        print("mIoU skips classes absent from prediction and ground truth (mmseg, the paper); "
              "mIoU_nan0 counts them as 0 (RTFNet)")


def evaluate_checkpoint(args, model: nn.Module, ckpt: dict, dist: DistInfo, norm) -> dict:
    """evaluate.py for a segmentation checkpoint: one --data folder, one --split."""
    cfg = ckpt["config"]
    if len(args.data) != 1:
        raise ValueError("segmentation evaluates one --data folder at a time")
    layout = args.dataset or cfg["dataset"]
    if layout not in SEG_DATASETS:
        raise ValueError(f"--dataset {layout!r}: expected one of {sorted(SEG_DATASETS)}")
    dataset = build_seg_dataset(layout, args.data[0], args.split,
                                train=False, seed=cfg["seed"], norm=norm)
    if args.verify_images:
        dataset.verify()
    out = Path(args.save_vis or ".")

    def save_panel(index: int, pred: torch.Tensor, label: torch.Tensor) -> None:
        sample = dataset.samples[index]
        vis, ir = dataset.read_pair(sample)                # uint8 (H, W, 3), (H, W)
        panel(vis, ir, pred.numpy().astype(np.uint8),
              label.numpy().astype(np.uint8)).save(out / f"{sample.name}.png")

    if args.save_vis:
        out.mkdir(parents=True, exist_ok=True)

    metrics = evaluate_seg(model, dataset, dist, autocast_context(dist.device, args.amp),
                           args.workers, save_panel if args.save_vis else None)
    night = sum(parse_name(s.name, s.label)[0] for s in dataset.samples)
    result = {"task": "seg", "checkpoint": args.checkpoint, "split": args.split,
              "iter": ckpt["iter"], "num_images": len(dataset),
              "num_day": len(dataset) - night, "num_night": night,
              **{k: metric_summary(m) for k, m in metrics.items()}}
    for k in ("all", "day", "night"):
        result[f"miou_{k}"] = result[k]["mIoU"]
    return result
